"""Fleet shards: a few named, detached actors holding the live side of delivery.

A dark store's partners (shift, latest position, a short trail), its queue of orders waiting
for a partner, its open offers and its trips live together on shard `shard_index(store_id,
N)`, so a store's dispatch round runs in one place, one store at a time, with no lock across
processes. What must not be lost or doubled is in PostgreSQL (partners' shifts, offers,
deliveries; see `models.delivery`) and the latest positions in Redis (written coalesced,
`partner_position_flush_seconds`): a restarted shard (`max_restarts=-1`) rebuilds each store
from both on first use, and its round loop loads every store of the shard at start, so
queued orders are offered again after a crash.

Every change a socket must see goes out on one Redis pub/sub channel (`EVENTS`): the
delivery replicas subscribe once and fan out to the sockets they hold. Replicas batch
positions (one call per shard in flight; what arrives meanwhile is the next batch). On that hot
path nothing crosses a process as a pydantic model: positions go in and acks come back as
plain tuples, and a tracking event is published as the socket message itself, serialized once
here (`tracking_wire`), which every replica forwards as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

import ray
from pydantic import BaseModel
from ray.actor import ActorHandle
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from actors import call, named, routing, shard_index, steady_gc
from config import metrics
from config.settings import Settings, get_settings
from models import delivery, orders
from models.db import make_engine, make_redis, make_sessionmaker, transaction, utcnow
from models.delivery import DISPATCHABLE, PartnerOut, PositionRow, StatusIn
from models.delivery_rules import (
    ACTIVE_DELIVERY,
    Candidate,
    DeliveryActor,
    DeliveryStatus,
    GpsPoint,
    LatLng,
    Offer,
    QueuedOrder,
    TripRoute,
    Vehicle,
    append_trail,
    assignment_round,
    direct_route,
    filter_positions,
    route_etas_s,
)
from models.errors import Conflict
from models.products import Store, StoreNotFound
from models.routing import RoutingProblem, queue_problem, trip_problem, trip_route
from models.users import User

log = logging.getLogger("vurksha.fleet")

EVENTS = "fleet:events"
# A what-if plan covers at most this many of the oldest queued orders (a problem's 2,000 stops).
QUEUE_PLAN_MAX_ORDERS = 1000
D = DeliveryStatus


def shard_name(index: int) -> str:
    return f"fleet-shard-{index}"


def positions_key(store_id: uuid.UUID) -> str:
    """A store's partners' latest positions (a hash: partner id -> row)."""
    return f"fleet:latest:{store_id}"


def trail_key(partner_id: uuid.UUID | str) -> str:
    """A partner's trail (a list of rows, appended as points come, trimmed to its length)."""
    return f"fleet:trail:{partner_id}"


# ---------------------------------------------------------------- what crosses the actor boundary


# A partner's points as a replica received them (socket or REST): (store id, partner id,
# [(lat, lng, ts_s, accuracy_m, speed_mps, heading_deg, battery_pct), ...]).
PositionBatch = tuple[str, str, list[PositionRow]]
# What became of them: (partner id, accepted, late, dropped by reason).
Ack = tuple[str, int, int, dict[str, int]]


class IngestAck(BaseModel):
    partner_id: uuid.UUID
    accepted: int
    late: int
    dropped: dict[str, int]

    @classmethod
    def of(cls, ack: Ack) -> IngestAck:
        partner_id, accepted, late, dropped = ack
        return cls(partner_id=uuid.UUID(partner_id), accepted=accepted, late=late, dropped=dropped)


class PositionOut(BaseModel):
    lat: float
    lng: float
    ts: float
    heading_deg: float | None = None


class PartnerBrief(BaseModel):
    first_name: str | None
    vehicle: Vehicle


class Tracking(BaseModel):
    """What the customer's app shows: the same over REST and on the tracking socket."""

    order_id: uuid.UUID
    order_status: str
    delivery_status: str | None = None
    partner: PartnerBrief | None = None
    position: PositionOut | None = None
    eta_s: int | None = None
    pin: str | None = None  # shown once the partner has arrived


class BoardPartner(BaseModel):
    id: uuid.UUID
    first_name: str | None
    vehicle: Vehicle
    state: str  # offline, idle, offered, assigned
    position: PositionOut | None
    trail: list[PositionOut]
    orders: list[uuid.UUID]


class BoardOrder(BaseModel):
    id: uuid.UUID
    drop: PositionOut
    waiting_s: float
    state: str  # queued, offered, assigned, ...
    partner_id: uuid.UUID | None = None


class Board(BaseModel):
    store_id: uuid.UUID
    store: PositionOut
    partners: list[BoardPartner]
    orders: list[BoardOrder]


# ---------------------------------------------------------------- the live view


@dataclass
class LivePartner:
    id: uuid.UUID
    first_name: str | None
    vehicle: Vehicle
    online: bool
    latest: GpsPoint | None = None
    trail: tuple[GpsPoint, ...] = ()
    unsaved: list[GpsPoint] = field(default_factory=list)  # trail points not yet in Redis
    offer_id: uuid.UUID | None = None
    trip: list[uuid.UUID] = field(default_factory=list)  # order ids, drop order

    @classmethod
    def of(cls, partner: delivery.Partner, name: str | None) -> LivePartner:
        first_name = name.split()[0] if name and name.split() else None
        return cls(partner.user_id, first_name, Vehicle(partner.vehicle), partner.online)

    @property
    def state(self) -> str:
        if self.trip:
            return "assigned"
        if self.offer_id is not None:
            return "offered"
        return "idle" if self.online else "offline"


@dataclass
class LiveOrder:
    id: uuid.UUID
    user_id: uuid.UUID
    drop: LatLng
    queued_at_s: float
    status: str  # the order's status as last seen
    excluded: set[uuid.UUID] = field(default_factory=set)  # partners who declined or let it expire
    offer_id: uuid.UUID | None = None
    delivery_id: uuid.UUID | None = None
    delivery_status: str | None = None
    partner_id: uuid.UUID | None = None
    pin: str | None = None

    @classmethod
    def of(cls, order: orders.Order, queued_at_s: float) -> LiveOrder:
        drop = order.delivery_address
        return cls(order.id, order.user_id, LatLng(drop["lat"], drop["lng"]), queued_at_s, order.status)


@dataclass
class LiveOffer:
    id: uuid.UUID
    partner_id: uuid.UUID
    order_ids: list[uuid.UUID]
    expires_at: datetime


@dataclass
class LiveStore:
    id: uuid.UUID
    at: LatLng
    partners: dict[uuid.UUID, LivePartner] = field(default_factory=dict)
    orders: dict[uuid.UUID, LiveOrder] = field(default_factory=dict)
    offers: dict[uuid.UUID, LiveOffer] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty_positions: set[uuid.UUID] = field(default_factory=set)


def _point(row: Sequence[Any]) -> GpsPoint:
    lat, lng, ts, acc, speed, heading, battery = row
    return GpsPoint(lat, lng, ts, acc, speed, heading, battery)


def _position(p: GpsPoint | None) -> PositionOut | None:
    return None if p is None else PositionOut(lat=p.lat, lng=p.lng, ts=p.ts_s, heading_deg=p.heading_deg)


@ray.remote(num_cpus=0.05, max_restarts=-1, max_task_retries=0)
class FleetShard:
    def __init__(self, index: int, shards: int) -> None:
        self.index, self.shards = index, shards
        self.settings: Settings = get_settings()
        self._stores: dict[uuid.UUID, LiveStore] = {}
        self._loading: dict[uuid.UUID, asyncio.Lock] = {}
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self._redis: Redis | None = None
        self.dropped: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[Any]] = []
        self._outgoing: list[str] = []
        self._has_outgoing = asyncio.Event()
        self._optimizer_retry_at = 0.0

    # ------------------------------------------------------------ resources

    def _db(self) -> async_sessionmaker[AsyncSession]:
        if self._sessionmaker is None:
            assert self.settings.database_url, "DATABASE_URL must be set"
            engine = make_engine(self.settings.database_url, pool_size=4, max_overflow=4)
            self._sessionmaker = make_sessionmaker(engine)
        return self._sessionmaker

    def _kv(self) -> Redis:
        if self._redis is None:
            assert self.settings.redis_url, "REDIS_URL must be set"
            self._redis = make_redis(self.settings.redis_url)
        return self._redis

    def _tx(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One transaction per actor call, like a request (a counted wrong PIN still commits)."""
        return transaction(self._db())

    def _publish(self, store: LiveStore, *events: dict[str, Any] | str) -> None:
        """Tell the delivery replicas (one Redis channel; each keeps what its sockets watch):
        events as JSON with their store, tracking events already on the wire. Queued, and sent
        in order by one task (`_publisher`): a caller does not wait for Redis, and a late
        position never overtakes the delivery's final event."""
        for event in events:
            if isinstance(event, dict):
                event = json.dumps({**event, "store_id": store.id}, default=str)
            self._outgoing.append(event)
        if self._outgoing:
            self._has_outgoing.set()

    async def _publisher(self) -> None:
        while True:
            await self._has_outgoing.wait()
            self._has_outgoing.clear()
            events, self._outgoing = self._outgoing, []
            try:
                async with self._kv().pipeline(transaction=False) as pipe:
                    for event in events:
                        pipe.publish(EVENTS, event)
                    await pipe.execute()
            except Exception:  # Redis briefly away: sockets see the next change (or resync)
                log.warning("fleet shard %d: %d live events lost", self.index, len(events), exc_info=True)

    def _start(self) -> None:
        """The background loops, started by the first call (an actor's __init__ has no loop)."""
        if not self._tasks:
            steady_gc()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._rounds()),
                loop.create_task(self._flush_positions()),
                loop.create_task(self._publisher()),
                # Dispatch's first batched trip should not wait for the handle's set-up.
                loop.create_task(routing.warm_up()),
            ]

    # ------------------------------------------------------------ loading a store

    async def _store(self, store_id: uuid.UUID) -> LiveStore:
        self._start()
        store = self._stores.get(store_id)
        if store is not None:
            return store
        lock = self._loading.setdefault(store_id, asyncio.Lock())
        try:
            async with lock:
                if store_id not in self._stores:
                    self._stores[store_id] = await self._load(store_id)
        finally:
            # Only while loading: an id that is no store (404) must not leave a lock behind.
            self._loading.pop(store_id, None)
        return self._stores[store_id]

    async def _load(self, store_id: uuid.UUID) -> LiveStore:
        """Rebuild a store's live view from PostgreSQL (partners, queue, offers, trips) and
        Redis (latest positions)."""
        async with self._tx() as s:
            row = (await s.execute(select(Store.lat, Store.lng).where(Store.id == store_id))).one_or_none()
            if row is None:
                raise StoreNotFound("No such store")
            store = LiveStore(store_id, LatLng(row.lat, row.lng))
            partners = await s.execute(
                select(delivery.Partner, User.name)
                .join(User, User.id == delivery.Partner.user_id)
                .where(
                    delivery.Partner.store_id == store_id,
                    delivery.Partner.suspended_at.is_(None),
                    User.role == "partner",
                    User.is_active,
                )
            )
            for p, name in partners.all():
                store.partners[p.user_id] = LivePartner.of(p, name)
            queued = await s.scalars(
                select(orders.Order).where(
                    orders.Order.store_id == store_id,
                    orders.Order.status.in_(DISPATCHABLE),
                    ~delivery.ORDER_CARRIED,
                )
            )
            for o in queued:
                store.orders[o.id] = LiveOrder.of(o, o.updated_at.timestamp())
            for offer in await s.scalars(
                select(delivery.DeliveryOffer).where(
                    delivery.DeliveryOffer.store_id == store_id, delivery.DeliveryOffer.status != "accepted"
                )
            ):
                self._remember_offer(store, offer)
            trips = await s.execute(
                select(delivery.Delivery, orders.Order)
                .join(orders.Order, orders.Order.id == delivery.Delivery.order_id)
                .where(delivery.Delivery.store_id == store_id, delivery.ACTIVE)
                .order_by(delivery.Delivery.created_at, delivery.Delivery.seq)
            )
            for d, o in trips.all():
                self._remember_delivery(store, d, o)
        latest = {
            pid: saved
            for pid, saved in (await self._kv().hgetall(positions_key(store_id))).items()
            if uuid.UUID(str(pid)) in store.partners
        }
        async with self._kv().pipeline(transaction=False) as pipe:
            for pid in latest:
                pipe.lrange(trail_key(str(pid)), 0, -1)
            trails = await pipe.execute()
        for (pid, saved), trail in zip(latest.items(), trails, strict=True):
            partner = store.partners[uuid.UUID(str(pid))]
            partner.latest = _point(json.loads(saved))
            points = [_point(json.loads(p)) for p in trail]
            partner.trail = append_trail((), points, max_len=self.settings.partner_trail_length)
        log.info(
            "fleet shard %d loaded store %s: %d partners, %d orders, %d open offers",
            self.index,
            store_id,
            len(store.partners),
            len(store.orders),
            len(store.offers),
        )
        return store

    def _remember_offer(self, store: LiveStore, offer: delivery.DeliveryOffer) -> None:
        """An offer as the live view needs it: open ones hold their orders and partner; a
        declined or expired one only excludes its partner from its orders."""
        for oid in offer.order_ids:
            order = store.orders.get(oid)
            if order is None:
                continue
            if offer.status == "open":
                order.offer_id = offer.id
            elif offer.status in ("declined", "expired"):
                order.excluded.add(offer.partner_id)
        if offer.status == "open":
            store.offers[offer.id] = LiveOffer(
                offer.id, offer.partner_id, list(offer.order_ids), offer.expires_at
            )
            if (partner := store.partners.get(offer.partner_id)) is not None:
                partner.offer_id = offer.id

    def _remember_delivery(self, store: LiveStore, d: delivery.Delivery, o: orders.Order) -> None:
        order = store.orders.get(o.id) or LiveOrder.of(o, time.time())
        store.orders[o.id] = order
        order.status, order.offer_id = o.status, None
        order.delivery_id, order.delivery_status, order.partner_id, order.pin = (
            d.id,
            d.status,
            d.partner_id,
            d.pin,
        )
        partner = store.partners.get(d.partner_id)
        if partner is not None and o.id not in partner.trip:
            partner.trip.append(o.id)

    # ------------------------------------------------------------ what the store's people do

    async def enqueue(self, store_id: uuid.UUID, order_id: uuid.UUID) -> bool:
        """An order became dispatchable (confirmed): queue it for the next round. Idempotent."""
        store = await self._store(store_id)
        async with store.lock:
            if order_id in store.orders:
                return False
            async with self._tx() as s:
                row = (
                    await s.execute(
                        select(orders.Order).where(
                            orders.Order.id == order_id, orders.Order.status.in_(DISPATCHABLE)
                        )
                    )
                ).scalar_one_or_none()
                if row is None:
                    return False
                store.orders[order_id] = LiveOrder.of(row, time.time())
        return True

    async def order_changed(self, store_id: uuid.UUID, order_id: uuid.UUID, status: str) -> None:
        """The order moved (packed, cancelled, ...): keep the live view in step; a cancelled
        order leaves the queue, its offer is recalled and its delivery (before pickup) ends."""
        store = await self._store(store_id)
        async with store.lock:
            order = store.orders.get(order_id)
            if order is None:
                return
            order.status = status
            if status != orders.Status.cancelled:
                self._publish_tracking(store, order)
                return
            events: list[dict[str, Any] | str] = []
            if order.offer_id is not None:
                events += await self._close_offers(store, [order.offer_id], "recalled")
            async with self._tx() as s:
                cancelled = await delivery.cancel_for_order(s, order_id, utcnow())
            if cancelled is not None:
                partner = store.partners.get(cancelled.partner_id)
                if partner is not None and order_id in partner.trip:
                    partner.trip.remove(order_id)
                    events.append({"type": "trip", "partner_id": cancelled.partner_id})
            store.orders.pop(order_id, None)
            events.append(self._tracking_event(store, order, final=True))
            self._publish(store, *events)

    async def shift(self, store_id: uuid.UUID, partner_id: uuid.UUID, online: bool) -> PartnerOut:
        """The partner goes online or offline (refused with an active delivery); offline
        recalls an open offer."""
        store = await self._store(store_id)
        async with store.lock:
            async with self._tx() as s:
                partner_row = await delivery.get_partner(s, partner_id, lock=True)
                await delivery.set_online(s, partner_row, online, utcnow())
                name = await s.scalar(select(User.name).where(User.id == partner_id))
                out = delivery.partner_out(partner_row)
            live = store.partners.get(partner_id)
            if live is None:
                live = store.partners[partner_id] = LivePartner.of(partner_row, name)
            live.online = online
            if not online and live.offer_id is not None:
                self._publish(store, *await self._close_offers(store, [live.offer_id], "recalled"))
            return out

    async def suspended(self, store_id: uuid.UUID, partner_id: uuid.UUID) -> None:
        """Ops suspended the partner (already written): recall the open offer, forget them,
        and close their sockets."""
        store = await self._store(store_id)
        async with store.lock:
            live = store.partners.pop(partner_id, None)
            events = [{"type": "kick", "partner_id": partner_id, "reason": "suspended"}]
            if live is not None and live.offer_id is not None:
                events = await self._close_offers(store, [live.offer_id], "recalled") + events
            self._publish(store, *events)

    async def reinstated(self, store_id: uuid.UUID, partner_id: uuid.UUID) -> None:
        store = await self._store(store_id)
        async with store.lock, self._tx() as s:
            row = (
                await s.execute(
                    select(delivery.Partner, User.name)
                    .join(User, User.id == delivery.Partner.user_id)
                    .where(delivery.Partner.user_id == partner_id)
                )
            ).one()
            store.partners[partner_id] = LivePartner.of(row.Partner, row.name)

    async def answer(
        self, store_id: uuid.UUID, partner_id: uuid.UUID, offer_id: uuid.UUID, accept: bool
    ) -> None:
        """The partner accepts or declines an offer (the database decides whether in time and
        whether the orders are still theirs to take)."""
        store = await self._store(store_id)
        async with store.lock:
            try:
                async with self._tx() as s:
                    offer, deliveries = await delivery.answer_offer(s, offer_id, partner_id, accept, utcnow())
                    await delivery.answered(s, partner_id, utcnow())
                    rows = {
                        o.id: o
                        for o in await s.scalars(
                            select(orders.Order).where(orders.Order.id.in_(offer.order_ids))
                        )
                    }
            except (delivery.OfferClosed, delivery.OrderTaken):
                # Someone else's round or a recall got there first: the live view follows the database.
                self._stores.pop(store_id, None)
                raise
            store.offers.pop(offer_id, None)
            metrics.OFFERS.inc(outcome="accepted" if accept else "declined")
            live = store.partners.get(partner_id)
            if live is not None:
                live.offer_id = None
            now_s = time.time()
            for oid in offer.order_ids:
                order = store.orders.get(oid)
                if order is not None:
                    order.offer_id = None
                    if not accept:
                        order.excluded.add(partner_id)
                    else:
                        metrics.DISPATCH_WAIT.observe(max(0.0, now_s - order.queued_at_s))
            for d in deliveries:
                self._remember_delivery(store, d, rows[d.order_id])
            events: list[dict[str, Any] | str] = [{"type": "trip", "partner_id": partner_id}]
            events += [self._tracking_event(store, store.orders[d.order_id]) for d in deliveries]
            self._publish(store, *events)

    async def advance(
        self,
        store_id: uuid.UUID,
        delivery_id: uuid.UUID,
        body: StatusIn,
        actor: DeliveryActor,
        actor_user_id: uuid.UUID | None,
    ) -> delivery.DeliveryOut:
        """Move a delivery (see `models.delivery.advance`) and show it to its customer; an
        ended delivery leaves the partner's trip."""
        store = await self._store(store_id)
        async with store.lock:
            async with self._tx() as s:
                d, order = await delivery.advance(
                    s, delivery_id, body, actor=actor, actor_user_id=actor_user_id, now=utcnow()
                )
                out = await delivery.delivery_view(s, d.id)
            self._remember_delivery(store, d, order)
            live = store.orders[order.id]
            ended = DeliveryStatus(d.status) not in ACTIVE_DELIVERY
            events: list[dict[str, Any] | str] = [self._tracking_event(store, live, final=ended)]
            if ended:
                store.orders.pop(order.id, None)
                partner = store.partners.get(d.partner_id)
                if partner is not None and order.id in partner.trip:
                    partner.trip.remove(order.id)
                events.append({"type": "trip", "partner_id": d.partner_id})
            self._publish(store, *events)
            return out

    # ------------------------------------------------------------ positions

    async def ingest(self, batches: list[PositionBatch]) -> list[Ack]:
        """Points from a replica's coalescing window, several partners at once: filtered
        (Traccar's rules), the latest kept as the live position, the rest on the trail; the
        customers of the partner's trip see the new position and ETA."""
        now_s = time.time()
        acks: list[Ack] = []
        events: dict[uuid.UUID, list[dict[str, Any] | str]] = {}
        for store_id, partner_id, points in batches:
            store = await self._store(uuid.UUID(store_id))
            partner = store.partners.get(uuid.UUID(partner_id))
            if partner is None:
                acks.append((partner_id, 0, 0, {"unknown_partner": len(points)}))
                _count_positions(0, {"unknown_partner": len(points)})
                continue
            result = filter_positions(
                [_point(p) for p in points], latest=partner.latest, now_s=now_s, settings=self.settings
            )
            partner.latest = result.latest
            partner.trail = append_trail(
                partner.trail, result.kept, max_len=self.settings.partner_trail_length
            )
            dropped = {str(reason): n for reason, n in result.dropped.items() if n}
            self.dropped.update(dropped)
            _count_positions(len(result.kept), dropped)
            if result.kept:
                partner.unsaved += result.kept
                store.dirty_positions.add(partner.id)
                # Boards redraw on any event of their store: say that its partners moved.
                moved = events.setdefault(store.id, [{"type": "positions"}])
                if result.moved:
                    trip = [store.orders[oid] for oid in partner.trip if oid in store.orders]
                    moved += [self._tracking_event(store, order) for order in trip]
            acks.append((partner_id, len(result.kept), result.late, dropped))
        for moved_store, store_events in events.items():
            self._publish(self._stores[moved_store], *store_events)
        return acks

    async def _flush_positions(self) -> None:
        """Write the latest positions (and trails) to Redis, coalesced: a restart loses at most
        one interval of movement, never a shift."""
        while True:
            await asyncio.sleep(self.settings.partner_position_flush_seconds)
            for store in list(self._stores.values()):
                if not store.dirty_positions:
                    continue
                dirty, store.dirty_positions = store.dirty_positions, set()
                keep = self.settings.partner_trail_length
                saving = [p for pid in dirty if (p := store.partners.get(pid)) is not None and p.latest]
                if not saving:  # HSET needs at least one field
                    continue
                try:
                    async with self._kv().pipeline(transaction=False) as pipe:
                        pipe.hset(
                            positions_key(store.id),
                            mapping={str(p.id): json.dumps(_row(p.latest)) for p in saving if p.latest},
                        )
                        for p in saving:
                            if p.unsaved:
                                pipe.rpush(trail_key(p.id), *(json.dumps(_row(q)) for q in p.unsaved[-keep:]))
                                pipe.ltrim(trail_key(p.id), -keep, -1)
                        await pipe.execute()
                    for p in saving:
                        p.unsaved.clear()
                except Exception:  # Redis briefly away: try again next time
                    store.dirty_positions |= dirty
                    log.warning("fleet shard %d: saving positions failed", self.index, exc_info=True)

    # ------------------------------------------------------------ what customers and ops see

    def _tracking(self, store: LiveStore, order: LiveOrder) -> Tracking:
        tracking = Tracking(
            order_id=order.id, order_status=order.status, delivery_status=order.delivery_status
        )
        partner = store.partners.get(order.partner_id) if order.partner_id else None
        if partner is None or order.delivery_status is None:
            return tracking
        tracking.partner = PartnerBrief(first_name=partner.first_name, vehicle=partner.vehicle)
        tracking.position = _position(partner.latest)
        if order.delivery_status == D.arrived:
            tracking.pin = order.pin
        if partner.latest is not None and DeliveryStatus(order.delivery_status) in ACTIVE_DELIVERY:
            # Still to pick up: via the store; on the road: the trip's drops in order up to this one.
            stops = [] if order.delivery_status in (D.picked_up, D.arrived) else [store.at]
            for oid in partner.trip:
                stop = store.orders.get(oid)
                if stop is not None and stop.delivery_status in (
                    D.assigned,
                    D.at_store,
                    D.picked_up,
                    D.arrived,
                ):
                    stops.append(stop.drop)
                if oid == order.id:
                    break
            if order.delivery_status == D.arrived:
                tracking.eta_s = 0
            else:
                etas = route_etas_s(partner.latest.latlng, stops, partner.vehicle, self.settings)
                tracking.eta_s = int(etas[-1]) if etas else None
        return tracking

    def _tracking_event(self, store: LiveStore, order: LiveOrder, final: bool = False) -> str:
        return tracking_wire(store.id, order.id, final, self._tracking(store, order))

    def _publish_tracking(self, store: LiveStore, order: LiveOrder) -> None:
        self._publish(store, self._tracking_event(store, order))

    async def tracking(self, store_id: uuid.UUID, order_id: uuid.UUID, order_status: str) -> Tracking:
        """The live tracking snapshot of an order (the caller checked it is the customer's)."""
        store = await self._store(store_id)
        order = store.orders.get(order_id)
        if order is None:  # not in the live view: waiting to be confirmed, or over
            return Tracking(order_id=order_id, order_status=order_status)
        return self._tracking(store, order)

    async def board(self, store_id: uuid.UUID) -> Board:
        """The store's live board: partners with positions and trails, orders with their state."""
        store = await self._store(store_id)
        now_s = time.time()
        partners = [
            BoardPartner(
                id=p.id,
                first_name=p.first_name,
                vehicle=p.vehicle,
                state=p.state,
                position=_position(p.latest),
                trail=[q for q in map(_position, p.trail) if q is not None],
                orders=list(p.trip)
                or (store.offers[p.offer_id].order_ids if p.offer_id in store.offers else []),
            )
            for p in store.partners.values()
        ]
        board_orders = [
            BoardOrder(
                id=o.id,
                drop=PositionOut(lat=o.drop.lat, lng=o.drop.lng, ts=o.queued_at_s),
                waiting_s=max(0.0, now_s - o.queued_at_s),
                state=o.delivery_status or ("offered" if o.offer_id else "queued"),
                partner_id=o.partner_id
                or (store.offers[o.offer_id].partner_id if o.offer_id in store.offers else None),
            )
            for o in store.orders.values()
        ]
        return Board(
            store_id=store.id,
            store=PositionOut(lat=store.at.lat, lng=store.at.lng, ts=now_s),
            partners=partners,
            orders=board_orders,
        )

    # ------------------------------------------------------------ dispatch rounds

    async def _rounds(self) -> None:
        """Every `delivery_round_seconds`: every store of the shard expires its overdue offers
        and offers its queue to its partners, one store at a time."""
        await self._load_all()
        while True:
            await asyncio.sleep(self.settings.delivery_round_seconds)
            for store in list(self._stores.values()):
                try:
                    async with store.lock:
                        await self._round(store)
                except Exception:
                    log.exception("fleet shard %d: round for store %s failed", self.index, store.id)

    async def _load_all(self) -> None:
        """Load every active store of this shard, so orders queued before a restart are
        offered again without waiting for someone to touch their store."""
        try:
            async with self._tx() as s:
                ids = list(await s.scalars(select(Store.id).where(Store.is_active)))
            for store_id in ids:
                if shard_index(store_id, self.shards) == self.index:
                    await self._store(store_id)
        except Exception:
            log.exception("fleet shard %d: loading stores failed", self.index)

    async def round_now(self, store_id: uuid.UUID) -> int:
        """Run the store's round at once (tests, ops); returns the offers made."""
        store = await self._store(store_id)
        async with store.lock:
            return await self._round(store)

    async def _round(self, store: LiveStore) -> int:
        now = utcnow()
        overdue = [o.id for o in store.offers.values() if o.expires_at <= now]
        events = await self._close_offers(store, overdue, "expired") if overdue else []
        queued = [
            QueuedOrder(o.id, store.at, o.drop, o.queued_at_s)
            for o in store.orders.values()
            if o.offer_id is None and o.delivery_id is None
        ]
        idle = [
            Candidate(
                p.id,
                p.latest.latlng,
                p.latest.ts_s,
                p.vehicle,
                frozenset(o.id for o in store.orders.values() if p.id in o.excluded),
            )
            for p in store.partners.values()
            if p.state == "idle" and p.latest is not None
        ]
        made = 0
        expires_at = now + timedelta(seconds=self.settings.partner_offer_expiry_seconds)
        offers = assignment_round(queued, idle, now_s=now.timestamp(), settings=self.settings)
        routes = await self._trip_routes(store, offers, {c.id: c for c in idle})
        for offer, route in zip(offers, routes, strict=True):
            async with self._tx() as s:
                row = await delivery.create_offer(s, store.id, offer.partner_id, route, now, expires_at)
            if row is None:  # the database says no (an order moved on): the next round sees it
                self._stores.pop(store.id, None)
                break
            self._remember_offer(store, row)
            made += 1
            events.append(
                {
                    "type": "offer",
                    "partner_id": offer.partner_id,
                    "offer": delivery.OfferOut.model_validate(row, from_attributes=True).model_dump(
                        mode="json"
                    ),
                    "pickup_eta_s": int(offer.cost_s),
                }
            )
        self._publish(store, *events)
        return made

    async def _trip_routes(
        self, store: LiveStore, offers: Sequence[Offer], partners: dict[uuid.UUID, Candidate]
    ) -> list[TripRoute]:
        """Each offer's drop order and planned ETAs: a batched trip's from the route optimizer
        (an open route from the partner through the store), all trips of the round asked at
        once; nearest-neighbour order, with the reason recorded on the offer, when it fails
        or does not answer within `delivery_trip_route_timeout_seconds` (and for
        `delivery_trip_route_retry_seconds` after, so a round never waits on it twice)."""
        settings = self.settings
        drops = [[(oid, store.orders[oid].drop) for oid in offer.order_ids] for offer in offers]
        routes = [
            direct_route(
                partners[o.partner_id].position, store.at, d, partners[o.partner_id].vehicle, settings
            )
            for o, d in zip(offers, drops, strict=True)
        ]
        batched = [i for i, o in enumerate(offers) if len(o.order_ids) > 1]
        if not batched:
            return routes
        fallback = "optimizer_unavailable"
        if time.monotonic() >= self._optimizer_retry_at:
            problems = [
                trip_problem(
                    partners[offers[i].partner_id].position,
                    store.at,
                    drops[i],
                    partners[offers[i].partner_id].vehicle,
                    settings,
                )
                for i in batched
            ]
            try:
                handle = await routing.optimizer()
                async with asyncio.timeout(settings.delivery_trip_route_timeout_seconds):
                    solutions = await asyncio.gather(
                        *(
                            handle.solve.remote(p, settings.delivery_trip_route_time_limit_seconds)
                            for p in problems
                        )
                    )
            except TimeoutError:
                fallback = "optimizer_late"
            except Exception:
                log.warning("fleet shard %d: the route optimizer failed", self.index, exc_info=True)
            else:
                for i, solution in zip(batched, solutions, strict=True):
                    routes[i] = trip_route(solution) or replace(routes[i], fallback="optimizer_dropped_stops")
                return routes
            self._optimizer_retry_at = time.monotonic() + settings.delivery_trip_route_retry_seconds
            log.warning("fleet shard %d: %s, trips in nearest-neighbour order", self.index, fallback)
        for i in batched:
            routes[i] = replace(routes[i], fallback=fallback)
        return routes

    async def queue_problem(self, store_id: uuid.UUID) -> RoutingProblem:
        """The store's queue (orders not yet offered, oldest first, at most
        `QUEUE_PLAN_MAX_ORDERS`) over its idle partners with a position, as a routing problem
        (a what-if for ops: nothing is offered)."""
        store = await self._store(store_id)
        queued = sorted(
            (o for o in store.orders.values() if o.offer_id is None and o.delivery_id is None),
            key=lambda o: o.queued_at_s,
        )[:QUEUE_PLAN_MAX_ORDERS]
        partners = [
            (str(p.id), p.latest.latlng, p.vehicle)
            for p in store.partners.values()
            if p.state == "idle" and p.latest is not None
        ]
        if not partners:
            raise Conflict(
                "The store has no idle partner with a position to plan for", code="no_idle_partners"
            )
        return queue_problem(store.at, partners, [(str(o.id), o.drop) for o in queued], self.settings)

    async def _close_offers(
        self, store: LiveStore, ids: list[uuid.UUID], status: Literal["expired", "recalled"]
    ) -> list[dict[str, Any]]:
        """Expire or recall open offers: their orders go back to the queue (an expired one
        never again to the same partner), and the partner's third expiry in a row sets them
        offline."""
        now = utcnow()
        async with self._tx() as s:
            closed = await delivery.close_offers(s, status, now, ids=ids)
            offline = {
                o.partner_id: await delivery.note_expiry(
                    s, o.partner_id, self.settings.partner_expiries_before_offline, now
                )
                for o in closed
                if status == "expired"
            }
        events: list[dict[str, Any]] = []
        for offer in closed:
            metrics.OFFERS.inc(outcome=status)
            store.offers.pop(offer.id, None)
            partner = store.partners.get(offer.partner_id)
            if partner is not None and partner.offer_id == offer.id:
                partner.offer_id = None
                if offline.get(offer.partner_id):
                    partner.online = False
            for oid in offer.order_ids:
                order = store.orders.get(oid)
                if order is not None and order.offer_id == offer.id:
                    order.offer_id = None
                    if status == "expired":
                        order.excluded.add(offer.partner_id)
            events.append(
                {
                    "type": "offer_closed",
                    "partner_id": offer.partner_id,
                    "offer_id": offer.id,
                    "status": status,
                    "offline": bool(offline.get(offer.partner_id)),
                }
            )
        return events

    async def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": os.getpid(),
            "stores": len(self._stores),
            "partners": sum(len(s.partners) for s in self._stores.values()),
            "dropped": dict(self.dropped),
        }


def tracking_wire(store_id: uuid.UUID, order_id: uuid.UUID, final: bool, tracking: Tracking) -> str:
    """A tracking event as published: a header line the replicas route by (`read_tracking`),
    with when it was made (for the tracking latency metric), then the customer socket's
    message (`TrackingMsg` in `deployments.live`)."""
    message = f'{{"type":"tracking","tracking":{tracking.model_dump_json()}}}'
    return f"tracking {order_id} {store_id} {int(final)} {time.time():.3f}\n{message}"


def read_tracking(data: str) -> tuple[uuid.UUID, uuid.UUID, bool, float, str]:
    """(order id, store id, final, epoch seconds when made, the socket message) of a
    published tracking event."""
    head, message = data.split("\n", 1)
    _, order_id, store_id, final, made_s = head.split(" ")
    return uuid.UUID(order_id), uuid.UUID(store_id), final == "1", float(made_s), message


def _row(p: GpsPoint) -> list[float | None]:
    return [p.lat, p.lng, p.ts_s, p.accuracy_m, p.speed_mps, p.heading_deg, p.battery_pct]


# ---------------------------------------------------------------- callers' side

_shards: list[ActorHandle] | None = None


def fleet_shards(settings: Settings | None = None) -> list[ActorHandle]:
    """Handles to the N fleet shards, creating any that do not exist yet."""
    global _shards
    if _shards is None:
        n = (settings or get_settings()).fleet_shards
        _shards = [named(FleetShard, shard_name(i), i, n) for i in range(n)]
    return _shards


async def shard_for(store_id: uuid.UUID) -> ActorHandle:
    handles = _shards if _shards is not None else await asyncio.to_thread(fleet_shards)
    return handles[shard_index(store_id, len(handles))]


def _count_positions(kept: int, dropped: dict[str, int]) -> None:
    if kept:
        metrics.POSITIONS.inc(kept, outcome="kept")
    for reason, n in dropped.items():
        metrics.POSITIONS.inc(n, outcome=reason)


async def ingest(batches: list[PositionBatch]) -> list[Ack]:
    """Hand a replica's batched positions to their shards: one call per shard."""
    handles = _shards if _shards is not None else await asyncio.to_thread(fleet_shards)
    by_shard: dict[int, list[PositionBatch]] = {}
    for batch in batches:
        by_shard.setdefault(shard_index(uuid.UUID(batch[0]), len(handles)), []).append(batch)
    replies = await asyncio.gather(
        *(
            call(
                handles[i].ingest.remote(group),
                unavailable="Delivery is briefly unavailable; please retry",
                code="fleet_unavailable",
            )
            for i, group in by_shard.items()
        )
    )
    return [ack for reply in replies for ack in reply]


async def on_fleet(store_id: uuid.UUID, method: str, *args: Any) -> Any:
    """Call one `FleetShard` method on the shard holding `store_id`: the single hop."""
    shard = await shard_for(store_id)
    return await call(
        getattr(shard, method).remote(store_id, *args),
        unavailable="Delivery is briefly unavailable; please retry",
        code="fleet_unavailable",
    )
