"""Pure delivery rules, no Ray and no database: partner shifts, the delivery lifecycle, the
GPS ingest filter, distances and ETAs, and dispatch rounds (batching and matching)."""

from __future__ import annotations

import itertools
import math
import pickle
import random
import uuid

import pytest
from hypothesis import assume, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from config.settings import Settings
from models.delivery_rules import (
    ACTIVE_DELIVERY,
    DELIVERY_ACTOR_TARGETS,
    DELIVERY_TRANSITIONS,
    EARTH_RADIUS_M,
    ORDER_STATUS_AFTER,
    SHIFT_EVENT_ACTORS,
    SHIFT_TRANSITIONS,
    ActiveDelivery,
    Candidate,
    DeliveryStatus,
    DropReason,
    GpsPoint,
    LatLng,
    QueuedOrder,
    Shift,
    ShiftEvent,
    ShiftState,
    Vehicle,
    append_trail,
    assignment_round,
    check_delivery_transition,
    eta_s,
    filter_positions,
    haversine_m,
    plan_trips,
    ready_for_pickup,
    route_etas_s,
    shift_transition,
    speed_mps,
    travel_s,
)
from models.errors import AppError
from models.orders import TRANSITIONS as ORDER_TRANSITIONS
from models.orders import Status as OrderStatus

SETTINGS = Settings()
STORE = LatLng(12.9716, 77.5946)  # central Bengaluru
M_PER_DEG_LAT = math.pi * EARTH_RADIUS_M / 180


def north_of(origin: LatLng, metres: float) -> LatLng:
    return LatLng(origin.lat + metres / M_PER_DEG_LAT, origin.lng)


def east_of(origin: LatLng, metres: float) -> LatLng:
    return LatLng(origin.lat, origin.lng + metres / (M_PER_DEG_LAT * math.cos(math.radians(origin.lat))))


def with_(**changes: object) -> Settings:
    return SETTINGS.model_copy(update=changes)


def outcome(fn, *args, **kw) -> tuple[int, str] | None:
    try:
        fn(*args, **kw)
    except AppError as exc:
        return exc.status_code, exc.code
    return None


# ---------------------------------------------------------------- partner shifts

SHIFT_ACTORS = ["partner", "ops", "system", "staff", "customer", "nobody"]


def test_every_shift_state_has_a_row_and_every_event_its_actors():
    assert set(SHIFT_TRANSITIONS) == set(ShiftState)
    assert set(SHIFT_EVENT_ACTORS) == set(ShiftEvent)


@pytest.mark.parametrize(
    "state, event, actor", list(itertools.product(list(ShiftState), list(ShiftEvent), SHIFT_ACTORS))
)
def test_shift_transition_over_every_state_event_and_actor(state, event, actor):
    shift = Shift(state, 1)
    if actor not in SHIFT_EVENT_ACTORS[event]:
        assert outcome(shift_transition, shift, event, actor, settings=SETTINGS) == (
            403,
            "forbidden_transition",
        )
    elif state is ShiftState.assigned and event is ShiftEvent.go_offline:
        assert outcome(shift_transition, shift, event, actor, settings=SETTINGS) == (409, "active_delivery")
    elif event not in SHIFT_TRANSITIONS[state]:
        assert outcome(shift_transition, shift, event, actor, settings=SETTINGS) == (
            409,
            "invalid_transition",
        )
    else:
        after = shift_transition(shift, event, actor, settings=SETTINGS)
        assert after.state is SHIFT_TRANSITIONS[state][event]
        if event in (ShiftEvent.accept, ShiftEvent.decline, ShiftEvent.go_online):
            assert after.expiries_in_a_row == 0
        elif event is ShiftEvent.expire:
            assert after.expiries_in_a_row == 2
        else:
            assert after.expiries_in_a_row == 1


def test_what_the_partner_may_ask():
    partner_events = {e for e, actors in SHIFT_EVENT_ACTORS.items() if "partner" in actors}
    assert partner_events == {
        ShiftEvent.go_online,
        ShiftEvent.go_offline,
        ShiftEvent.accept,
        ShiftEvent.decline,
    }
    # Only dispatch offers, expires and ends trips.
    for event in (ShiftEvent.offer, ShiftEvent.expire, ShiftEvent.finish):
        assert SHIFT_EVENT_ACTORS[event] == {"system"}


def test_a_shift_from_offline_to_a_trip_and_back():
    shift = Shift()
    assert shift.state is ShiftState.offline
    for event, actor, state in [
        (ShiftEvent.go_online, "partner", ShiftState.idle),
        (ShiftEvent.offer, "system", ShiftState.offered),
        (ShiftEvent.accept, "partner", ShiftState.assigned),
        (ShiftEvent.finish, "system", ShiftState.idle),
        (ShiftEvent.go_offline, "partner", ShiftState.offline),
    ]:
        shift = shift_transition(shift, event, actor, settings=SETTINGS)
        assert shift.state is state


@pytest.mark.parametrize("actor", ["partner", "ops", "system"])
def test_nobody_sets_a_partner_on_a_trip_offline(actor):
    with pytest.raises(ActiveDelivery) as err:
        shift_transition(Shift(ShiftState.assigned), ShiftEvent.go_offline, actor, settings=SETTINGS)
    assert (err.value.status_code, err.value.code) == (409, "active_delivery")
    # Errors cross actor boundaries.
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is ActiveDelivery and again.code == "active_delivery"


def test_going_online_or_offline_twice_is_harmless():
    for state in (ShiftState.idle, ShiftState.offered, ShiftState.assigned):
        assert (
            shift_transition(Shift(state), ShiftEvent.go_online, "partner", settings=SETTINGS).state is state
        )
    offline = Shift(ShiftState.offline)
    assert shift_transition(offline, ShiftEvent.go_offline, "partner", settings=SETTINGS) == offline


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
def test_expiries_in_a_row_set_the_partner_offline(limit):
    settings = with_(partner_expiries_before_offline=limit)
    shift = Shift(ShiftState.idle)
    for n in range(1, limit + 1):
        shift = shift_transition(shift, ShiftEvent.offer, "system", settings=settings)
        shift = shift_transition(shift, ShiftEvent.expire, "system", settings=settings)
        if n < limit:
            assert shift == Shift(ShiftState.idle, n)
    assert shift == Shift(ShiftState.offline, 0)


def test_an_answer_or_coming_back_online_breaks_the_expiry_streak():
    settings = with_(partner_expiries_before_offline=3)

    def run(*steps: tuple[ShiftEvent, str]) -> Shift:
        shift = Shift(ShiftState.idle)
        for event, actor in steps:
            shift = shift_transition(shift, event, actor, settings=settings)
        return shift

    offer, expire = (ShiftEvent.offer, "system"), (ShiftEvent.expire, "system")
    decline, recall = (ShiftEvent.decline, "partner"), (ShiftEvent.recall, "system")
    assert run(offer, expire, offer, expire, offer, decline, offer, expire) == Shift(ShiftState.idle, 1)
    # A recalled offer says nothing about the partner: the streak stands.
    assert run(offer, expire, offer, expire, offer, recall) == Shift(ShiftState.idle, 2)
    assert run(offer, expire, offer, expire, offer, recall, offer, expire).state is ShiftState.offline


# ---------------------------------------------------------------- delivery lifecycle

DELIVERY_ACTORS = ["partner", "staff", "ops", "admin", "system", "customer", "nobody"]
TERMINAL = {DeliveryStatus.delivered, DeliveryStatus.returned, DeliveryStatus.cancelled}


def test_every_delivery_status_has_a_row():
    assert set(DELIVERY_TRANSITIONS) == set(DeliveryStatus)
    for targets in DELIVERY_TRANSITIONS.values():
        assert targets <= set(DeliveryStatus)


@pytest.mark.parametrize(
    "current, target, actor",
    list(itertools.product(list(DeliveryStatus), list(DeliveryStatus), DELIVERY_ACTORS)),
)
def test_check_delivery_transition_allows_exactly_table_and_actor(current, target, actor):
    for order_status in (OrderStatus.packed, OrderStatus.confirmed):
        result = outcome(check_delivery_transition, current, target, actor, order_status=order_status)
        may_ask = target in DELIVERY_ACTOR_TARGETS.get(actor, frozenset())
        in_table = target in DELIVERY_TRANSITIONS[current]
        if not may_ask:
            assert result == (403, "forbidden_transition")
        elif not in_table:
            assert result == (409, "invalid_transition")
        elif target is DeliveryStatus.picked_up and order_status is not OrderStatus.packed:
            assert result == (409, "order_not_packed")
        else:
            assert result is None


@pytest.mark.parametrize("order_status", list(OrderStatus))
def test_pickup_waits_for_the_bag(order_status):
    assert ready_for_pickup(order_status) is (order_status is OrderStatus.packed)
    result = outcome(
        check_delivery_transition,
        DeliveryStatus.at_store,
        DeliveryStatus.picked_up,
        "partner",
        order_status=order_status,
    )
    assert result == (None if order_status is OrderStatus.packed else (409, "order_not_packed"))


def test_partner_walks_the_happy_path_and_the_failed_one():
    happy = ["assigned", "at_store", "picked_up", "arrived", "delivered"]
    for current, target in itertools.pairwise(map(DeliveryStatus, happy)):
        check_delivery_transition(current, target, "partner", order_status=OrderStatus.packed)
    check_delivery_transition(
        DeliveryStatus.arrived, DeliveryStatus.failed, "partner", order_status=OrderStatus.out_for_delivery
    )
    # The bag is back when the store says so, not the partner.
    back = (DeliveryStatus.failed, DeliveryStatus.returned)
    assert outcome(
        check_delivery_transition, *back, "partner", order_status=OrderStatus.out_for_delivery
    ) == (
        403,
        "forbidden_transition",
    )
    check_delivery_transition(*back, "staff", order_status=OrderStatus.out_for_delivery)


@pytest.mark.parametrize("actor", DELIVERY_ACTORS)
def test_no_cancelling_once_picked_up(actor):
    for current in (DeliveryStatus.picked_up, DeliveryStatus.arrived, DeliveryStatus.failed, *TERMINAL):
        assert outcome(
            check_delivery_transition,
            current,
            DeliveryStatus.cancelled,
            actor,
            order_status=OrderStatus.packed,
        )


def test_terminal_and_active_statuses():
    assert {s for s, targets in DELIVERY_TRANSITIONS.items() if not targets} == TERMINAL
    assert set(DeliveryStatus) - TERMINAL == ACTIVE_DELIVERY
    assert DeliveryStatus.assigned not in set().union(*DELIVERY_TRANSITIONS.values())


def test_every_delivery_status_is_reachable_from_assigned():
    seen, frontier = {DeliveryStatus.assigned}, [DeliveryStatus.assigned]
    while frontier:
        for nxt in DELIVERY_TRANSITIONS[frontier.pop()] - seen:
            seen.add(nxt)
            frontier.append(nxt)
    assert seen == set(DeliveryStatus)


def test_order_statuses_a_delivery_drives_are_legal_order_moves():
    assert ORDER_STATUS_AFTER[DeliveryStatus.picked_up] in ORDER_TRANSITIONS[OrderStatus.packed]
    assert ORDER_STATUS_AFTER[DeliveryStatus.delivered] in ORDER_TRANSITIONS[OrderStatus.out_for_delivery]


# ---------------------------------------------------------------- geometry and ETA

lat_st = st.floats(-80, 80)
lng_st = st.floats(-179, 179)
latlng_st = st.builds(LatLng, lat_st, lng_st)


def test_haversine_known_distances():
    assert haversine_m(STORE, STORE) == 0
    assert haversine_m(LatLng(0, 0), LatLng(1, 0)) == pytest.approx(111_195, abs=1)
    assert haversine_m(LatLng(0, 0), LatLng(0, 1)) == pytest.approx(111_195, abs=1)
    assert haversine_m(LatLng(0, 0), LatLng(0, 180)) == pytest.approx(math.pi * EARTH_RADIUS_M)
    # MG Road to Koramangala (Bengaluru), about 4.9 km as the crow flies.
    assert haversine_m(LatLng(12.9756, 77.6067), LatLng(12.9352, 77.6245)) == pytest.approx(4_900, rel=0.05)
    assert haversine_m(STORE, north_of(STORE, 1000)) == pytest.approx(1000, rel=1e-6)
    assert haversine_m(STORE, east_of(STORE, 1000)) == pytest.approx(1000, rel=1e-3)


@given(latlng_st, latlng_st)
def test_haversine_is_a_symmetric_bounded_distance(a, b):
    d = haversine_m(a, b)
    assert d == pytest.approx(haversine_m(b, a))
    assert 0 <= d <= math.pi * EARTH_RADIUS_M + 1e-6


@given(st.floats(0, 50_000), st.floats(0, 50_000), st.sampled_from(list(Vehicle)))
def test_eta_grows_with_distance(d1, d2, vehicle):
    near, far = sorted((d1, d2))
    eta_near = eta_s(STORE, north_of(STORE, near), vehicle, SETTINGS)
    eta_far = eta_s(STORE, north_of(STORE, far), vehicle, SETTINGS)
    assert SETTINGS.delivery_handover_seconds <= eta_near <= eta_far


@given(st.floats(1, 50_000))
def test_eta_is_the_documented_formula(distance):
    dest = north_of(STORE, distance)
    for vehicle in Vehicle:
        expected = (
            haversine_m(STORE, dest) * SETTINGS.delivery_road_factor / speed_mps(vehicle, SETTINGS)
            + SETTINGS.delivery_handover_seconds
        )
        assert eta_s(STORE, dest, vehicle, SETTINGS) == math.ceil(expected)
    # Bicycles are slowest, two-wheelers fastest, in city traffic.
    times = {v: travel_s(distance, v, SETTINGS) for v in Vehicle}
    assert times[Vehicle.bicycle] > times[Vehicle.car] > times[Vehicle.scooter] == times[Vehicle.motorbike]


def test_eta_of_two_km_on_a_scooter_is_city_realistic():
    # 2 km straight line, ~2.7 km of road at ~20 km/h, plus the handover: about 10 minutes.
    assert 8 * 60 <= eta_s(STORE, north_of(STORE, 2000), Vehicle.scooter, SETTINGS) <= 12 * 60


def test_route_etas_accumulate_travel_and_handovers():
    a, b = north_of(STORE, 1000), north_of(STORE, 1500)
    etas = route_etas_s(STORE, [a, b], Vehicle.scooter, SETTINGS)
    assert etas[0] == pytest.approx(
        travel_s(1000, Vehicle.scooter, SETTINGS) + SETTINGS.delivery_handover_seconds
    )
    assert etas[1] == pytest.approx(
        travel_s(1500, Vehicle.scooter, SETTINGS) + 2 * SETTINGS.delivery_handover_seconds, rel=1e-6
    )
    assert route_etas_s(STORE, [], Vehicle.car, SETTINGS) == []


# ---------------------------------------------------------------- GPS ingest

NOW = 1_800_000_000.0


def pt(metres_north: float = 0.0, ts: float = NOW, **kw: float | None) -> GpsPoint:
    where = north_of(STORE, metres_north)
    return GpsPoint(lat=kw.pop("lat", where.lat), lng=kw.pop("lng", where.lng), ts_s=ts, **kw)


def ingest(points, latest=None, settings=SETTINGS):
    return filter_positions(points, latest=latest, now_s=NOW, settings=settings)


def only_drop(result) -> dict[DropReason, int]:
    return {reason: n for reason, n in result.dropped.items() if n}


@pytest.mark.parametrize(
    "bad",
    [
        pt(lat=math.nan),
        pt(lng=math.inf),
        pt(lat=90.0001),
        pt(lat=-91),
        pt(lng=180.5),
        pt(lng=-181),
        pt(lat=0.0, lng=0.0),
        pt(ts=math.nan),
        pt(ts=-5),
        pt(accuracy_m=-1),
        pt(accuracy_m=math.nan),
        pt(speed_mps=-0.1),
        pt(speed_mps=math.inf),
    ],
)
def test_invalid_points_are_dropped(bad):
    result = ingest([bad])
    assert result.kept == () and result.latest is None and not result.moved
    assert only_drop(result) == {DropReason.invalid: 1}


def test_edge_coordinates_are_valid():
    for p in (
        pt(lat=90, lng=180, ts=NOW - 100),
        pt(lat=-90, lng=-180, ts=NOW - 50),
        pt(lat=0, lng=1, ts=NOW),
    ):
        assert ingest([p]).kept == (p,)


def test_future_points_beyond_the_tolerance_are_dropped():
    tolerance = SETTINGS.partner_position_future_tolerance_seconds
    assert ingest([pt(ts=NOW + tolerance)]).kept
    result = ingest([pt(ts=NOW + tolerance + 1)])
    assert only_drop(result) == {DropReason.future: 1} and result.latest is None


def test_poor_accuracy_is_dropped():
    limit = SETTINGS.partner_position_max_accuracy_m
    assert ingest([pt(accuracy_m=limit)]).kept
    assert ingest([pt(accuracy_m=None)]).kept
    assert only_drop(ingest([pt(accuracy_m=limit + 0.1)])) == {DropReason.accuracy: 1}


def test_reported_speed_above_the_limit_is_dropped():
    limit = SETTINGS.partner_position_max_speed_mps
    assert ingest([pt(speed_mps=limit)]).kept
    assert only_drop(ingest([pt(speed_mps=limit + 1)])) == {DropReason.speed: 1}


def test_impossible_jumps_are_dropped_against_the_last_kept_point():
    start = pt(0, NOW - 20, accuracy_m=5)
    teleport = pt(5_000, NOW - 10, accuracy_m=5)  # 5 km in 10 s
    ride = pt(100, NOW, accuracy_m=5)  # 100 m in 20 s from the start
    result = ingest([start, teleport, ride])
    assert result.kept == (start, ride) and result.latest == ride
    assert only_drop(result) == {DropReason.speed: 1}
    # The same jump against the live position from an earlier batch.
    assert only_drop(ingest([teleport], latest=start)) == {DropReason.speed: 1}


def test_jitter_within_the_accuracy_is_not_a_jump():
    still = pt(0, NOW - 1, accuracy_m=25)
    jitter = pt(40, NOW, accuracy_m=25)  # 40 m in 1 s: 40 m/s, inside two 25 m error circles
    assert ingest([jitter], latest=still).kept == (jitter,)
    precise = pt(0, NOW - 1, accuracy_m=1)
    assert only_drop(ingest([pt(40, NOW, accuracy_m=1)], latest=precise)) == {DropReason.speed: 1}


def test_a_wrong_first_point_does_not_pin_the_partner_forever():
    wrong = pt(3_000, NOW - 200)  # 3 km away: reachable at 33 m/s in ~91 s
    assert ingest([pt(0, NOW - 190)], latest=wrong).dropped[DropReason.speed] == 1
    assert ingest([pt(0, NOW - 100)], latest=wrong).latest == pt(0, NOW - 100)


def test_points_closer_than_the_minimum_period_are_dropped():
    period = SETTINGS.partner_position_min_period_seconds
    first = pt(0, NOW - 10)
    result = ingest([first, pt(1, NOW - 10 + period / 2), pt(2, NOW - 10 + period)])
    assert result.kept == (first, pt(2, NOW - 10 + period))
    assert only_drop(result) == {DropReason.min_period: 1}


def test_duplicates_are_dropped():
    first = pt(0, NOW - 10)
    result = ingest([first, pt(5, NOW - 10), first], latest=None)
    assert result.kept == (first,)
    assert only_drop(result) == {DropReason.duplicate: 2}
    # Again against the live position, even with a zero minimum period.
    assert only_drop(
        ingest([first], latest=first, settings=with_(partner_position_min_period_seconds=0))
    ) == {DropReason.duplicate: 1}


def test_a_batch_is_judged_in_device_time_order():
    points = [pt(i * 10, NOW - 60 + i * 5) for i in range(8)]
    forward = ingest(points)
    assert forward.kept == tuple(points) and forward.latest == points[-1] and forward.moved
    assert ingest(list(reversed(points))) == forward
    assert ingest(points[3:] + points[:3]) == forward


def test_late_points_go_to_the_trail_only():
    live = pt(0, NOW - 5)
    buffered = [pt(50, NOW - 30), pt(60, NOW - 25), pt(70, NOW - 20)]
    result = ingest(buffered, latest=live)
    assert result.latest is live and not result.moved
    assert result.kept == tuple(buffered) and result.late == 3
    # Mixed: late points first in time order, then the new live one.
    fresh = pt(10, NOW)
    mixed = ingest([fresh, *buffered], latest=live)
    assert mixed.kept == (*buffered, fresh) and mixed.late == 3 and mixed.latest == fresh and mixed.moved


def test_late_points_are_still_judged():
    live = pt(0, NOW - 5)
    late = [pt(0, NOW - 30), pt(9_000, NOW - 29), pt(1, NOW - 29.9), pt(lat=math.nan, ts=NOW - 28)]
    result = ingest(late, latest=live)
    assert result.kept == (late[0],) and result.late == 1
    assert only_drop(result) == {DropReason.speed: 1, DropReason.min_period: 1, DropReason.invalid: 1}


point_st = st.builds(
    GpsPoint,
    lat=st.one_of(st.floats(12.90, 13.05), st.just(0.0), st.just(math.nan), st.just(95.0)),
    lng=st.one_of(st.floats(77.50, 77.70), st.just(0.0)),
    ts_s=st.floats(NOW - 600, NOW + 120),
    accuracy_m=st.one_of(st.none(), st.floats(0, 200)),
    speed_mps=st.one_of(st.none(), st.floats(0, 50)),
)


@given(st.lists(point_st, max_size=30), st.one_of(st.none(), point_st))
def test_ingest_invariants(points, latest):
    assume(latest is None or ingest([latest]).kept)
    result = ingest(points, latest=latest)
    assert len(result.kept) + sum(result.dropped.values()) == len(points)
    assert set(result.dropped) == set(DropReason)
    times = [p.ts_s for p in result.kept]
    assert times == sorted(times) and len(set(times)) == len(times)
    live = [p for p in result.kept if latest is None or p.ts_s > latest.ts_s]
    assert result.late == len(result.kept) - len(live)
    assert result.latest == (live[-1] if live else latest)
    assert result.moved == bool(live)
    # Each kept live point respects the rules against the one kept before it.
    for prev, cur in itertools.pairwise([latest, *live] if latest else live):
        dt = cur.ts_s - prev.ts_s
        assert dt >= SETTINGS.partner_position_min_period_seconds
        slack = (prev.accuracy_m or 0) + (cur.accuracy_m or 0)
        assert (haversine_m(prev.latlng, cur.latlng) - slack) / dt <= SETTINGS.partner_position_max_speed_mps
    for p in result.kept:
        assert ingest([p]).kept == (p,)
    # Deterministic whatever order the batch arrives in (distinct times).
    if len({p.ts_s for p in points}) == len(points):
        assert ingest(list(reversed(points)), latest=latest) == result


def test_append_trail_merges_dedupes_and_bounds():
    trail = tuple(pt(i, NOW - 100 + i) for i in range(0, 12, 2))
    kept = [pt(i, NOW - 100 + i) for i in range(1, 12, 2)] + [pt(99, NOW - 100)]  # same time as trail[0]
    merged = append_trail(trail, kept, max_len=100)
    assert [p.ts_s for p in merged] == [NOW - 100 + i for i in range(12)]
    assert merged[0] is trail[0]  # the trail's own point wins
    assert append_trail(trail, kept, max_len=4) == merged[-4:]
    assert append_trail((), [], max_len=3) == ()


# ---------------------------------------------------------------- dispatch

NO_BATCH = with_(delivery_batch_max_orders=1)


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def order(n: int, drop: LatLng, queued_at: float = 0.0, pickup: LatLng = STORE) -> QueuedOrder:
    return QueuedOrder(uid(n), pickup, drop, queued_at)


def partner(
    n: int,
    where: LatLng,
    vehicle: Vehicle = Vehicle.scooter,
    ts: float = NOW,
    excluded: frozenset[uuid.UUID] = frozenset(),
) -> Candidate:
    return Candidate(uid(1000 + n), where, ts, vehicle, excluded)


def check_round(offers, orders, candidates, settings=SETTINGS):
    """What every round must satisfy, whatever the instance."""
    by_id = {c.id: c for c in candidates}
    offered_orders = [oid for o in offers for oid in o.order_ids]
    assert len(set(offered_orders)) == len(offered_orders), "an order offered twice"
    assert len({o.partner_id for o in offers}) == len(offers), "a partner offered two trips"
    assert set(offered_orders) <= {o.id for o in orders}
    for offer in offers:
        c = by_id[offer.partner_id]
        assert NOW - c.position_ts_s <= settings.partner_fresh_position_seconds, "a stale partner"
        assert c.excluded_order_ids.isdisjoint(offer.order_ids), "a forbidden pair"
        assert 1 <= len(offer.order_ids) <= settings.delivery_batch_max_orders
        pickup = next(o.pickup for o in orders if o.id == offer.order_ids[0])
        expected = travel_s(haversine_m(c.position, pickup), c.vehicle, settings)
        assert offer.cost_s == pytest.approx(expected, rel=1e-6, abs=1e-3)


def brute_force(orders, candidates, settings) -> tuple[int, float]:
    """Most allowed (order, fresh partner) pairs, then least total travel time."""
    fresh = [c for c in candidates if NOW - c.position_ts_s <= settings.partner_fresh_position_seconds]
    best = (0, 0.0)

    def go(i: int, used: frozenset[int], count: int, cost: float) -> None:
        nonlocal best
        if i == len(orders):
            if count > best[0] or (count == best[0] and cost < best[1]):
                best = (count, cost)
            return
        go(i + 1, used, count, cost)
        for j, c in enumerate(fresh):
            if j not in used and orders[i].id not in c.excluded_order_ids:
                t = travel_s(haversine_m(c.position, orders[i].pickup), c.vehicle, settings)
                go(i + 1, used | {j}, count + 1, cost + t)

    go(0, frozenset(), 0, 0.0)
    return best


offset_st = st.tuples(st.floats(-4000, 4000), st.floats(-4000, 4000))


@st.composite
def instances(draw, max_orders: int = 5, max_partners: int = 5):
    n_orders = draw(st.integers(0, max_orders))
    n_partners = draw(st.integers(0, max_partners))
    pickups = [STORE, east_of(STORE, 2500)]
    orders = []
    for i in range(n_orders):
        dn, de = draw(offset_st)
        pickup = draw(st.sampled_from(pickups))
        orders.append(order(i, east_of(north_of(pickup, dn), de), draw(st.floats(0, 300)), pickup))
    candidates = []
    for j in range(n_partners):
        dn, de = draw(offset_st)
        excluded = draw(st.frozensets(st.sampled_from([o.id for o in orders]))) if orders else frozenset()
        age = draw(st.sampled_from([0, 5, 29, 31, 120]))
        candidates.append(
            partner(
                j, east_of(north_of(STORE, dn), de), draw(st.sampled_from(list(Vehicle))), NOW - age, excluded
            )
        )
    return orders, candidates


@hyp_settings(max_examples=300, deadline=None)
@given(instances())
def test_round_is_optimal_against_brute_force(instance):
    orders, candidates = instance
    offers = assignment_round(orders, candidates, now_s=NOW, settings=NO_BATCH)
    check_round(offers, orders, candidates, NO_BATCH)
    count, cost = brute_force(orders, candidates, NO_BATCH)
    assert len(offers) == count
    assert sum(o.cost_s for o in offers) == pytest.approx(cost, abs=1e-3)


@hyp_settings(max_examples=100, deadline=None)
@given(instances(max_orders=25, max_partners=25))
def test_round_invariants_with_batching(instance):
    orders, candidates = instance
    offers = assignment_round(orders, candidates, now_s=NOW, settings=SETTINGS)
    check_round(offers, orders, candidates)
    # Maximal: a trip left over and a fresh partner left over can only be a forbidden pair.
    fresh = [c for c in candidates if NOW - c.position_ts_s <= SETTINGS.partner_fresh_position_seconds]
    if not fresh:
        assert offers == []
        return
    slowest = min(fresh, key=lambda c: speed_mps(c.vehicle, SETTINGS)).vehicle
    trips = plan_trips(orders, slowest, SETTINGS)
    assert {o.order_ids for o in offers} <= {t.order_ids for t in trips}
    busy = {o.partner_id for o in offers}
    for trip in trips:
        if trip.order_ids in {o.order_ids for o in offers}:
            continue
        for c in fresh:
            if c.id not in busy:
                assert not c.excluded_order_ids.isdisjoint(trip.order_ids)


def test_stale_partners_are_left_out():
    near_but_stale = partner(1, STORE, ts=NOW - SETTINGS.partner_fresh_position_seconds - 1)
    far_but_fresh = partner(2, north_of(STORE, 3000), ts=NOW - SETTINGS.partner_fresh_position_seconds)
    offers = assignment_round(
        [order(1, north_of(STORE, 1000))], [near_but_stale, far_but_fresh], now_s=NOW, settings=SETTINGS
    )
    assert [o.partner_id for o in offers] == [far_but_fresh.id]
    assert assignment_round([order(1, STORE)], [near_but_stale], now_s=NOW, settings=SETTINGS) == []


def test_a_partner_never_gets_an_order_they_turned_down():
    o = order(1, north_of(STORE, 1000))
    declined = partner(1, STORE, excluded=frozenset({o.id}))
    assert assignment_round([o], [declined], now_s=NOW, settings=SETTINGS) == []
    other = partner(2, north_of(STORE, 4000))
    assert [x.partner_id for x in assignment_round([o], [declined, other], now_s=NOW, settings=SETTINGS)] == [
        other.id
    ]


def test_the_whole_round_is_solved_at_once_not_greedily():
    # Two pickups on a line: 0 m and 3,000 m. Greedy by age would give the first order its
    # nearest partner (a, 1 km away) and send b 4.5 km to the second (5.5 km in all); the joint
    # optimum sends b 1.5 km to the first and a 2 km to the second (3.5 km).
    store_b = east_of(STORE, 3000)
    orders = [order(1, STORE, 0, pickup=STORE), order(2, store_b, 1, pickup=store_b)]
    a = partner(1, east_of(STORE, 1000))
    b = partner(2, east_of(STORE, -1500))
    offers = assignment_round(orders, [a, b], now_s=NOW, settings=NO_BATCH)
    assert {(o.partner_id, o.order_ids) for o in offers} == {(a.id, (uid(2),)), (b.id, (uid(1),))}


def test_vehicle_speed_decides_who_is_closer_in_time():
    o = order(1, north_of(STORE, 500))
    bike = partner(1, north_of(STORE, 1000), Vehicle.bicycle)  # ~409 s
    scooter = partner(2, north_of(STORE, 2000), Vehicle.scooter)  # ~491 s
    assert assignment_round([o], [bike, scooter], now_s=NOW, settings=SETTINGS)[0].partner_id == bike.id
    bike_far = partner(1, north_of(STORE, 1500), Vehicle.bicycle)  # ~614 s
    assert (
        assignment_round([o], [bike_far, scooter], now_s=NOW, settings=SETTINGS)[0].partner_id == scooter.id
    )


def test_scarce_partners_serve_the_oldest_orders_first():
    orders = [order(n, north_of(STORE, 1000 * n), queued_at=100 - n) for n in range(1, 5)]
    offers = assignment_round(orders, [partner(1, STORE)], now_s=NOW, settings=NO_BATCH)
    assert [o.order_ids for o in offers] == [(uid(4),)]


def test_ids_must_be_unique():
    o = order(1, STORE)
    with pytest.raises(ValueError):
        assignment_round([o, o], [partner(1, STORE)], now_s=NOW, settings=SETTINGS)
    with pytest.raises(ValueError):
        assignment_round([o], [partner(1, STORE), partner(1, STORE)], now_s=NOW, settings=SETTINGS)


def test_nothing_to_match():
    assert assignment_round([], [partner(1, STORE)], now_s=NOW, settings=SETTINGS) == []
    assert assignment_round([order(1, STORE)], [], now_s=NOW, settings=SETTINGS) == []
    assert plan_trips([], Vehicle.scooter, SETTINGS) == []


# ---------------------------------------------------------------- batching


def test_neighbours_go_as_one_trip_in_nearest_neighbour_order():
    far = order(1, north_of(STORE, 2100), queued_at=0)
    near = order(2, north_of(STORE, 2000), queued_at=5)
    elsewhere = order(3, north_of(STORE, -2000), queued_at=10)
    trips = plan_trips([elsewhere, near, far], Vehicle.scooter, SETTINGS)
    assert [t.order_ids for t in trips] == [(near.id, far.id), (elsewhere.id,)]
    assert trips[0].queued_at_s == 0
    # On the way: the older order waits only for the other's handover.
    assert trips[0].added_delay_s == pytest.approx(SETTINGS.delivery_handover_seconds, rel=1e-6)
    offers = assignment_round(
        [far, near, elsewhere], [partner(1, STORE), partner(2, STORE)], now_s=NOW, settings=SETTINGS
    )
    assert sorted(o.order_ids for o in offers) == sorted(t.order_ids for t in trips)


def test_no_batch_when_the_delay_bound_is_tighter_than_a_handover():
    a, b = order(1, north_of(STORE, 2000)), order(2, north_of(STORE, 2000), queued_at=1)
    tight = with_(delivery_batch_max_added_delay_seconds=SETTINGS.delivery_handover_seconds - 1)
    assert len(plan_trips([a, b], Vehicle.scooter, tight)) == 2
    assert len(plan_trips([a, b], Vehicle.scooter, SETTINGS)) == 1


def test_no_batch_across_stores_or_beyond_close_together():
    other_store = east_of(STORE, 1000)
    drop = north_of(STORE, 2000)
    assert (
        len(plan_trips([order(1, drop), order(2, drop, pickup=other_store)], Vehicle.scooter, SETTINGS)) == 2
    )
    apart = SETTINGS.delivery_batch_close_m + 10
    assert len(plan_trips([order(1, drop), order(2, east_of(drop, apart))], Vehicle.scooter, SETTINGS)) == 2


def test_a_trip_holds_at_most_the_bag_size():
    drop = north_of(STORE, 1000)
    orders = [order(n, drop, queued_at=n) for n in range(7)]
    settings = with_(delivery_batch_max_orders=3, delivery_batch_max_added_delay_seconds=3600)
    assert [len(t.order_ids) for t in plan_trips(orders, Vehicle.scooter, settings)] == [3, 3, 1]


def test_slowest_candidate_bounds_the_batch():
    # A 400 m detour: within 220 s of added delay on a scooter, not on a bicycle.
    a = order(1, north_of(STORE, 2000))
    b = order(2, east_of(a.drop, 400), queued_at=1)
    settings = with_(delivery_batch_max_added_delay_seconds=220)

    def delay(vehicle: Vehicle) -> float:
        together = route_etas_s(STORE, [a.drop, b.drop], vehicle, settings)[1]
        return together - route_etas_s(STORE, [b.drop], vehicle, settings)[0]

    assert delay(Vehicle.scooter) <= 220 < delay(Vehicle.bicycle)
    scooters = [partner(1, STORE), partner(2, STORE)]
    with_bike = [partner(1, STORE), partner(2, STORE, Vehicle.bicycle)]
    assert len(assignment_round([a, b], scooters, now_s=NOW, settings=settings)) == 1
    assert len(assignment_round([a, b], with_bike, now_s=NOW, settings=settings)) == 2


def test_a_partner_excluded_from_one_order_of_a_trip_does_not_get_the_trip():
    a, b = order(1, north_of(STORE, 2000)), order(2, north_of(STORE, 2000), queued_at=1)
    only = partner(1, STORE, excluded=frozenset({b.id}))
    assert assignment_round([a, b], [only], now_s=NOW, settings=SETTINGS) == []


@st.composite
def clustered_orders(draw):
    n = draw(st.integers(1, 20))
    centres = [north_of(STORE, 1500), east_of(STORE, 2500), north_of(STORE, -800)]
    orders = []
    for i in range(n):
        centre = draw(st.sampled_from(centres))
        dn, de = draw(st.tuples(st.floats(-400, 400), st.floats(-400, 400)))
        orders.append(order(i, east_of(north_of(centre, dn), de), draw(st.floats(0, 120))))
    return orders


@hyp_settings(max_examples=200, deadline=None)
@given(
    clustered_orders(),
    st.sampled_from(list(Vehicle)),
    st.sampled_from([0, 60, 150, 300, 600]),
    st.integers(1, 4),
    st.sampled_from([100, 300, 500, 1000]),
)
def test_batching_respects_its_bounds(orders, vehicle, max_delay, max_orders, close_m):
    settings = with_(
        delivery_batch_max_added_delay_seconds=max_delay,
        delivery_batch_max_orders=max_orders,
        delivery_batch_close_m=close_m,
    )
    trips = plan_trips(orders, vehicle, settings)
    by_id = {o.id: o for o in orders}
    assert sorted(oid for t in trips for oid in t.order_ids) == sorted(by_id)
    for trip in trips:
        members = [by_id[oid] for oid in trip.order_ids]
        assert len(members) <= max_orders
        assert trip.queued_at_s == min(o.queued_at_s for o in members)
        for x, y in itertools.combinations(members, 2):
            assert haversine_m(x.drop, y.drop) <= close_m
        # Nearest-neighbour drop order from the store.
        here = STORE
        for i, o in enumerate(members):
            assert haversine_m(here, o.drop) <= min(haversine_m(here, m.drop) for m in members[i:]) + 1e-9
            here = o.drop
        # No order later than alone by more than the bound.
        in_trip = route_etas_s(STORE, [o.drop for o in members], vehicle, settings)
        delays = [
            t - route_etas_s(STORE, [o.drop], vehicle, settings)[0]
            for t, o in zip(in_trip, members, strict=True)
        ]
        assert max(delays) == pytest.approx(trip.added_delay_s)
        assert trip.added_delay_s <= max_delay + 1e-9


def test_a_store_sized_round():
    """The benchmark's shape (200 orders x 500 partners), checked for correctness only."""
    rng = random.Random(9)

    def near(metres: float) -> LatLng:
        return east_of(north_of(STORE, rng.uniform(-metres, metres)), rng.uniform(-metres, metres))

    orders = [order(i, near(3000), rng.uniform(0, 60)) for i in range(200)]
    ids = [o.id for o in orders]
    candidates = [
        partner(
            j, near(5000), rng.choice(list(Vehicle)), NOW - rng.uniform(0, 60), frozenset(rng.sample(ids, 3))
        )
        for j in range(500)
    ]
    offers = assignment_round(orders, candidates, now_s=NOW, settings=SETTINGS)
    check_round(offers, orders, candidates)
    assert sum(len(o.order_ids) for o in offers) == 200
