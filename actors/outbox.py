"""The outbox relay: one named, detached actor that delivers outbox events (see
`models.outbox`) at-least-once to the Serve applications subscribed to their topics, calling
each subscriber's `consume(event)` through a DeploymentHandle.

It wakes on PostgreSQL NOTIFY (sent by the committing transaction) and polls as a fallback.
Claimed events are leased, not removed: if the relay dies mid-delivery (it restarts,
`max_restarts=-1`), the lease runs out and they are delivered again; subscribers are
idempotent. A failing subscriber is retried with exponential backoff and jitter; after
`outbox_max_attempts` the event is dead-lettered (status `dead`) for ops to requeue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray
from ray import serve
from ray.actor import ActorHandle
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from actors import named
from config import metrics
from config.settings import Settings, get_settings
from models import outbox
from models.carts import Strict
from models.db import make_engine, make_sessionmaker, utcnow

log = logging.getLogger("vurksha.outbox")

RELAY_NAME = "outbox-relay"
BATCH = 64
CONCURRENCY = 32
HEALTH_EVERY_S = 15.0
DELIVERY_TIMEOUT_S = 20.0


class RelayStats(Strict):
    pid: int
    paused: bool
    delivered: int
    failed_attempts: int
    dead: int


@ray.remote(num_cpus=0.05, max_restarts=-1, max_task_retries=-1)
class OutboxRelay:
    def __init__(self) -> None:
        self.settings: Settings = get_settings()
        assert self.settings.database_url, "DATABASE_URL must be set"
        engine = make_engine(self.settings.database_url, pool_size=2, max_overflow=2)
        self._sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(engine)
        self._engine = engine
        self._listener: AsyncConnection | None = None
        self._wake = asyncio.Event()
        self._paused = False
        self._handles: dict[str, Any] = {}
        self._stats = {"delivered": 0, "failed_attempts": 0, "dead": 0}
        self._in_flight: set[asyncio.Task[None]] = set()
        # Async actors run __init__ on their event loop: the loop starts with the actor, and
        # again with every restart.
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._health = asyncio.get_running_loop().create_task(self._report_health())

    # ------------------------------------------------------------ control

    async def kick(self) -> None:
        """Look for due events now."""
        self._wake.set()

    async def pause(self) -> None:
        """Stop delivering (events accumulate, nothing is lost). A restart resumes."""
        self._paused = True

    async def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def stats(self) -> RelayStats:
        return RelayStats(pid=os.getpid(), paused=self._paused, **self._stats)

    # ------------------------------------------------------------ the loop

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.closed:
            return
        self._listener = await self._engine.connect()
        raw = await self._listener.get_raw_connection()
        await raw.driver_connection.add_listener(  # type: ignore[union-attr]
            outbox.NOTIFY_CHANNEL, lambda *_: self._wake.set()
        )

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
                if not self._paused and await self._pump():
                    continue  # there may be more due right away
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.outbox_poll_seconds)
                except TimeoutError:
                    pass
            except Exception:
                log.exception("outbox relay loop failed; retrying")
                self._listener = None
                await asyncio.sleep(1)

    async def _report_health(self) -> None:
        """Outbox lag and dead letters as gauges, every HEALTH_EVERY_S (one relay per cluster,
        so one series each)."""
        while True:
            try:
                async with self._sessions() as session:
                    lag, dead = await outbox.health(session, utcnow())
                metrics.OUTBOX_LAG.set(lag)
                metrics.OUTBOX_DEAD_LETTERS.set(dead)
                metrics.OUTBOX_CHECKED.set(time.time())
            except Exception:
                log.warning("outbox health not read", exc_info=True)
            await asyncio.sleep(HEALTH_EVERY_S)

    async def _pump(self) -> int:
        """Claim what there is room for and deliver each event on its own task: a slow event
        (a broadcast's expansion) holds its own slot, never the events claimed after it."""
        room = CONCURRENCY - len(self._in_flight)
        if room <= 0:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            return 1  # a slot is free: look again at once
        async with self._sessions() as session:
            batch = await outbox.claim(
                session, limit=min(BATCH, room), lease_seconds=self.settings.outbox_lease_seconds
            )
            await session.commit()
        for event, subscribers in batch:
            task = asyncio.get_running_loop().create_task(self._one(event, subscribers))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(batch)

    async def _one(self, event: outbox.Event, subscribers: list[str]) -> None:
        try:
            remaining, error = await self._deliver(event, subscribers)
            async with self._sessions() as session:
                status = await outbox.settle(
                    session,
                    event,
                    remaining,
                    error,
                    max_attempts=self.settings.outbox_max_attempts,
                    base=self.settings.outbox_backoff_base_seconds,
                    cap=self.settings.outbox_backoff_max_seconds,
                )
                await session.commit()
        except Exception:  # the lease runs out and the event is delivered again
            log.exception("outbox event %d (%s) not settled", event.id, event.topic)
            return
        if status == "delivered":
            self._stats["delivered"] += 1
        elif status == "dead":
            self._stats["dead"] += 1
            log.error("outbox event %d (%s) dead-lettered: %s", event.id, event.topic, error)

    async def _deliver(self, event: outbox.Event, subscribers: list[str]) -> tuple[list[str], str | None]:
        """To every subscriber at once: one slow consumer (notifications) does not hold
        up another (dispatch)."""

        async def one(app: str) -> str | None:
            try:
                handle = self._handles.get(app)
                if handle is None:
                    handle = self._handles[app] = serve.get_deployment_handle(app, app_name=app)
                await asyncio.wait_for(handle.consume.remote(event), timeout=DELIVERY_TIMEOUT_S)
                return None
            except Exception as exc:  # any failure is retried; the reason is kept for ops
                self._stats["failed_attempts"] += 1
                return f"{app}: {type(exc).__name__}: {str(exc)[:300]}"

        errors = dict(zip(subscribers, await asyncio.gather(*(one(app) for app in subscribers)), strict=True))
        remaining = [app for app, error in errors.items() if error is not None]
        return remaining, "; ".join(e for e in errors.values() if e is not None) or None


# ---------------------------------------------------------------- callers' side


def relay() -> ActorHandle:
    """The relay actor (created on first use)."""
    return named(OutboxRelay, RELAY_NAME)
