"""A small random search on a validation split carved from the training period: fit on the
lines before the validation cut-off, score ours on what came after, under both rules from the
same fit (the time rule picks the winner; the new-items rule is reported beside it).

Two stages, because the blend's weights are applied at serving time and need no refit:
1. `trials` fits over factors, regularization and alpha (trial 0 = the base parameters);
2. `trials` blends (w_repeat, w_popularity) on the best fit's factors (blend 0 = its own
   weights), each costing one scoring pass instead of a fit.
The first point of each stage is what it was given, so the search never returns parameters
that validated worse than the base. Fits run in-process one after the other, or as Ray tasks
(one CPU and one implicit thread each) with `use_ray`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from models.recommender import ModelArtifact, ModelParams
from pipelines.recommender.data import Dataset, build
from pipelines.recommender.evaluation import evaluate_artifact
from pipelines.recommender.splits import DEFAULT_QUANTILE, Split, validation_split
from pipelines.recommender.training import default_threads, fit

log = logging.getLogger(__name__)

FACTORS = (16, 32, 48, 64, 96, 128)
REGULARIZATION = (0.005, 0.5)  # log-uniform
ALPHA = (0.25, 4.0)  # log-uniform
W_REPEAT = (0.25, 3.0)  # uniform
W_POPULARITY = (0.0, 1.0)  # uniform


@dataclass(frozen=True)
class Trial:
    """One point of the search and its validation figures: NDCG@10 and MAP@10 under the time
    rule, NDCG@10 on items new to the customer (same fit)."""

    stage: Literal["fit", "blend"]
    index: int
    params: ModelParams
    ndcg10: float
    map10: float
    ndcg10_new: float
    fit_seconds: float
    artifact: ModelArtifact | None = field(default=None, repr=False, compare=False)

    def row(self) -> dict[str, Any]:
        p = self.params
        return {
            "stage": self.stage,
            "trial": self.index,
            "factors": p.factors,
            "regularization": p.regularization,
            "alpha": p.alpha,
            "w_repeat": p.w_repeat,
            "w_popularity": p.w_popularity,
            "ndcg10": round(self.ndcg10, 4),
            "map10": round(self.map10, 4),
            "ndcg10_new": round(self.ndcg10_new, 4),
            "fit_s": round(self.fit_seconds, 2),
        }


def _best(trials: Sequence[Trial]) -> Trial:
    """The highest NDCG@10 (time rule); the earlier point on a tie."""
    return max(trials, key=lambda t: (t.ndcg10, -t.index))


@dataclass(frozen=True)
class SearchResult:
    trials: list[Trial]
    validation_cutoff: float
    validation_users: int
    seconds: float

    @property
    def fits(self) -> list[Trial]:
        return [t for t in self.trials if t.stage == "fit"]

    @property
    def best(self) -> Trial:
        """The best blend of the best fit (the best fit itself without a blend stage)."""
        blends = [t for t in self.trials if t.stage == "blend"]
        return _best(blends or self.trials)

    def table(self) -> list[dict[str, Any]]:
        """Stage by stage, best first within each."""
        order = {"fit": 0, "blend": 1}
        return [t.row() for t in sorted(self.trials, key=lambda t: (order[t.stage], -t.ndcg10, t.index))]

    def best_per_factors(self) -> list[tuple[int, float]]:
        """(factors, best validation NDCG@10 of a fit) for each factor count tried."""
        best: dict[int, float] = {}
        for t in self.fits:
            best[t.params.factors] = max(best.get(t.params.factors, 0.0), t.ndcg10)
        return sorted(best.items())


def _round(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def sample_params(base: ModelParams, trials: int, seed: int) -> list[ModelParams]:
    """Stage 1's points: the base first, then factors from `FACTORS`, regularization and alpha
    log-uniform (blend weights kept)."""
    rng = np.random.default_rng(seed)

    def log_uniform(bounds: tuple[float, float]) -> float:
        return _round(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))

    points = [base]
    while len(points) < trials:
        update = {
            "factors": int(rng.choice(FACTORS)),
            "regularization": log_uniform(REGULARIZATION),
            "alpha": log_uniform(ALPHA),
        }
        points.append(base.model_copy(update=update))
    return points[:trials]


def sample_blends(base: ModelParams, trials: int, seed: int) -> list[ModelParams]:
    """Stage 2's points: the base's weights first, then uniform ones."""
    rng = np.random.default_rng(seed + 1)
    points = [base]
    while len(points) < trials:
        update = {
            "w_repeat": _round(rng.uniform(*W_REPEAT), 2),
            "w_popularity": _round(rng.uniform(*W_POPULARITY), 2),
        }
        points.append(base.model_copy(update=update))
    return points[:trials]


def run_trial(
    index: int, params: ModelParams, dataset: Dataset, by_time: Split, new_items: Split, threads: int
) -> Trial:
    """Fit on the validation training lines and score ours under both rules."""
    fitted = fit(dataset, params, threads=threads)
    return _scored("fit", index, fitted.artifact, by_time, new_items, dataset, fitted.seconds)


def _scored(
    stage: Literal["fit", "blend"],
    index: int,
    artifact: ModelArtifact,
    by_time: Split,
    new_items: Split,
    dataset: Dataset,
    seconds: float,
) -> Trial:
    on_time = evaluate_artifact(artifact, by_time, dataset)
    on_new = evaluate_artifact(artifact, new_items, dataset)
    return Trial(
        stage, index, artifact.params, on_time.ndcg10, on_time.map10, on_new.ndcg10, seconds, artifact
    )


def _in_ray(
    points: Sequence[ModelParams], dataset: Dataset, by_time: Split, new_items: Split, progress: bool
) -> list[Trial]:
    import ray

    started = not ray.is_initialized()
    if started:
        # Inside a Ray job (RAY_ADDRESS set) this joins its cluster, after `ray start` that
        # one; otherwise it starts a local one, shut down again below.
        ray.init(log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_trial)
        data, time_rule, new_rule = ray.put(dataset), ray.put(by_time), ray.put(new_items)
        pending = [remote.remote(i, p, data, time_rule, new_rule, 1) for i, p in enumerate(points)]
        trials = []
        with tqdm(total=len(pending), desc="search fits (ray)", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                trials.append(ray.get(done[0]))
                bar.update(1)
    finally:
        if started:
            ray.shutdown()
    return sorted(trials, key=lambda t: t.index)


def random_search(
    split: Split,
    base: ModelParams,
    trials: int,
    *,
    quantile: float = DEFAULT_QUANTILE,
    threads: int | None = None,
    use_ray: bool = False,
    progress: bool = False,
) -> SearchResult:
    """Search on a validation split carved from `split`'s training period (never its test
    period): `trials` fits, then `trials` blends of the best fit."""
    started = time.perf_counter()
    by_time = validation_split(split, quantile, "time")
    new_items = validation_split(split, quantile, "new_items")
    dataset = build(by_time.train, by_time.cutoff, base)
    n = max(1, trials)
    log.info(
        "search: %d fits and %d blends on a validation split of %d lines, %d customers (%d with new items)",
        n,
        n,
        len(by_time.train),
        len(by_time),
        len(new_items),
    )
    if use_ray:
        fits = _in_ray(sample_params(base, n, base.seed), dataset, by_time, new_items, progress)
    else:
        threads = threads or default_threads()
        points = tqdm(sample_params(base, n, base.seed), desc="search fits", disable=not progress)
        fits = [run_trial(i, p, dataset, by_time, new_items, threads) for i, p in enumerate(points)]
    best_fit = _best(fits)
    assert best_fit.artifact is not None
    # Blend 0 is the best fit as it is: no second scoring pass for it.
    blends = [replace(best_fit, stage="blend", index=0, fit_seconds=0.0)]
    points = sample_blends(best_fit.params, n, base.seed)[1:]
    for i, params in enumerate(tqdm(points, desc="search blends", disable=not progress), start=1):
        artifact = replace(best_fit.artifact, params=params)
        blends.append(_scored("blend", i, artifact, by_time, new_items, dataset, 0.0))
    result = SearchResult(
        [_light(t) for t in fits + blends], by_time.cutoff, len(by_time), time.perf_counter() - started
    )
    best = result.best
    log.info(
        "search: best validation ndcg10 %.4f (blend %d of fit %d): %s",
        best.ndcg10,
        best.index,
        best_fit.index,
        best.params,
    )
    return result


def _light(trial: Trial) -> Trial:
    """Without its artifact: results are kept (reports), factors are not."""
    return replace(trial, artifact=None)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as an aligned plain-text table."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
