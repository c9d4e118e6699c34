"""What data scientists run, from the CLI or a notebook: train (read data, search, evaluate, fit
the final model, register it, optionally promote it) and evaluate; promote, roll back and list
are in `promotion`.

Each flow is an async function (the seed awaits them, inside its own session if it passes one)
with a sync twin that creates its own engine and also works under a notebook's running event
loop. Heavy CPU work runs in a worker thread, so an event loop calling the async flows is not
blocked. Data cut-offs are datetimes; naive ones are taken as UTC.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from config.settings import Settings, get_settings
from models import recommender as registry
from models.recommender import DataSource, ModelArtifact, ModelParams
from pipelines.recommender.data import from_epoch
from pipelines.recommender.pipeline import Evaluation, evaluate_events, train_offline
from pipelines.recommender.promotion import promote_in
from pipelines.recommender.report import Report, render, write
from pipelines.recommender.runtime import (
    database,
    default_cutoff,
    git_commit,
    no_database,
    parse_source,
    read_events,
    resolve_params,
    run_sync,
    utc,
    whoami,
)
from pipelines.recommender.splits import DEFAULT_QUANTILE

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """A trained model: its registry version (None when not registered), what it was trained
    with, its evaluation and report, and whether it was promoted."""

    version: int | None
    source: DataSource
    data_cutoff: datetime
    params: ModelParams
    metrics: dict[str, Any]
    evaluation: Evaluation
    report: Report
    report_dir: Path | None
    artifact: ModelArtifact
    train_seconds: float
    promoted: bool = False
    promotion_refused: str | None = None

    def _repr_html_(self) -> str:
        return self.report.html


@dataclass
class EvaluateResult:
    params: ModelParams
    evaluation: Evaluation
    report: Report
    report_dir: Path | None

    def _repr_html_(self) -> str:
        return self.report.html


async def train_async(
    *,
    source: str = "orders",
    params: ModelParams | Mapping[str, Any] | None = None,
    config: Path | str | None = None,
    search: int | None = None,
    cutoff: datetime | str | None = None,
    quantile: float = DEFAULT_QUANTILE,
    threads: int | None = None,
    use_ray: bool = False,
    by: str | None = None,
    promote: bool = False,
    force: bool = False,
    register: bool = True,
    report_dir: Path | str | None = None,
    parquet: Path | None = None,
    progress: bool = True,
    settings: Settings | None = None,
    session: AsyncSession | None = None,
) -> TrainResult:
    """Read the source's lines before `cutoff` (orders: now; Online Retail: all), search
    (`search` trials, else the config's), evaluate on the time and new-items splits, fit the
    final model on every line and register it (`register=False`: research mode, Online Retail
    only, no database, item ids are SKUs). With `promote`, promote it (refused, and said so in
    the result, when it is worse than production by more than the tolerance, unless `force`).

    The report goes to `report_dir`, else `<data_dir>/recommender/v<version>/`. With a
    `session` (the seed's) this only flushes; otherwise it commits the model, then promotes."""
    settings = settings or get_settings()
    data_source = parse_source(source)
    if not register and data_source == "orders":
        raise ValueError("the orders source reads the database: register=False is for online_retail")
    model_params, config_trials = resolve_params(params, config)
    trials = config_trials if search is None else search
    moment = default_cutoff(data_source, cutoff)
    created_by = whoami(by)

    async with database(settings, session) if register else no_database() as db:
        events = await read_events(data_source, moment or datetime.now(UTC), db, parquet)
        if db is not None and session is None:
            await db.commit()  # not idle in a transaction for the minutes training takes
        end = from_epoch(float(events.ts.max()) + 1.0) if moment is None else moment
        trained = await asyncio.to_thread(
            train_offline,
            events,
            model_params,
            end.timestamp(),
            source=data_source,
            quantile=quantile,
            search=trials,
            threads=threads,
            use_ray=use_ray,
            progress=progress,
        )
        artifact = trained.final.artifact
        metrics = trained.evaluation.metrics()
        info: dict[str, Any] = {
            "version": None,
            "source": data_source,
            "data cut-off": end.isoformat(),
            "created by": created_by,
            "git commit": git_commit(),
            "lines": trained.lines,
            "customers x items": f"{trained.dataset.shape[0]} x {trained.dataset.shape[1]}",
            "interactions": trained.dataset.matrix.nnz,
            "final fit (s)": round(trained.final.seconds, 3),
        }
        version = None
        if db is not None:
            data = artifact.to_bytes()
            row = await registry.register(
                db,
                registry.RecommenderModel(
                    created_by=created_by,
                    algorithm=trained.params.algorithm,
                    source=data_source,
                    data_cutoff=end,
                    params=trained.params.model_dump(),
                    metrics=metrics,
                    git_commit=info["git commit"],
                    users=trained.dataset.shape[0],
                    items=trained.dataset.shape[1],
                    interactions=int(trained.dataset.matrix.nnz),
                    train_seconds=trained.final.seconds,
                    artifact_sha256=hashlib.sha256(data).hexdigest(),
                    artifact_bytes=len(data),
                    artifact=data,
                ),
            )
            version = row.version
            info["version"] = version
            report = render(trained.evaluation, info)
            row.report = report.markdown
            await db.flush()
            if session is None:
                await db.commit()
            log.info("registered model v%d (%d bytes, ndcg10 %.4f)", version, len(data), metrics["ndcg10"])
        else:
            report = render(trained.evaluation, info)
        directory = _report_dir(settings, report_dir, version)
        if directory is not None:
            write(report, directory, metrics)
        result = TrainResult(
            version=version,
            source=data_source,
            data_cutoff=end,
            params=trained.params,
            metrics=metrics,
            evaluation=trained.evaluation,
            report=report,
            report_dir=directory,
            artifact=artifact,
            train_seconds=trained.final.seconds,
        )
        if promote and db is not None and version is not None:
            try:
                await promote_in(db, version, by=created_by, force=force, settings=settings)
                result.promoted = True
            except registry.PromotionRefused as refused:
                result.promotion_refused = refused.message
                log.warning("not promoted: %s", refused.message)
    return result


def _report_dir(settings: Settings, given: Path | str | None, version: int | None) -> Path | None:
    if given is not None:
        return Path(given)
    if version is None:
        return None
    return settings.data_dir / "recommender" / f"v{version}"


async def evaluate_async(
    version: int | None = None,
    *,
    params: ModelParams | Mapping[str, Any] | None = None,
    config: Path | str | None = None,
    source: str | None = None,
    cutoff: datetime | str | None = None,
    search: int | None = None,
    quantile: float = DEFAULT_QUANTILE,
    threads: int | None = None,
    use_ray: bool = False,
    report_dir: Path | str | None = None,
    parquet: Path | None = None,
    progress: bool = True,
    settings: Settings | None = None,
    session: AsyncSession | None = None,
) -> EvaluateResult:
    """Evaluate a registered version's parameters on its own source and data cut-off (the
    stored model saw the test period, so the splits refit with its parameters), or given
    parameters (`params`, `config`) on a source (Online Retail without a database: research
    mode). Writes nothing to the registry; the report goes to `report_dir` when given."""
    settings = settings or get_settings()
    needs_db = version is not None or (source or "orders").replace("-", "_") == "orders"
    moment: datetime | None
    async with database(settings, session) if needs_db else no_database() as db:
        if version is not None:
            assert db is not None
            row = await registry.get_model(db, version)
            model_params = ModelParams.model_validate(row.params)
            data_source = parse_source(source or row.source)
            moment = utc(cutoff) or row.data_cutoff
            trials = search or 0
        else:
            model_params, trials = resolve_params(params, config)
            trials = trials if search is None else search
            data_source = parse_source(source or "orders")
            moment = default_cutoff(data_source, cutoff)
        events = await read_events(data_source, moment or datetime.now(UTC), db, parquet)
    evaluation = await asyncio.to_thread(
        evaluate_events,
        events,
        model_params,
        source=data_source,
        quantile=quantile,
        search=trials,
        threads=threads,
        use_ray=use_ray,
        progress=progress,
    )
    info = {"version": version, "source": data_source, "evaluated": "parameters refitted on each split"}
    report = render(evaluation, info)
    directory = Path(report_dir) if report_dir is not None else None
    if directory is not None:
        write(report, directory, evaluation.metrics())
    return EvaluateResult(evaluation.params, evaluation, report, directory)


def train(**kwargs: Any) -> TrainResult:
    """`train_async`, from sync code (a notebook, the CLI)."""
    return run_sync(train_async(**kwargs))


def evaluate(version: int | None = None, **kwargs: Any) -> EvaluateResult:
    """`evaluate_async`, from sync code."""
    return run_sync(evaluate_async(version, **kwargs))
