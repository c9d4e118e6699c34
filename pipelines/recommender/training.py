"""Fitting `implicit`'s ALS (or BPR) on a `Dataset` into a `ModelArtifact`, and the parameters'
sources: a TOML or JSON config file, then command-line flags.

BLAS is pinned to one thread around the whole fit (`threadpoolctl`): `implicit` parallelises
over users itself, and OpenBLAS' own pool on top of that slows it down many times (implicit
warns when it sees one). The model's thread count is always passed explicitly, and the GPU is
off unless asked for.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from models.recommender import ModelArtifact, ModelParams
from pipelines.recommender.data import Dataset

log = logging.getLogger(__name__)

# `implicit`'s own defaults for ALS: the "raw ALS" baseline is untuned on purpose.
RAW_ALS = ModelParams(algorithm="als", factors=100, regularization=0.01, alpha=1.0, iterations=15)


def default_threads() -> int:
    """The CPUs this process may run on (a container's limit, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def make_model(params: ModelParams, *, threads: int, use_gpu: bool = False) -> Any:
    """An unfitted `implicit` model for these parameters. Build it inside `threadpool_limits`:
    implicit checks the BLAS pool when the model is created."""
    if params.algorithm == "bpr":
        from implicit.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking(
            factors=params.factors,
            learning_rate=params.learning_rate,
            regularization=params.regularization,
            iterations=params.iterations,
            num_threads=threads,
            random_state=params.seed,
            use_gpu=use_gpu,
        )
    from implicit.als import AlternatingLeastSquares

    return AlternatingLeastSquares(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        num_threads=threads,
        random_state=params.seed,
        use_gpu=use_gpu,
    )


def _cpu(factors: Any) -> np.ndarray:
    """Factors as a NumPy array (a GPU model holds them on the device)."""
    return np.asarray(factors.to_numpy() if hasattr(factors, "to_numpy") else factors)


@dataclass
class Fitted:
    """A fitted model: the artifact serving loads, the implicit model itself (user factors for
    the raw-ALS baseline) and the fit's wall time."""

    artifact: ModelArtifact
    model: Any
    seconds: float


def fit_matrix(
    matrix: sp.csr_matrix, params: ModelParams, *, threads: int, use_gpu: bool = False, progress: bool = False
) -> tuple[Any, float]:
    """Fit an implicit model on a customers x items matrix; returns it and the seconds the fit
    took (model creation included)."""
    if not all(a.flags.writeable for a in (matrix.data, matrix.indices, matrix.indptr)):
        # Implicit's Cython wants writable buffers; a matrix from Ray's object store is not.
        matrix = matrix.copy()
    with threadpool_limits(1, "blas"):
        started = time.perf_counter()
        model = make_model(params, threads=threads, use_gpu=use_gpu)
        model.fit(matrix, show_progress=progress)
        return model, time.perf_counter() - started


def fit(
    dataset: Dataset,
    params: ModelParams,
    *,
    threads: int | None = None,
    use_gpu: bool = False,
    progress: bool = False,
) -> Fitted:
    """Train on the dataset and package the result as a `ModelArtifact`. `seconds` covers the
    whole step (fit and packaging), which the benchmark compares with a bare implicit fit."""
    started = time.perf_counter()
    threads = threads or default_threads()
    if dataset.matrix.nnz == 0:
        raise ValueError("no interactions to train on")
    model, _ = fit_matrix(dataset.matrix, params, threads=threads, use_gpu=use_gpu, progress=progress)
    if use_gpu and hasattr(model, "to_cpu"):
        model = model.to_cpu()
    artifact = dataset.artifact(_cpu(model.item_factors), params)
    seconds = time.perf_counter() - started
    log.info(
        "fitted %s (%d factors, %d iterations, %d threads) on %d x %d, %d interactions in %.2f s",
        params.algorithm,
        params.factors,
        params.iterations,
        threads,
        *dataset.shape,
        dataset.matrix.nnz,
        seconds,
    )
    return Fitted(artifact, model, seconds)


# ---------------------------------------------------------------- parameters


def load_config(path: Path) -> dict[str, Any]:
    """A TOML or JSON file (by extension; TOML otherwise). Parameters are top-level keys or
    under a `[params]` table; a `[search]` table may give `trials`."""
    raw = path.read_bytes()
    data: dict[str, Any] = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
    log.info("read config %s", path)
    return data


def params_from(config: dict[str, Any] | None = None, **overrides: Any) -> ModelParams:
    """`ModelParams` from a config mapping (see `load_config`), then the overrides that are not
    None (command-line flags win over the file). Unknown keys are refused."""
    values: dict[str, Any] = {}
    if config:
        section = config.get("params", {k: v for k, v in config.items() if k != "search"})
        values.update(section)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelParams.model_validate(values)
