"""Delivery rules (pure: no I/O, no Ray, no HTTP). What the fleet shards, the delivery routes
and the sockets build on:

- a partner's shift (`offline -> idle -> offered -> assigned -> idle`) and who moves it;
- a delivery's lifecycle (`assigned -> at_store -> picked_up -> arrived -> delivered`, with
  `failed -> returned` and `cancelled`), checked like `models.orders.check_transition`;
- the GPS ingest filter (Traccar's filters: invalid, future, accuracy, speed, min period);
- distances and ETAs (haversine, a road factor and a speed per vehicle);
- a store's dispatch round: trips (batched orders) matched to partners at once with
  `scipy.optimize.linear_sum_assignment`.

Times are floats of seconds since the Unix epoch (`*_s`), distances metres (`*_m`).
Every threshold is a setting (`partner_*`, `delivery_*` in `config.settings`).
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from config.settings import Settings
from models.errors import Conflict, Forbidden
from models.orders import InvalidTransition
from models.orders import Status as OrderStatus

# ---------------------------------------------------------------- partner shifts


class ShiftState(enum.StrEnum):
    offline = "offline"
    idle = "idle"  # online, waiting for an offer
    offered = "offered"  # holds one open offer
    assigned = "assigned"  # on a trip


class ShiftEvent(enum.StrEnum):
    go_online = "go_online"
    go_offline = "go_offline"
    offer = "offer"
    accept = "accept"
    decline = "decline"
    expire = "expire"
    # The offer is withdrawn (order cancelled, taken elsewhere, partner suspended).
    recall = "recall"
    # The trip is over: every delivery in it delivered, returned or cancelled.
    finish = "finish"


ShiftActor = Literal["partner", "ops", "system"]

SS, SE = ShiftState, ShiftEvent
SHIFT_TRANSITIONS: dict[ShiftState, dict[ShiftEvent, ShiftState]] = {
    # Going online or offline twice is a no-op, not an error: apps retry after a lost reply.
    SS.offline: {SE.go_online: SS.idle, SE.go_offline: SS.offline},
    SS.idle: {SE.go_online: SS.idle, SE.go_offline: SS.offline, SE.offer: SS.offered},
    SS.offered: {
        SE.go_online: SS.offered,
        # Whoever sets an offered partner offline also recalls the offer.
        SE.go_offline: SS.offline,
        SE.accept: SS.assigned,
        SE.decline: SS.idle,
        SE.expire: SS.idle,
        SE.recall: SS.idle,
    },
    # go_offline is missing on purpose: see ActiveDelivery.
    SS.assigned: {SE.go_online: SS.assigned, SE.finish: SS.idle},
}
SHIFT_EVENT_ACTORS: dict[ShiftEvent, frozenset[str]] = {
    SE.go_online: frozenset({"partner"}),
    SE.go_offline: frozenset({"partner", "ops", "system"}),
    SE.offer: frozenset({"system"}),
    SE.accept: frozenset({"partner"}),
    SE.decline: frozenset({"partner"}),
    SE.expire: frozenset({"system"}),
    SE.recall: frozenset({"system", "ops"}),
    SE.finish: frozenset({"system"}),
}


class ActiveDelivery(Conflict):
    """A partner carrying orders cannot leave: the trip is ended (or reassigned by ops) first."""

    code = "active_delivery"


@dataclass(frozen=True, slots=True)
class Shift:
    state: ShiftState = ShiftState.offline
    # Offers that expired unanswered since the partner last answered or came online.
    expiries_in_a_row: int = 0


def shift_transition(shift: Shift, event: ShiftEvent, actor: ShiftActor, *, settings: Settings) -> Shift:
    """The partner's shift after `event` asked by `actor`, or raise.

    Raises `Forbidden` (`forbidden_transition`) when the actor may not ask for the event,
    `ActiveDelivery` (409 `active_delivery`) when an assigned partner asks to go offline,
    `InvalidTransition` (409) when the event makes no sense in the current state (accepting
    without an offer, offering to a busy partner). An expiry that makes
    `partner_expiries_before_offline` in a row sets the partner offline.
    """
    if actor not in SHIFT_EVENT_ACTORS[event]:
        raise Forbidden(f"A {actor} cannot {event} a partner's shift", code="forbidden_transition")
    if shift.state is ShiftState.assigned and event is ShiftEvent.go_offline:
        raise ActiveDelivery("A partner with an active delivery cannot go offline")
    target = SHIFT_TRANSITIONS[shift.state].get(event)
    if target is None:
        raise InvalidTransition(
            f"A partner who is {shift.state} cannot {event}",
            extra={"current_state": str(shift.state), "allowed": sorted(SHIFT_TRANSITIONS[shift.state])},
        )
    if event is ShiftEvent.expire:
        expiries = shift.expiries_in_a_row + 1
        if expiries >= settings.partner_expiries_before_offline:
            return Shift(ShiftState.offline, 0)
        return Shift(target, expiries)
    # Answering an offer, or coming online, shows someone is watching the phone.
    if event in (ShiftEvent.accept, ShiftEvent.decline, ShiftEvent.go_online):
        return Shift(target, 0)
    return Shift(target, shift.expiries_in_a_row)


# ---------------------------------------------------------------- delivery lifecycle


class DeliveryStatus(enum.StrEnum):
    assigned = "assigned"
    at_store = "at_store"
    picked_up = "picked_up"
    arrived = "arrived"
    delivered = "delivered"
    failed = "failed"  # customer unreachable or refused; the bag goes back
    returned = "returned"
    cancelled = "cancelled"


D = DeliveryStatus
DELIVERY_TRANSITIONS: dict[DeliveryStatus, frozenset[DeliveryStatus]] = {
    # Cancelling is only possible before pickup, as for the order (out_for_delivery cannot be
    # cancelled): once the bag has left, it is delivered or it fails and comes back.
    D.assigned: frozenset({D.at_store, D.cancelled}),
    D.at_store: frozenset({D.picked_up, D.cancelled}),
    # A delivery can fail on the road (breakdown, accident) as well as at the door.
    D.picked_up: frozenset({D.arrived, D.failed}),
    D.arrived: frozenset({D.delivered, D.failed}),
    D.failed: frozenset({D.returned}),
    D.delivered: frozenset(),
    D.returned: frozenset(),
    D.cancelled: frozenset(),
}

DeliveryActor = Literal["partner", "staff", "ops", "admin", "system"]
# Ops (and admins) override anything (the operations layer records their reason); the store's
# staff confirm that a failed delivery's bag is back; the system cancels when the order is.
OPS_DELIVERY_TARGETS = frozenset(DeliveryStatus) - {D.assigned}
DELIVERY_ACTOR_TARGETS: dict[str, frozenset[DeliveryStatus]] = {
    "partner": frozenset({D.at_store, D.picked_up, D.arrived, D.delivered, D.failed}),
    "staff": frozenset({D.returned}),
    "ops": OPS_DELIVERY_TARGETS,
    "admin": OPS_DELIVERY_TARGETS,
    "system": frozenset({D.cancelled}),
}
# The partner still holds the order (a failed one until it is back at the store).
ACTIVE_DELIVERY = frozenset({D.assigned, D.at_store, D.picked_up, D.arrived, D.failed})
# The order status a delivery status moves its order to, through the order rules.
ORDER_STATUS_AFTER: dict[DeliveryStatus, OrderStatus] = {
    D.picked_up: OrderStatus.out_for_delivery,
    D.delivered: OrderStatus.delivered,
}


class OrderNotPacked(Conflict):
    code = "order_not_packed"


def ready_for_pickup(order_status: OrderStatus) -> bool:
    """Whether a partner may pick an order up: only once the store has packed it."""
    return order_status is OrderStatus.packed


def check_delivery_transition(
    current: DeliveryStatus, target: DeliveryStatus, actor: DeliveryActor, *, order_status: OrderStatus
) -> None:
    """Raise unless `actor` may move a delivery from `current` to `target`.

    Same errors as the order rules: `Forbidden` (`forbidden_transition`) for who asks,
    `InvalidTransition` (409) for the table; and `OrderNotPacked` (409) for `picked_up`
    while the order (`order_status`) is not `packed`.
    """
    if target not in DELIVERY_ACTOR_TARGETS.get(actor, frozenset()):
        raise Forbidden(f"A {actor} cannot move a delivery to {target}", code="forbidden_transition")
    if target not in DELIVERY_TRANSITIONS[current]:
        raise InvalidTransition(
            f"A delivery that is {current} cannot become {target}",
            extra={"current_status": str(current), "allowed": sorted(DELIVERY_TRANSITIONS[current])},
        )
    if target is D.picked_up and not ready_for_pickup(order_status):
        raise OrderNotPacked(
            f"The order is {order_status}: it can be picked up once packed",
            extra={"order_status": str(order_status)},
        )


# ---------------------------------------------------------------- geometry and ETA

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)


@dataclass(frozen=True, slots=True)
class LatLng:
    lat: float
    lng: float


class Vehicle(enum.StrEnum):
    bicycle = "bicycle"
    scooter = "scooter"
    motorbike = "motorbike"
    car = "car"


def haversine_m(a: LatLng, b: LatLng) -> float:
    """Great-circle distance in metres (haversine on a spherical Earth: within 0.5% of the
    ellipsoid, far below what the road factor already approximates)."""
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    h = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(b.lng - a.lng) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _haversine_matrix_m(lat1: np.ndarray, lng1: np.ndarray, lat2: np.ndarray, lng2: np.ndarray) -> np.ndarray:
    """Distances from every point of the first arrays (rows) to every point of the second."""
    p1, p2 = np.radians(lat1)[:, None], np.radians(lat2)[None, :]
    dlng = np.radians(lng2)[None, :] - np.radians(lng1)[:, None]
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlng / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))


def speed_mps(vehicle: Vehicle, settings: Settings) -> float:
    """Effective city speed of a vehicle type (scooters and motorbikes share the two-wheeler's)."""
    if vehicle is Vehicle.bicycle:
        return settings.delivery_speed_bicycle_mps
    if vehicle is Vehicle.car:
        return settings.delivery_speed_car_mps
    return settings.delivery_speed_two_wheeler_mps


def travel_s(distance_m: float, vehicle: Vehicle, settings: Settings) -> float:
    """Riding time for a straight-line distance: `distance_m * road factor / speed`.

    Calibration: the road factor (`delivery_road_factor`, 1.35) is the detour index, road
    distance over straight-line distance; figures of about 1.3-1.4 are the ones commonly reported
    in the literature for Indian cities. Speeds are effective door-to-door averages in
    congested traffic, not cruising speeds (see the settings). Both are meant to be refitted
    from delivered trips (trail length over haversine, trip time over road distance).
    """
    return distance_m * settings.delivery_road_factor / speed_mps(vehicle, settings)


def route_etas_s(start: LatLng, stops: Sequence[LatLng], vehicle: Vehicle, settings: Settings) -> list[float]:
    """Seconds from `start` until each stop, visited in the given order, has its order in hand:
    travel so far plus one handover (`delivery_handover_seconds`) per stop up to and
    including this one."""
    etas, elapsed, here = [], 0.0, start
    for stop in stops:
        elapsed += travel_s(haversine_m(here, stop), vehicle, settings) + settings.delivery_handover_seconds
        etas.append(elapsed)
        here = stop
    return etas


def eta_s(origin: LatLng, destination: LatLng, vehicle: Vehicle, settings: Settings) -> int:
    """Whole seconds (rounded up) until an order carried from `origin` is in the customer's
    hands at `destination`: haversine x road factor / vehicle speed + handover time."""
    return math.ceil(route_etas_s(origin, [destination], vehicle, settings)[0])


# ---------------------------------------------------------------- GPS ingest


@dataclass(frozen=True, slots=True)
class GpsPoint:
    lat: float
    lng: float
    ts_s: float  # device time
    accuracy_m: float | None = None
    speed_mps: float | None = None  # as reported by the device
    # Carried for the map and the ops board; the filter does not judge them.
    heading_deg: float | None = None
    battery_pct: float | None = None

    @property
    def latlng(self) -> LatLng:
        return LatLng(self.lat, self.lng)


class DropReason(enum.StrEnum):
    invalid = "invalid"  # NaN/infinite, out of range, (0, 0), negative accuracy or speed
    future = "future"  # device time ahead of ours by more than the tolerance
    accuracy = "accuracy"  # reported accuracy worse than the maximum
    duplicate = "duplicate"  # same device time as a kept point
    min_period = "min_period"  # too soon after the previous kept point
    speed = "speed"  # reported speed, or the jump from the previous kept point, too fast


@dataclass(frozen=True)
class IngestResult:
    # The live position after the batch (the previous one when nothing newer was kept).
    latest: GpsPoint | None
    # Every kept point in device-time order, for the trail (late ones included).
    kept: tuple[GpsPoint, ...]
    # Kept points older than the live position: trail only.
    late: int
    # Every reason, zero included, so counters can be added without checks.
    dropped: Mapping[DropReason, int]

    @property
    def moved(self) -> bool:
        """Whether the batch produced a new live position."""
        return bool(self.kept) and self.latest is self.kept[-1]


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def _point_fault(p: GpsPoint, now_s: float, settings: Settings) -> DropReason | None:
    if (
        not _finite(p.lat, p.lng, p.ts_s, p.accuracy_m, p.speed_mps)
        or not (-90 <= p.lat <= 90 and -180 <= p.lng <= 180)
        # (0, 0) is in the Gulf of Guinea: a fix-less default, never a partner.
        or (p.lat == 0 and p.lng == 0)
        or p.ts_s <= 0
        or (p.accuracy_m is not None and p.accuracy_m < 0)
        or (p.speed_mps is not None and p.speed_mps < 0)
    ):
        return DropReason.invalid
    if p.ts_s > now_s + settings.partner_position_future_tolerance_seconds:
        return DropReason.future
    if p.accuracy_m is not None and p.accuracy_m > settings.partner_position_max_accuracy_m:
        return DropReason.accuracy
    if p.speed_mps is not None and p.speed_mps > settings.partner_position_max_speed_mps:
        return DropReason.speed
    return None


def _step_fault(p: GpsPoint, ref: GpsPoint, settings: Settings) -> DropReason | None:
    dt = p.ts_s - ref.ts_s
    if dt == 0:
        return DropReason.duplicate
    if dt < settings.partner_position_min_period_seconds:
        return DropReason.min_period
    # Both fixes may be off by their accuracy: only a jump that even the two error circles
    # cannot explain is impossible. Without it, a standing partner's jitter of 20-30 m
    # between close points would read as 40+ m/s.
    slack_m = (ref.accuracy_m or 0.0) + (p.accuracy_m or 0.0)
    if max(0.0, haversine_m(ref.latlng, p.latlng) - slack_m) / dt > settings.partner_position_max_speed_mps:
        return DropReason.speed
    return None


def filter_positions(
    points: Iterable[GpsPoint], *, latest: GpsPoint | None, now_s: float, settings: Settings
) -> IngestResult:
    """Filter a batch of a partner's points at ingest (Traccar's FilterHandler rules).

    Each point is first judged alone (invalid, future, accuracy, reported speed); the
    survivors are sorted by device time (stable, so equal times keep arrival order) and each
    is judged against the last kept point before it: same time (duplicate), closer than the
    minimum period, or a jump faster than the maximum speed are dropped. A point newer than
    `latest` becomes the live position; an older one ("late", e.g. an offline buffer sent
    after a newer point) is kept for the trail only, judged against the previous late one.

    A wrong point that got through (the first of a shift has nothing to be judged against)
    cannot pin a partner for long: the jump test allows `max speed x elapsed time`.
    """
    dropped = dict.fromkeys(DropReason, 0)
    valid: list[GpsPoint] = []
    for p in points:
        fault = _point_fault(p, now_s, settings)
        if fault is None:
            valid.append(p)
        else:
            dropped[fault] += 1
    kept: list[GpsPoint] = []
    late = 0
    late_ref: GpsPoint | None = None
    for p in sorted(valid, key=lambda q: q.ts_s):
        is_live = latest is None or p.ts_s >= latest.ts_s
        ref = latest if is_live else late_ref
        fault = None if ref is None else _step_fault(p, ref, settings)
        if fault is not None:
            dropped[fault] += 1
            continue
        kept.append(p)
        if is_live:
            latest = p
        else:
            late_ref = p
            late += 1
    return IngestResult(latest=latest, kept=tuple(kept), late=late, dropped=dropped)


def append_trail(
    trail: Sequence[GpsPoint], kept: Iterable[GpsPoint], *, max_len: int
) -> tuple[GpsPoint, ...]:
    """The trail with `kept` points merged in device-time order, the newest `max_len` kept.

    A point whose device time is already in the trail is ignored: a retried REST batch
    resends points that were kept the first time.
    """
    kept = sorted(kept, key=lambda p: p.ts_s)
    if not kept:
        return tuple(trail[-max_len:])
    if not trail or kept[0].ts_s > trail[-1].ts_s:  # the usual case: newer points, in order
        newer = [p for i, p in enumerate(kept) if i == 0 or p.ts_s != kept[i - 1].ts_s]
        return (tuple(trail) + tuple(newer))[-max_len:]
    by_ts = {p.ts_s: p for p in kept}
    by_ts.update((p.ts_s, p) for p in trail)
    return tuple(sorted(by_ts.values(), key=lambda p: p.ts_s)[-max_len:])


# ---------------------------------------------------------------- dispatch


@dataclass(frozen=True, slots=True)
class QueuedOrder:
    id: uuid.UUID
    pickup: LatLng  # the store, or its pickup point
    drop: LatLng
    queued_at_s: float


@dataclass(frozen=True, slots=True)
class Candidate:
    """An online, idle partner of the store (the caller filters by shift state)."""

    id: uuid.UUID
    position: LatLng
    position_ts_s: float
    vehicle: Vehicle
    # Orders this partner declined or let expire: never offered to them again.
    excluded_order_ids: frozenset[uuid.UUID] = frozenset()


@dataclass(frozen=True, slots=True)
class Trip:
    pickup: LatLng
    order_ids: tuple[uuid.UUID, ...]  # in drop order
    # The most any order of the trip reaches its customer later than it would alone.
    added_delay_s: float
    queued_at_s: float  # the oldest order's


@dataclass(frozen=True, slots=True)
class Offer:
    partner_id: uuid.UUID
    order_ids: tuple[uuid.UUID, ...]  # in drop order
    cost_s: float  # the partner's travel time to the pickup


# Who ordered an offered trip's drops (stored on the offer, CHECKed by the database).
RoutePlanner = Literal["direct", "optimizer", "nearest_neighbour"]


@dataclass(frozen=True, slots=True)
class TripRoute:
    """An offered trip's drop order and planned ETAs (whole seconds from planning until each
    order is handed over), and who ordered it: `direct` (one drop), `optimizer` (the route
    optimizer), or `nearest_neighbour` with the reason the optimizer's order was not used."""

    order_ids: tuple[uuid.UUID, ...]
    etas_s: tuple[int, ...]
    planner: RoutePlanner
    fallback: str | None = None


def direct_route(
    start: LatLng,
    store: LatLng,
    orders: Sequence[tuple[uuid.UUID, LatLng]],
    vehicle: Vehicle,
    settings: Settings,
) -> TripRoute:
    """The trip in the given order (nearest-neighbour from `plan_trips`), timed from `start`
    through the store."""
    etas = route_etas_s(start, [store, *(drop for _, drop in orders)], vehicle, settings)[1:]
    return TripRoute(
        order_ids=tuple(order_id for order_id, _ in orders),
        etas_s=tuple(math.ceil(e) for e in etas),
        planner="direct" if len(orders) == 1 else "nearest_neighbour",
    )


def _nearest_neighbour(start: LatLng, orders: Sequence[QueuedOrder]) -> list[QueuedOrder]:
    route, here, left = [], start, list(orders)
    while left:
        # min() keeps the first of equals: ties go to the older order.
        nxt = min(left, key=lambda o: haversine_m(here, o.drop))
        left.remove(nxt)
        route.append(nxt)
        here = nxt.drop
    return route


def _added_delay_s(route: Sequence[QueuedOrder], vehicle: Vehicle, settings: Settings) -> float:
    start = route[0].pickup
    in_trip = route_etas_s(start, [o.drop for o in route], vehicle, settings)
    return max(
        t - route_etas_s(start, [o.drop], vehicle, settings)[0] for t, o in zip(in_trip, route, strict=True)
    )


def plan_trips(orders: Sequence[QueuedOrder], vehicle: Vehicle, settings: Settings) -> list[Trip]:
    """Group queued orders into trips, oldest first.

    Each trip is seeded by the oldest order left; orders with the same pickup whose drops lie
    within `delivery_batch_close_m` of every drop already in the trip join it (nearest to the
    seed first) while the trip holds at most `delivery_batch_max_orders` and no order in it
    reaches its customer more than `delivery_batch_max_added_delay_seconds` later than alone.
    That bound covers every order, the first included. The drop order is nearest-neighbour from
    the pickup. Times use `vehicle`'s speed: pass the slowest vehicle that may take the trip.
    """
    ordered = sorted(orders, key=lambda o: (o.queued_at_s, str(o.id)))
    if not ordered:
        return []
    lats, lngs = np.array([o.drop.lat for o in ordered]), np.array([o.drop.lng for o in ordered])
    close = _haversine_matrix_m(lats, lngs, lats, lngs) <= settings.delivery_batch_close_m
    taken = np.zeros(len(ordered), dtype=bool)
    trips = []
    for i, seed in enumerate(ordered):
        if taken[i]:
            continue
        taken[i] = True
        members, route, delay = [i], [seed], 0.0
        near = [j for j in np.flatnonzero(close[i] & ~taken) if ordered[j].pickup == seed.pickup]
        dist = np.array([haversine_m(seed.drop, ordered[j].drop) for j in near])
        for j in (near[k] for k in np.argsort(dist, kind="stable")):
            if len(members) >= settings.delivery_batch_max_orders:
                break
            if not close[j, members].all():
                continue
            trial = _nearest_neighbour(seed.pickup, [ordered[m] for m in (*members, j)])
            trial_delay = _added_delay_s(trial, vehicle, settings)
            if trial_delay <= settings.delivery_batch_max_added_delay_seconds:
                members.append(j)
                route, delay = trial, trial_delay
                taken[j] = True
        trips.append(Trip(seed.pickup, tuple(o.id for o in route), delay, seed.queued_at_s))
    return trips


def assignment_round(
    orders: Sequence[QueuedOrder], candidates: Sequence[Candidate], *, now_s: float, settings: Settings
) -> list[Offer]:
    """One dispatch round for a store: offers that match trips to partners all at once.

    Orders are batched into trips (`plan_trips`, with the slowest candidate's vehicle so the
    delay bound holds whoever takes a trip); partners whose position is older than
    `partner_fresh_position_seconds` are left out; the cost of a (trip, partner) pair is the
    partner's travel time to the pickup, and `linear_sum_assignment` minimises the total over
    the whole round. A partner excluded from any order of a trip never gets that trip.
    Among equal costs older trips win, so orders are served first come, first served when
    partners are scarce. Trips left without a partner stay queued for the next round.
    """
    # Imported here: scipy takes ~1.7 s to import, and every replica imports these rules
    # (through the tables) while only the fleet shards run rounds.
    from scipy.optimize import linear_sum_assignment

    if len({o.id for o in orders}) != len(orders) or len({c.id for c in candidates}) != len(candidates):
        raise ValueError("order and partner ids must be unique within a round")
    fresh = [c for c in candidates if now_s - c.position_ts_s <= settings.partner_fresh_position_seconds]
    if not orders or not fresh:
        return []
    slowest = min(fresh, key=lambda c: speed_mps(c.vehicle, settings)).vehicle
    trips = plan_trips(orders, slowest, settings)

    distance = _haversine_matrix_m(
        np.array([t.pickup.lat for t in trips]),
        np.array([t.pickup.lng for t in trips]),
        np.array([c.position.lat for c in fresh]),
        np.array([c.position.lng for c in fresh]),
    )
    speeds = np.array([speed_mps(c.vehicle, settings) for c in fresh])
    travel = distance * settings.delivery_road_factor / speeds[None, :]
    allowed = np.ones_like(travel, dtype=bool)
    for col, c in enumerate(fresh):
        if c.excluded_order_ids:
            for row, t in enumerate(trips):
                allowed[row, col] = c.excluded_order_ids.isdisjoint(t.order_ids)
    # Forbidden pairs get a cost above any total of allowed ones, so the solver first matches
    # as many allowed pairs as possible and only then minimises their time; they are dropped
    # afterwards. (scipy refuses infinite entries when no complete matching avoids them.)
    # The tie-break (a microsecond per rank of age, under a millisecond over a whole round) only
    # decides between equal times.
    forbidden_cost = (float(travel.max()) + 1.0) * min(travel.shape) + 1.0
    cost = np.where(allowed, travel, forbidden_cost) + 1e-6 * np.arange(len(trips))[:, None]
    rows, cols = linear_sum_assignment(cost)
    return [
        Offer(fresh[c].id, trips[r].order_ids, float(travel[r, c]))
        for r, c in sorted(zip(rows.tolist(), cols.tolist(), strict=True))
        if allowed[r, c]
    ]


if __name__ == "__main__":
    # The benchmark's shape: 200 queued orders x 500 partners around one Bengaluru store.
    import random
    import time

    rng = random.Random(9)
    store = LatLng(12.9716, 77.5946)

    def _near(km: float) -> LatLng:
        return LatLng(store.lat + rng.uniform(-km, km) / 111, store.lng + rng.uniform(-km, km) / 111)

    queued = [QueuedOrder(uuid.uuid4(), store, _near(3), rng.uniform(0, 60)) for _ in range(200)]
    ids = [o.id for o in queued]
    fleet = [
        Candidate(uuid.uuid4(), _near(5), 95, rng.choice(list(Vehicle)), frozenset(rng.sample(ids, 2)))
        for _ in range(500)
    ]
    started = time.perf_counter()
    offers = assignment_round(queued, fleet, now_s=100, settings=Settings())
    print(
        f"{len(queued)} orders x {len(fleet)} partners: {len(offers)} offers, "
        f"{sum(len(o.order_ids) for o in offers)} orders, {(time.perf_counter() - started) * 1000:.1f} ms"
    )
