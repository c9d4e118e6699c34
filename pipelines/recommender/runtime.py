"""The flows' plumbing: sync calls over async flows (also under a notebook's event loop), the
database session (the caller's or one of our own), who runs a flow and from which commit,
parameters from a config file, and reading a source's lines before a cut-off."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from config.settings import Settings
from models.recommender import DataSource, ModelParams
from pipelines import catalog
from pipelines.recommender.data import Events, online_retail_events, order_events, product_skus
from pipelines.recommender.training import load_config, params_from

log = logging.getLogger(__name__)
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a flow to completion from sync code, also where an event loop already runs (a
    notebook): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def whoami(by: str | None = None) -> str:
    """`by`, or the OS user (a container without a passwd entry has `USER` or nothing)."""
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


def git_commit() -> str | None:
    """The checkout's HEAD, when the code runs from one (an installed image has none)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return None
    try:
        done = subprocess.run(  # noqa: S603 (fixed arguments)
            [git, "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def utc(moment: datetime | str | None) -> datetime | None:
    """A datetime or an ISO date/time string, as an aware UTC datetime."""
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def resolve_params(
    params: ModelParams | Mapping[str, Any] | None, config: Path | str | None
) -> tuple[ModelParams, int]:
    """Parameters from a config file (if any), then `params` over it; and the config's search
    size (`[search] trials`, 0 without one)."""
    loaded = load_config(Path(config)) if config else {}
    overrides = (
        params.model_dump(exclude_unset=True) if isinstance(params, ModelParams) else dict(params or {})
    )
    trials = int(loaded.get("search", {}).get("trials", 0))
    return params_from(loaded, **overrides), trials


def parse_source(source: str) -> DataSource:
    value = source.replace("-", "_")
    if value not in ("orders", "online_retail"):
        raise ValueError(f"unknown source {source!r} (orders or online_retail)")
    return value  # type: ignore[return-value]


@asynccontextmanager
async def database(settings: Settings, session: AsyncSession | None) -> AsyncIterator[AsyncSession]:
    """The caller's session (its transaction is the caller's), or one on an engine of our own
    whose transaction is committed when the block ends and rolled back when it raises
    (`models.db.transaction`); the engine is disposed afterwards."""
    if session is not None:
        yield session
        return
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set (the registry lives in PostgreSQL)")
    from models.db import make_engine, make_sessionmaker, transaction

    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        async with transaction(make_sessionmaker(engine)) as own:
            yield own
    finally:
        await engine.dispose()


async def read_events(
    source: DataSource, cutoff: datetime, session: AsyncSession | None, parquet: Path | None
) -> Events:
    """The source's lines before `cutoff`; Online Retail mapped onto the catalog by SKU when
    there is a session, by SKU itself otherwise (research mode)."""
    if source == "orders":
        if session is None:
            raise RuntimeError("the orders source needs the database")
        events = await order_events(session, cutoff)
    else:
        mapping = await product_skus(session) if session is not None else None
        events = await asyncio.to_thread(online_retail_events, parquet or catalog.DEFAULT_PARQUET, mapping)
    events = events.before(cutoff.timestamp())
    if not len(events):
        raise RuntimeError(f"no {source} lines before {cutoff.isoformat()} (is the catalog seeded?)")
    return events


def default_cutoff(source: DataSource, cutoff: datetime | str | None) -> datetime | None:
    """Orders: now. Online Retail: after its last line (resolved once the data is read)."""
    given = utc(cutoff)
    if given is not None or source == "online_retail":
        return given
    return datetime.now(UTC)


@asynccontextmanager
async def no_database() -> AsyncIterator[None]:
    yield None
