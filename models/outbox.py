"""The transactional outbox: domain events written in the same transaction as the change they
describe, then delivered at-least-once to their subscribers by the relay actor
(`actors.outbox.OutboxRelay`).

One row per event. `pending` lists the subscribers that have not acknowledged it yet; a row
whose topic has no subscriber is born delivered and stays as the event log until retention
removes it. Every subscriber must be idempotent: a crash between its effect and the
relay's acknowledgement delivers the event again.

Delivery is not ordered across events (retries overtake): subscribers decide from the state
they find, never from arrival order.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import BigInteger, Identity, Index, String, Text, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base

# Which Serve applications consume which topics. Each subscriber application's ingress has a
# `consume(event)` method that the relay calls through a DeploymentHandle.
# Notifications subscribes to every topic of `models.notification_rules.EVENTS` (a test
# holds the two together).
SUBSCRIBERS: dict[str, tuple[str, ...]] = {
    "gateway.event": ("payments",),
    "refund.requested": ("payments",),
    "refund.processed": ("notifications",),
    "order.placed": ("notifications",),
    # The fleet queues confirmed orders for dispatch and follows the store's later moves.
    "order.confirmed": ("delivery", "notifications"),
    "order.packed": ("delivery", "notifications"),
    "order.cancelled": ("delivery", "notifications"),
    "order.payment_failed": ("notifications",),
    "order.delivered": ("notifications",),
    "order.delivery_failed": ("notifications",),
    "delivery.offered": ("notifications",),
    "delivery.assigned": ("notifications",),
    "delivery.picked_up": ("notifications",),
    "delivery.arrived": ("notifications",),
    "promotion.broadcast": ("notifications",),
}

NOTIFY_CHANNEL = "vurksha_outbox"


class OutboxRow(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        Index("ix_outbox_aggregate", "aggregate_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    topic: Mapped[str] = mapped_column(String(64))
    aggregate_id: Mapped[uuid.UUID | None]
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    # pending -> delivered, or dead after `outbox_max_attempts` failed attempts.
    status: Mapped[str] = mapped_column(String(16))
    pending: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    attempts: Mapped[int] = mapped_column(server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]


class Event(BaseModel):
    """What a subscriber receives: the outbox row's identity and content."""

    id: int
    topic: str
    aggregate_id: uuid.UUID | None
    payload: dict[str, Any]
    created_at: datetime
    attempt: int


async def _notify(session: AsyncSession) -> None:
    """Wake the relay when (and only if) the caller's transaction commits."""
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})


async def emit(
    session: AsyncSession, topic: str, aggregate_id: uuid.UUID | None, payload: dict[str, Any]
) -> None:
    """Record an event in the caller's transaction; it is delivered only if that commits."""
    subscribers = list(SUBSCRIBERS.get(topic, ()))
    session.add(
        OutboxRow(
            topic=topic,
            aggregate_id=aggregate_id,
            payload=payload,
            status="pending" if subscribers else "delivered",
            pending=subscribers,
        )
    )
    if subscribers:
        await _notify(session)


async def claim(session: AsyncSession, *, limit: int, lease_seconds: float) -> list[tuple[Event, list[str]]]:
    """Take up to `limit` due events and lease them: they are not due again until the lease
    ends, so a relay that dies mid-delivery leaves them to be retried, never lost."""
    rows = (
        await session.execute(
            text(
                """
                WITH due AS (
                    SELECT id FROM outbox
                    WHERE status = 'pending' AND next_attempt_at <= now()
                    ORDER BY next_attempt_at, id
                    LIMIT :limit
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE outbox o
                SET attempts = o.attempts + 1,
                    next_attempt_at = now() + make_interval(secs => :lease)
                FROM due WHERE o.id = due.id
                RETURNING o.id, o.topic, o.aggregate_id, o.payload, o.created_at, o.attempts, o.pending
                """
            ),
            {"limit": limit, "lease": lease_seconds},
        )
    ).all()
    return [
        (
            Event(
                id=r.id,
                topic=r.topic,
                aggregate_id=r.aggregate_id,
                payload=r.payload,
                created_at=r.created_at,
                attempt=r.attempts,
            ),
            list(r.pending),
        )
        for r in sorted(rows, key=lambda r: r.id)
    ]


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (so failing events do not retry in lockstep)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


async def settle(
    session: AsyncSession,
    event: Event,
    remaining: list[str],
    error: str | None,
    *,
    max_attempts: int,
    base: float,
    cap: float,
) -> str:
    """Record one delivery attempt: delivered when no subscriber remains, dead when the
    attempts are spent, else due again after a backoff. Fenced on the attempt number, so a
    lease that expired and was re-claimed is not overwritten by the older attempt."""
    if not remaining:
        values: dict[str, Any] = {"status": "delivered", "pending": [], "delivered_at": func.now()}
    elif event.attempt >= max_attempts:
        values = {"status": "dead", "pending": remaining, "last_error": error}
    else:
        delay = timedelta(seconds=backoff_seconds(event.attempt, base, cap))
        values = {"pending": remaining, "last_error": error, "next_attempt_at": func.now() + delay}
    await session.execute(
        update(OutboxRow)
        .where(OutboxRow.id == event.id, OutboxRow.attempts == event.attempt, OutboxRow.status == "pending")
        .values(**values)
    )
    return str(values.get("status", "pending"))


async def health(session: AsyncSession, now: datetime) -> tuple[float, int]:
    """(seconds since the oldest event still pending was recorded, 0 when none; dead letters).
    Both read few rows: pending events are the due index's, and dead ones should be none."""
    oldest, dead = (
        await session.execute(
            select(
                select(func.min(OutboxRow.created_at)).where(OutboxRow.status == "pending").scalar_subquery(),
                select(func.count()).where(OutboxRow.status == "dead").scalar_subquery(),
            )
        )
    ).one()
    return (max(0.0, (now - oldest).total_seconds()) if oldest else 0.0), int(dead)


async def dead_letters(session: AsyncSession, limit: int = 50) -> list[OutboxRow]:
    return list(
        (
            await session.scalars(
                select(OutboxRow).where(OutboxRow.status == "dead").order_by(OutboxRow.id).limit(limit)
            )
        ).all()
    )


async def requeue_dead(session: AsyncSession, ids: list[int] | None = None) -> int:
    """Give dead events a fresh set of attempts (after the cause was fixed)."""
    stmt = (
        update(OutboxRow)
        .where(OutboxRow.status == "dead")
        .values(status="pending", attempts=0, next_attempt_at=func.now(), last_error=None)
    )
    if ids is not None:
        stmt = stmt.where(OutboxRow.id.in_(ids))
    result = await session.execute(stmt)
    await _notify(session)
    return int(result.rowcount)  # type: ignore[attr-defined]


async def purge_delivered(session: AsyncSession, older_than: datetime) -> int:
    result = await session.execute(
        text("DELETE FROM outbox WHERE status = 'delivered' AND created_at < :t"), {"t": older_than}
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
