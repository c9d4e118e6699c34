"""The registry's flows: promote (refused when the candidate is worse than production by more
than `settings.recommender_promote_tolerance`, unless forced), roll back, list. Async, with sync
twins; a caller's session is only flushed, our own is committed (`runtime.database`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from config.settings import Settings, get_settings
from models import recommender as registry
from models.recommender import ModelOut
from pipelines.recommender.runtime import database, run_sync, whoami

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionOut:
    """A recorded promotion or rollback: `version` is production since `at`."""

    action: str
    version: int
    previous_version: int | None
    forced: bool
    by: str
    at: datetime | None


def _promotion(row: registry.RecommenderPromotion) -> PromotionOut:
    return PromotionOut(
        row.action, row.version, row.previous_version, row.forced, row.promoted_by, row.promoted_at
    )


async def promote_in(
    db: AsyncSession, version: int, *, by: str, force: bool, settings: Settings
) -> PromotionOut:
    """Promote in `db` (only flushed: `database` or the caller commits)."""
    row = await registry.promote(
        db, version, by=by, tolerance=settings.recommender_promote_tolerance, force=force
    )
    await db.refresh(row)
    log.info(
        "promoted v%d (previous: %s) by %s%s", version, row.previous_version, by, " (forced)" if force else ""
    )
    return _promotion(row)


async def promote_async(
    version: int,
    *,
    force: bool = False,
    by: str | None = None,
    settings: Settings | None = None,
    session: AsyncSession | None = None,
) -> PromotionOut:
    """Make `version` production; refused (`PromotionRefused`) when its NDCG@10 is below
    production's by more than `settings.recommender_promote_tolerance`, unless `force`."""
    settings = settings or get_settings()
    async with database(settings, session) as db:
        return await promote_in(db, version, by=whoami(by), force=force, settings=settings)


async def rollback_async(
    *, by: str | None = None, settings: Settings | None = None, session: AsyncSession | None = None
) -> PromotionOut:
    """Return production to the version before the current one."""
    settings = settings or get_settings()
    async with database(settings, session) as db:
        row = await registry.rollback(db, by=whoami(by))
        await db.refresh(row)
    log.info("rolled back from v%s to v%d by %s", row.previous_version, row.version, row.promoted_by)
    return _promotion(row)


async def list_models_async(
    limit: int = 50, *, settings: Settings | None = None, session: AsyncSession | None = None
) -> list[ModelOut]:
    """Newest first, production flagged."""
    settings = settings or get_settings()
    async with database(settings, session) as db:
        return await registry.list_models(db, limit)


def promote(version: int, *, force: bool = False, by: str | None = None, **kwargs: Any) -> PromotionOut:
    """`promote_async`, from sync code."""
    return run_sync(promote_async(version, force=force, by=by, **kwargs))


def rollback(*, by: str | None = None, **kwargs: Any) -> PromotionOut:
    """`rollback_async`, from sync code."""
    return run_sync(rollback_async(by=by, **kwargs))


def list_models(limit: int = 50, **kwargs: Any) -> list[ModelOut]:
    """`list_models_async`, from sync code."""
    return run_sync(list_models_async(limit, **kwargs))
