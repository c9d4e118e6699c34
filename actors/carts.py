"""Cart shards: a fixed set of named, detached Ray actors that hold live carts in memory.

A user's cart lives on shard `shard_index(user_id, N)`, a stable hash (blake2b of the UUID
bytes), so every Serve replica, and every restart, agrees on it. A shard serialises the
operations on one cart (an asyncio lock per user) so concurrent adds are never lost, and
writes every change through to Redis (one JSON key per cart, TTL `cart_ttl_days`, refreshed on
each write) before it replies. After a restart (`max_restarts=-1`) it starts empty and reloads
each cart lazily from Redis on first use: Redis is the truth, memory is a cache that idle carts
leave after `cart_idle_evict_seconds`.

N must stay fixed while carts are live: changing `cart_shards` moves users to other shards,
which is safe only across a full restart (their carts reload from Redis there).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.actor import ActorHandle
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from actors import call, named, shard_index, steady_gc
from config import metrics
from config.settings import Settings, get_settings
from models import carts
from models.carts import (
    AddItem,
    ApplyCoupon,
    CartContext,
    CartState,
    CartView,
    ChooseAddress,
    SetQuantity,
)
from models.db import make_engine, make_redis, make_sessionmaker, utcnow

T = TypeVar("T")


def shard_name(index: int) -> str:
    return f"cart-shard-{index}"


def cart_key(user_id: uuid.UUID) -> str:
    return f"cart:{user_id}"


@dataclass
class _Slot:
    """One user's place in a shard: the cached state, the lock that serialises the user's
    operations, and how many operations are using it (a slot in use is never evicted)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: CartState | None = None
    users: int = 0
    touched: float = 0.0


class ShardStats(carts.Strict):
    index: int
    pid: int  # changes when the actor restarts
    carts_in_memory: int


Mutation = Callable[[CartState, CartContext], CartState]


# Reads and idempotent writes (set, clear, attach/detach, choose) are retried on a restarted
# actor; `add_item` (an increment) and `remove_item` (404 the second time) are not, so a call
# cut short by a crash fails with 503 and the client decides.
RETRY = 3


@ray.remote(num_cpus=0.05, max_restarts=-1, max_task_retries=0)
class CartShard:
    def __init__(self, index: int) -> None:
        self.index = index
        self.settings: Settings = get_settings()
        self._slots: dict[uuid.UUID, _Slot] = {}
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self._redis: Redis | None = None
        self._last_sweep = time.monotonic()
        steady_gc()

    # ------------------------------------------------------------ resources

    def _db(self) -> async_sessionmaker[AsyncSession]:
        if self._sessionmaker is None:
            assert self.settings.database_url, "DATABASE_URL must be set"
            # Small pool: one shard serves a fraction of users and holds a connection only
            # for the reads of one operation.
            engine = make_engine(self.settings.database_url, pool_size=4, max_overflow=4)
            # Reads only, and advisory (checkout re-checks stock in a transaction): autocommit
            # saves the BEGIN/ROLLBACK round trips of every operation.
            engine = engine.execution_options(isolation_level="AUTOCOMMIT")
            self._sessionmaker = make_sessionmaker(engine)
        return self._sessionmaker

    def _kv(self) -> Redis:
        if self._redis is None:
            assert self.settings.redis_url, "REDIS_URL must be set"
            self._redis = make_redis(self.settings.redis_url)
        return self._redis

    # ------------------------------------------------------------ per-user slots

    def _sweep(self, now: float) -> None:
        """Drop idle carts from memory (Redis keeps them)."""
        if now - self._last_sweep < 30:
            return
        self._last_sweep = now
        cutoff = now - self.settings.cart_idle_evict_seconds
        for user_id in [u for u, s in self._slots.items() if s.users == 0 and s.touched < cutoff]:
            del self._slots[user_id]

    @asynccontextmanager
    async def _slot(self, user_id: uuid.UUID) -> AsyncIterator[_Slot]:
        now = time.monotonic()
        self._sweep(now)
        slot = self._slots.get(user_id)
        if slot is None:
            slot = self._slots[user_id] = _Slot()
        slot.users += 1
        try:
            async with slot.lock:
                slot.touched = now
                if slot.state is None:
                    raw = await self._kv().get(cart_key(user_id))
                    slot.state = (
                        CartState.model_validate_json(raw) if raw else carts.empty_cart(user_id, utcnow())
                    )
                yield slot
        finally:
            slot.users -= 1

    async def _save(self, slot: _Slot, state: CartState) -> None:
        """Write through, then cache: the reply goes out only after Redis holds the change."""
        ttl = self.settings.cart_ttl_days * 86_400
        if state.lines or state.coupon_code or state.address_id:
            await self._kv().set(cart_key(state.user_id), state.model_dump_json(), ex=ttl)
        else:
            await self._kv().delete(cart_key(state.user_id))
        slot.state = state

    async def _run(
        self,
        user_id: uuid.UUID,
        change: Mutation | None,
        load: Callable[[AsyncSession, CartState], Awaitable[CartContext]] | None = None,
    ) -> CartView:
        async with self._slot(user_id) as slot:
            state = slot.state
            assert state is not None
            async with self._db()() as session:
                ctx = await (load(session, state) if load else carts.load_context(session, state))
            if change is not None:
                new_state = change(state, ctx)
                await self._save(slot, new_state)
                state = new_state
            return carts.build_view(state, ctx, self.settings, utcnow())

    # ------------------------------------------------------------ operations

    @ray.method(max_task_retries=RETRY)
    async def view(self, user_id: uuid.UUID) -> CartView:
        return await self._run(user_id, None)

    async def add_item(self, user_id: uuid.UUID, body: AddItem) -> CartView:
        async def load(session: AsyncSession, state: CartState) -> CartContext:
            return await carts.load_context(session, state, extra_products=(body.product_id,))

        return await self._run(
            user_id, lambda s, ctx: carts.add_item(s, ctx, body, self.settings, utcnow()), load
        )

    @ray.method(max_task_retries=RETRY)
    async def set_quantity(self, user_id: uuid.UUID, product_id: uuid.UUID, body: SetQuantity) -> CartView:
        return await self._run(
            user_id, lambda s, ctx: carts.set_quantity(s, ctx, product_id, body, self.settings, utcnow())
        )

    async def remove_item(self, user_id: uuid.UUID, product_id: uuid.UUID) -> CartView:
        return await self._run(user_id, lambda s, ctx: carts.remove_item(s, product_id, utcnow()))

    @ray.method(max_task_retries=RETRY)
    async def clear(self, user_id: uuid.UUID) -> CartView:
        """Empty the cart (lines and coupon); the chosen address stays."""

        def change(s: CartState, ctx: CartContext) -> CartState:
            return s.model_copy(update={"lines": [], "coupon_code": None, "updated_at": utcnow()})

        return await self._run(user_id, change)

    @ray.method(max_task_retries=RETRY)
    async def apply_coupon(self, user_id: uuid.UUID, body: ApplyCoupon) -> CartView:
        async def load(session: AsyncSession, state: CartState) -> CartContext:
            return await carts.load_context(session, state, coupon_code=body.code)

        return await self._run(user_id, lambda s, ctx: carts.apply_coupon(s, ctx, body, utcnow()), load)

    @ray.method(max_task_retries=RETRY)
    async def remove_coupon(self, user_id: uuid.UUID) -> CartView:
        return await self._run(user_id, lambda s, ctx: carts.remove_coupon(s, utcnow()))

    @ray.method(max_task_retries=RETRY)
    async def choose_address(self, user_id: uuid.UUID, body: ChooseAddress) -> CartView:
        async def load(session: AsyncSession, state: CartState) -> CartContext:
            return await carts.load_context(session, state, address_id=body.address_id)

        return await self._run(user_id, lambda s, ctx: carts.choose_address(s, ctx, utcnow()), load)

    @ray.method(max_task_retries=RETRY)
    async def snapshot(self, user_id: uuid.UUID) -> CartState:
        """The cart as stored (lines, coupon, address and its version, `updated_at`): what
        checkout prices and orders."""
        async with self._slot(user_id) as slot:
            assert slot.state is not None
            return slot.state

    async def consume(self, user_id: uuid.UUID, ordered: CartState) -> None:
        """Take what an order bought out of the cart. Unchanged since the snapshot: emptied
        (the address stays). Changed meanwhile (an add during checkout): only the ordered
        quantities go, so nothing added later is lost. Not retried: it subtracts."""
        async with self._slot(user_id) as slot:
            state = slot.state
            assert state is not None
            await self._save(slot, carts.consume(state, ordered, utcnow()))

    async def stats(self) -> ShardStats:
        return ShardStats(index=self.index, pid=os.getpid(), carts_in_memory=len(self._slots))


# ---------------------------------------------------------------- callers' side

_shards: list[ActorHandle] | None = None


def cart_shards(settings: Settings | None = None) -> list[ActorHandle]:
    """Handles to the N shard actors, creating any that do not exist yet."""
    global _shards
    if _shards is None:
        n = (settings or get_settings()).cart_shards
        _shards = [named(CartShard, shard_name(i), i) for i in range(n)]
    return _shards


async def get_shard(user_id: uuid.UUID) -> ActorHandle:
    """The shard holding this user's cart. The first call per process looks the actors up (a
    blocking GCS round trip, so off the event loop); later calls are a list index."""
    handles = _shards if _shards is not None else await asyncio.to_thread(cart_shards)
    return handles[shard_index(user_id, len(handles))]


async def call_cart(ref: Any) -> Any:
    """Await a shard call: its AppErrors as themselves, a dead shard as 503 `cart_unavailable`."""
    return await call(
        ref, unavailable="Your cart is briefly unavailable; please retry", code="cart_unavailable"
    )


async def on_shard(user_id: uuid.UUID, method: str, *args: Any) -> CartView:
    """Call one `CartShard` method for this user's cart on the shard that holds it: the
    carts routes' single handle hop."""
    shard = await get_shard(user_id)
    metrics.CART_OPERATIONS.inc(operation=method)
    result: CartView = await call_cart(getattr(shard, method).remote(user_id, *args))
    return result
