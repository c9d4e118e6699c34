"""Periodic housekeeping in one named, detached actor (restarted if it dies):

- `expire`: cancel unpaid orders whose stock reservation ran out, releasing the stock;
- `reconcile`: ask the gateway about payments and refunds still pending, so a dropped
  webhook cannot strand an order;
- `purge`: drop idempotency keys past their window, delivered outbox events and processed
  webhook events past retention, and finished notification sends and inbox items past theirs.

Every job is safe to run twice or concurrently (conditional updates, SKIP LOCKED), so a
restart, or ops running one by hand (`run`), never does harm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import ray
from ray.actor import ActorHandle
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from actors import named
from config import metrics
from config.settings import Settings, get_settings
from models import idempotency, notifications, order_flows, orders, outbox
from models.db import make_engine, make_sessionmaker, utcnow
from models.gateway import RazorpayClient, make_gateway
from models.payments import GatewayEvent

log = logging.getLogger("vurksha.jobs")

JANITOR_NAME = "janitor"
PURGE_INTERVAL_S = 3600.0


@ray.remote(num_cpus=0.05, max_restarts=-1, max_task_retries=-1)
class Janitor:
    def __init__(self) -> None:
        self.settings: Settings = get_settings()
        assert self.settings.database_url, "DATABASE_URL must be set"
        self._sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(
            make_engine(self.settings.database_url, pool_size=2, max_overflow=2)
        )
        self._gateway: RazorpayClient = make_gateway(self.settings)
        self._jobs: dict[str, Callable[[], Awaitable[int]]] = {
            "expire": self._expire,
            "reconcile": self._reconcile,
            "purge": self._purge,
        }
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every("expire", self.settings.sweep_interval_seconds)),
            loop.create_task(self._every("reconcile", self.settings.reconcile_interval_seconds)),
            loop.create_task(self._every("purge", PURGE_INTERVAL_S)),
        ]

    async def run(self, job: str) -> int:
        """Run one job now; returns how many things it changed."""
        return await self._jobs[job]()

    async def _every(self, job: str, interval: float) -> None:
        while True:
            started = time.monotonic()
            try:
                changed = await self._jobs[job]()
                if changed:
                    log.info("%s: %d changed", job, changed)
            except Exception:
                log.exception("job %s failed; next run in %.0f s", job, interval)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _expire(self) -> int:
        released = 0
        while True:
            async with self._sessions() as s:
                due = await orders.expired_reservations(s, utcnow())
            if not due:
                return released
            for order_id in due:
                async with self._sessions() as s:
                    released += await orders.expire_reservation(s, order_id, utcnow())
                    await s.commit()
            if len(due) < 100:
                return released

    async def _reconcile(self) -> int:
        return await order_flows.reconcile(
            self._sessions, self._gateway, self.settings, applied_fact=metrics.record_fact
        )

    async def _purge(self) -> int:
        now = utcnow()
        retention = now - timedelta(days=self.settings.outbox_retention_days)
        async with self._sessions() as s:
            n = await idempotency.purge(s, now - timedelta(seconds=self.settings.idempotency_ttl_seconds))
            n += await outbox.purge_delivered(s, retention)
            n += await notifications.purge(
                s,
                sends_before=now - timedelta(days=self.settings.notification_send_retention_days),
                inbox_before=now - timedelta(days=self.settings.notification_inbox_retention_days),
            )
            result = await s.execute(
                delete(GatewayEvent).where(
                    GatewayEvent.processed_at.is_not(None), GatewayEvent.received_at < retention
                )
            )
            n += int(result.rowcount)  # type: ignore[attr-defined]
            await s.commit()
        return n


def janitor() -> ActorHandle:
    """The janitor actor (created on first use)."""
    return named(Janitor, JANITOR_NAME)
