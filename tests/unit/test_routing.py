"""The route optimizer's pure core (models/routing.py): on instances small enough to solve
exhaustively here, the solver finds the optimum and every route it returns is checked by an
independent simulation (windows, capacity, shift end, pickup before drop); what it cannot
serve is reported with a reason, never lost; bad input is a validation error naming the field."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import uuid
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from ortools.constraint_solver import pywrapcp
from ortools.util import optional_boolean_pb2
from pydantic import ValidationError

from config.settings import Settings
from models.delivery_rules import LatLng, Vehicle, haversine_m, travel_s
from models.routing import (
    HORIZON_MAX_S,
    SOLVER_PORTFOLIO,
    DropReason,
    HaversineTravelTimes,
    InfeasibleRoutes,
    MatrixProblem,
    MatrixVehicle,
    RoutingProblem,
    RoutingSolution,
    SolverConfig,
    _iterated,
    check_solomon,
    load_bks,
    load_solomon,
    solomon_problem,
    solve,
    solve_matrix,
)

SOLOMON = Path(__file__).resolve().parents[2] / "pipelines" / "data" / "solomon"
LIMIT_S = 0.3  # GLS never stops by itself: every solve runs this long


class GridTimes:
    """A travel-time matrix that is easy to reason about: 100 s per 0.001 degree, Manhattan,
    and a bicycle twice as slow."""

    def matrix(self, points: Sequence[LatLng], vehicle: Vehicle) -> list[list[int]]:
        slow = 2 if vehicle is Vehicle.bicycle else 1
        return [
            [slow * round(1e5 * (abs(a.lat - b.lat) + abs(a.lng - b.lng))) for b in points] for a in points
        ]


TIMES = GridTimes()


def at(x: float, y: float) -> dict[str, float]:
    """A point x, y thousandths of a degree from the depot (12.9, 77.5)."""
    return {"lat": 12.9 + x / 1000, "lng": 77.5 + y / 1000}


def problem(**fields: object) -> RoutingProblem:
    base: dict[str, object] = {"depot": {"location": at(0, 0)}, "max_lateness_s": 0}
    return RoutingProblem.model_validate(base | fields)


# ---------------------------------------------------------------- an independent simulation


def simulate(p: RoutingProblem, vehicle_index: int, stop_ids: Sequence[str]) -> tuple[bool, int, int]:
    """(feasible, travel, lateness) of serving `stop_ids` in order, straight from the problem."""
    v = p.vehicles[vehicle_index]
    stops = {s.id: s for s in p.stops}
    ll = lambda pt: LatLng(pt.lat, pt.lng)  # noqa: E731
    start = ll(v.start) if v.start else ll(p.depot.location)
    t = 0 if v.start else p.depot.opens_s
    points = [start] + [ll(stops[i].location) for i in stop_ids] + [ll(p.depot.location)]
    matrix = TIMES.matrix(points, v.vehicle_type)
    travel = lateness = 0
    aboard = 0 if p.pairs else sum(stops[i].demand for i in stop_ids)
    ok = aboard <= v.capacity
    drop_of = {q.pickup: q.drop for q in p.pairs}
    done: set[str] = set()
    service = 0
    for k, sid in enumerate(stop_ids, 1):
        s = stops[sid]
        travel += matrix[k - 1][k]
        t = max(t + service + matrix[k - 1][k], s.earliest_s)
        late = max(0, t - s.latest_s)
        ok &= p.max_lateness_s is None or late <= p.max_lateness_s
        lateness += late
        if p.pairs:
            aboard += stops[drop_of[sid]].demand if sid in drop_of else -s.demand
            pickup = next((q.pickup for q in p.pairs if q.drop == sid), None)
            ok &= pickup is None or pickup in done
        else:
            aboard -= s.demand
        ok &= 0 <= aboard <= v.capacity
        done.add(sid)
        service = s.service_s
    t += service
    if not p.open_routes and stop_ids:
        back = matrix[len(stop_ids)][-1]
        travel, t = travel + back, t + back
    ok &= t <= v.shift_end_s or not stop_ids
    return ok, travel, lateness


def brute_force(p: RoutingProblem) -> tuple[int, int]:
    """The best (dropped stops, travel + lateness cost) over every assignment and order."""
    ids = [s.id for s in p.stops]
    partner = {q.pickup: q.drop for q in p.pairs} | {q.drop: q.pickup for q in p.pairs}

    @cache
    def best_route(k: int, members: frozenset[str]) -> int | None:
        costs = []
        for order in itertools.permutations(sorted(members)):
            ok, travel, lateness = simulate(p, k, order)
            if ok:
                costs.append(travel + p.lateness_cost_per_s * lateness)
        return min(costs, default=None)

    best: tuple[int, int] | None = None
    for choice in itertools.product(range(-1, len(p.vehicles)), repeat=len(ids)):
        where = dict(zip(ids, choice, strict=True))
        if any(where[a] != where[b] for a, b in partner.items()):
            continue
        total = 0
        for k in range(len(p.vehicles)):
            cost = best_route(k, frozenset(i for i in ids if where[i] == k))
            if cost is None:
                break
            total += cost
        else:
            candidate = (sum(c == -1 for c in choice), total)
            best = candidate if best is None else min(best, candidate)
    assert best is not None
    return best


def check(p: RoutingProblem, solution: RoutingSolution) -> tuple[int, int]:
    """Every route feasible and its figures right, every stop served once or dropped once;
    returns (dropped, travel + lateness cost) like `brute_force`."""
    served = [v.stop_id for r in solution.routes for v in r.visits]
    dropped = [d.stop_id for d in solution.dropped]
    assert sorted(served + dropped) == sorted(s.id for s in p.stops)
    index = {v.id: k for k, v in enumerate(p.vehicles)}
    cost = 0
    for route in solution.routes:
        ok, travel, lateness = simulate(p, index[route.vehicle_id], [v.stop_id for v in route.visits])
        assert ok, route
        assert (route.travel_s, route.lateness_s) == (travel, lateness)
        cost += travel + p.lateness_cost_per_s * lateness
    assert solution.travel_s == sum(r.travel_s for r in solution.routes)
    return len(dropped), cost


def random_problem(seed: int) -> RoutingProblem:
    rng = random.Random(seed)
    n_stops, n_vehicles = rng.choice([(5, 1), (6, 1), (5, 2), (6, 2)])
    stops = []
    for i in range(n_stops):
        earliest = rng.choice([0, 0, rng.randrange(0, 1500)])
        stops.append(
            {
                "id": f"s{i}",
                "location": at(rng.uniform(-5, 5), rng.uniform(-5, 5)),
                "demand": rng.randint(1, 3),
                "earliest_s": earliest,
                "latest_s": earliest + rng.choice([400, 900, 3000]),
                "service_s": rng.choice([0, 60]),
            }
        )
    vehicles = [
        {
            "id": f"v{k}",
            "capacity": rng.randint(4, 9),
            "shift_end_s": rng.choice([2500, 4000]),
            "vehicle_type": rng.choice(["scooter", "bicycle"]),
            "start": None if k == 0 else at(rng.uniform(-5, 5), rng.uniform(-5, 5)),
        }
        for k in range(n_vehicles)
    ]
    soft = seed % 3 == 0
    return problem(
        stops=stops,
        vehicles=vehicles,
        open_routes=seed % 2 == 1,
        max_lateness_s=None if soft else 0,
        lateness_cost_per_s=3,
    )


# ---------------------------------------------------------------- optimality and feasibility


@pytest.mark.parametrize("config", SOLVER_PORTFOLIO, ids=lambda c: c.label)
@pytest.mark.parametrize("seed", range(8))
def test_matches_the_exhaustive_optimum(seed: int, config: SolverConfig) -> None:
    p = random_problem(seed)
    solution = solve(p, TIMES, time_limit_s=LIMIT_S, config=config)
    assert check(p, solution) == brute_force(p)
    assert all(d.reason in DropReason for d in solution.dropped)
    assert solution.stats.status == "ROUTING_SUCCESS"


def test_pickups_come_before_their_drops_and_the_load_holds() -> None:
    # Two parcels, a bag for one: each pickup is followed by its own drop before the next.
    p = problem(
        stops=[
            {"id": "p1", "location": at(1, 0), "demand": 0, "latest_s": 9000},
            {"id": "d1", "location": at(0, 1), "demand": 1, "latest_s": 9000},
            {"id": "p2", "location": at(2, 0), "demand": 0, "latest_s": 9000},
            {"id": "d2", "location": at(2, 2), "demand": 1, "latest_s": 9000},
        ],
        pairs=[{"pickup": "p1", "drop": "d1"}, {"pickup": "p2", "drop": "d2"}],
        vehicles=[{"id": "v", "capacity": 1, "shift_end_s": 9000, "start": at(3, 3)}],
        open_routes=True,
    )
    solution = solve(p, TIMES, time_limit_s=LIMIT_S)
    order = [v.stop_id for v in solution.routes[0].visits]
    assert order.index("p1") + 1 == order.index("d1") and order.index("p2") + 1 == order.index("d2")
    assert [v.load_after for v in solution.routes[0].visits] == [1, 0, 1, 0]
    assert check(p, solution) == brute_force(p)


def test_open_routes_end_at_the_last_stop_closed_ones_at_the_depot() -> None:
    stops = [{"id": f"s{i}", "location": at(i, 0), "latest_s": 9000, "service_s": 30} for i in (1, 2, 3)]
    vehicles = [{"id": "v", "capacity": 5, "shift_end_s": 9000}]
    opened = solve(problem(stops=stops, vehicles=vehicles, open_routes=True), TIMES, time_limit_s=LIMIT_S)
    closed = solve(problem(stops=stops, vehicles=vehicles), TIMES, time_limit_s=LIMIT_S)
    assert [v.stop_id for v in opened.routes[0].visits] == ["s1", "s2", "s3"]
    assert [v.arrival_s for v in opened.routes[0].visits] == [100, 230, 360]
    assert opened.routes[0].end_s == 390 and opened.travel_s == 300
    assert opened.stats.time_limit_reached  # guided local search runs until the clock stops it
    assert closed.travel_s == 600 and closed.routes[0].end_s == 390 + 300
    assert [v.load_after for v in closed.routes[0].visits] == [2, 1, 0]


def test_late_rather_than_dropped_when_windows_are_soft() -> None:
    # Both stops want service by 100 s, 100 s from the depot and 200 s apart: one is late.
    stops = [
        {"id": "a", "location": at(1, 0), "latest_s": 100},
        {"id": "b", "location": at(-1, 0), "latest_s": 100},
    ]
    p = problem(stops=stops, vehicles=[{"id": "v", "capacity": 5, "shift_end_s": 9000}], max_lateness_s=None)
    solution = solve(p, TIMES, time_limit_s=LIMIT_S)
    assert not solution.dropped
    assert solution.lateness_s == 200 and [v.lateness_s for v in solution.routes[0].visits] == [0, 200]
    assert check(p, solution) == brute_force(p)


# ---------------------------------------------------------------- what cannot be served


def test_unservable_stops_are_dropped_with_a_reason() -> None:
    vehicles = [{"id": "v", "capacity": 4, "shift_end_s": 9000}]
    far = problem(
        stops=[
            {"id": "ok", "location": at(1, 0), "latest_s": 9000},
            {"id": "far", "location": at(50, 0), "latest_s": 1000},  # 5000 s away
        ],
        vehicles=vehicles,
    )
    full = problem(
        stops=[{"id": f"s{i}", "location": at(i, 0), "demand": 2, "latest_s": 9000} for i in (1, 2, 3)],
        vehicles=vehicles,
    )
    busy = problem(
        stops=[
            {"id": "a", "location": at(1, 0), "earliest_s": 100, "latest_s": 100},
            {"id": "b", "location": at(-1, 0), "earliest_s": 100, "latest_s": 100},
        ],
        vehicles=vehicles,
    )
    for p, reason in ((far, "window_unreachable"), (full, "capacity"), (busy, "no_vehicle")):
        solution = solve(p, TIMES, time_limit_s=LIMIT_S)
        assert [d.reason for d in solution.dropped] == [reason]
        assert check(p, solution) == brute_force(p)


def test_a_pair_is_dropped_whole() -> None:
    p = problem(
        stops=[
            {"id": "p", "location": at(1, 0), "demand": 0, "latest_s": 9000},
            {"id": "d", "location": at(2, 0), "demand": 1, "latest_s": 9000},
        ],
        pairs=[{"pickup": "p", "drop": "d"}],
        vehicles=[{"id": "v", "capacity": 1, "shift_end_s": 150}],
    )
    solution = solve(p, TIMES, time_limit_s=LIMIT_S)
    assert [(d.stop_id, d.reason) for d in solution.dropped] == [
        ("p", DropReason.window_unreachable),
        ("d", DropReason.window_unreachable),
    ]


def test_no_stops_no_routes() -> None:
    solution = solve(
        problem(stops=[], vehicles=[{"id": "v", "capacity": 1, "shift_end_s": 10}]), TIMES, time_limit_s=1
    )
    assert solution.routes == [] and solution.dropped == []


# ---------------------------------------------------------------- validation


def errors(fields: dict[str, object]) -> list[tuple[object, ...]]:
    with pytest.raises(ValidationError) as caught:
        problem(**fields)
    return [e["loc"] for e in caught.value.errors()]


GOOD_STOP = {"id": "s", "location": at(1, 1), "latest_s": 100}
GOOD_VEHICLE = {"id": "v", "capacity": 2, "shift_end_s": 100}


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"stops": [GOOD_STOP | {"location": {"lat": 91, "lng": 0}}]}, ("stops", 0, "location", "lat")),
        ({"stops": [GOOD_STOP | {"location": {"lat": 0, "lng": -181}}]}, ("stops", 0, "location", "lng")),
        ({"stops": [GOOD_STOP | {"earliest_s": 200}]}, ("stops", 0, "latest_s")),
        ({"stops": [GOOD_STOP | {"demand": 3}]}, ("stops", 0, "demand")),
        ({"stops": [GOOD_STOP, GOOD_STOP]}, ("stops", 1, "id")),
        ({"stops": [GOOD_STOP], "pairs": [{"pickup": "s", "drop": "x"}]}, ("pairs", 0, "drop")),
        ({"stops": [GOOD_STOP], "vehicles": [GOOD_VEHICLE | {"capacity": 0}]}, ("vehicles", 0, "capacity")),
        ({"stops": [GOOD_STOP], "vehicles": []}, ("vehicles",)),
        # The fuzz sent 2^63-ish times: the solver's costs overflowed (a 503, not a 422).
        ({"stops": [GOOD_STOP], "vehicles": [GOOD_VEHICLE | {"shift_end_s": 2**62}]}, ("vehicles", 0, "shift_end_s")),
        ({"stops": [GOOD_STOP | {"latest_s": HORIZON_MAX_S + 1}]}, ("stops", 0, "latest_s")),
    ],
)
def test_bad_input_names_the_field(fields: dict[str, object], loc: tuple[object, ...]) -> None:
    assert errors({"vehicles": [GOOD_VEHICLE]} | fields) == [loc]


def test_the_longest_horizon_allowed_still_solves() -> None:
    """Every time at its maximum and the highest lateness cost: the solver's sums fit."""
    far = {"latest_s": HORIZON_MAX_S, "service_s": 24 * 3600}
    p = problem(
        stops=[GOOD_STOP | far, GOOD_STOP | far | {"id": "t", "location": at(2, 2)}],
        vehicles=[GOOD_VEHICLE | {"shift_end_s": HORIZON_MAX_S, "capacity": 10_000}],
        lateness_cost_per_s=10_000,
        max_lateness_s=HORIZON_MAX_S,
    )
    solution = solve(p, TIMES, time_limit_s=1)
    assert solution.dropped == [] and [v.stop_id for v in solution.routes[0].visits] in (["s", "t"], ["t", "s"])


# ---------------------------------------------------------------- reproducibility and geography


def test_same_seed_same_answer() -> None:
    p = random_problem(3)
    runs = [solve(p, TIMES, time_limit_s=5, seed=7, solution_limit=50) for _ in range(2)]
    assert not runs[0].stats.time_limit_reached
    assert runs[0].model_dump(exclude={"stats": {"wall_time_s"}}) == runs[1].model_dump(
        exclude={"stats": {"wall_time_s"}}
    )


def test_travel_times_are_the_delivery_eta_model() -> None:
    settings = Settings()
    store, door = LatLng(12.9716, 77.5946), LatLng(12.9816, 77.6046)
    p = problem(
        stops=[{"id": "s", "location": {"lat": door.lat, "lng": door.lng}, "latest_s": 9000}],
        vehicles=[GOOD_VEHICLE | {"shift_end_s": 9000, "vehicle_type": "bicycle"}],
        depot={"location": {"lat": store.lat, "lng": store.lng}},
        open_routes=True,
    )
    solution = solve(p, HaversineTravelTimes(settings), time_limit_s=LIMIT_S)
    expected = math.ceil(travel_s(haversine_m(store, door), Vehicle.bicycle, settings))
    assert solution.routes[0].visits[0].arrival_s == expected


# ---------------------------------------------------------------- Solomon and its checker


def test_solomon_files_load() -> None:
    c101, r101 = load_solomon(SOLOMON / "C101.txt"), load_solomon(SOLOMON / "R101.txt")
    assert (c101.vehicles, c101.capacity, len(c101.x)) == (25, 200, 101)
    assert (c101.x[0], c101.y[0], c101.due[0], c101.service[1]) == (40, 50, 1236, 90)
    assert (r101.capacity, len(r101.x)) == (200, 101)
    assert len(load_bks(SOLOMON / "bks.csv")) == 56


def test_solomon_subset_solved_and_checked() -> None:
    full = load_solomon(SOLOMON / "R101.txt")
    small = dataclasses.replace(
        full, **{f: getattr(full, f)[:13] for f in ("x", "y", "demand", "ready", "due", "service")}
    )
    solution = solve_matrix(solomon_problem(small), time_limit_s=LIMIT_S)
    assert solution.found and not solution.dropped
    assert check_solomon(small, solution.routes) * 10 == solution.stats.objective
    missing = [list(r) for r in solution.routes if r]
    missing[0].pop(0)
    with pytest.raises(InfeasibleRoutes, match="exactly once"):
        check_solomon(small, missing)
    # R101's windows are ten minutes wide: latest-due first cannot keep them.
    with pytest.raises(InfeasibleRoutes, match="due"):
        check_solomon(small, [sorted(range(1, 13), key=lambda c: -small.due[c])])


# ---------------------------------------------------------------- dispatch's trips and ops' what-if


def metres(origin: LatLng, north: float, east: float) -> LatLng:
    return LatLng(
        origin.lat + north / 111_000, origin.lng + east / (111_000 * math.cos(math.radians(origin.lat)))
    )


SHOP = LatLng(12.9716, 77.5946)
# Three drops (north, east metres from the store) where nearest-neighbour from the store takes
# the middle one first and pays ~300 m more than the best order, (-148, 361) first.
DROPS = [(376.0, -385.0), (311.0, 90.0), (-148.0, 361.0)]


def test_a_trip_is_ordered_better_than_nearest_neighbour_and_timed_as_the_etas() -> None:
    from models.delivery_rules import direct_route, route_etas_s
    from models.routing import trip_problem, trip_route

    settings = Settings(delivery_batch_max_added_delay_seconds=3600)  # windows never bind here
    start = metres(SHOP, 400, 0)
    ids = [uuid.UUID(int=i + 1) for i in range(len(DROPS))]
    points = [metres(SHOP, n, e) for n, e in DROPS]
    drops = list(zip(ids, points, strict=True))
    route = trip_route(
        solve(
            trip_problem(start, SHOP, drops, Vehicle.scooter, settings),
            HaversineTravelTimes(settings),
            time_limit_s=LIMIT_S,
        )
    )
    assert route is not None and route.planner == "optimizer"

    def length(order: Sequence[int]) -> float:
        legs = [SHOP, *(points[i] for i in order)]
        return sum(haversine_m(a, b) for a, b in itertools.pairwise(legs))

    best = min(itertools.permutations(range(3)), key=length)
    assert list(route.order_ids) == [ids[i] for i in best] == [ids[2], ids[1], ids[0]]
    nearest = [ids[1], ids[0], ids[2]]  # what nearest-neighbour from the store does
    assert length([1, 0, 2]) - length(best) > 250
    # Planned ETAs are the delivery ETA model's along that order (whole seconds, each leg up).
    etas = route_etas_s(start, [SHOP, *(points[i] for i in best)], Vehicle.scooter, settings)[1:]
    assert all(0 <= got - want <= 4 for got, want in zip(route.etas_s, etas, strict=True))
    # The fallback keeps the order it is given and times it the same way.
    fallback = direct_route(start, SHOP, [drops[i] for i in (1, 0, 2)], Vehicle.scooter, settings)
    assert (list(fallback.order_ids), fallback.planner) == (nearest, "nearest_neighbour")
    single = direct_route(start, SHOP, drops[:1], Vehicle.scooter, settings)
    assert single.planner == "direct" and single.etas_s[0] == math.ceil(
        route_etas_s(start, [SHOP, points[0]], Vehicle.scooter, settings)[1]
    )


def test_a_what_if_plan_picks_up_every_order_at_the_store_before_its_drop() -> None:
    from models.routing import queue_problem

    settings = Settings()
    partners = [
        ("near", metres(SHOP, 200, 0), Vehicle.scooter),
        ("far", metres(SHOP, -2500, 0), Vehicle.bicycle),
    ]
    orders = [(f"o{i}", metres(SHOP, n, e)) for i, (n, e) in enumerate(DROPS)]
    p = queue_problem(SHOP, partners, orders, settings)
    solution = solve(p, HaversineTravelTimes(settings), time_limit_s=LIMIT_S)
    assert solution.dropped == []
    for route in solution.routes:
        seen = [v.stop_id for v in route.visits]
        for oid in (o for o in seen if not o.startswith("pickup:")):
            assert seen.index(f"pickup:{oid}") < seen.index(oid)
        assert max(v.load_after for v in route.visits) <= settings.delivery_batch_max_orders
    # The near partner takes them all (three fit in one bag).
    assert [r.vehicle_id for r in solution.routes] == ["near"]


def _descent_operators(problem: MatrixProblem) -> Any:
    params = pywrapcp.DefaultRoutingSearchParameters()
    _iterated(params, problem)
    return params.local_search_operators


def test_the_descent_keeps_the_moves_each_problem_needs() -> None:
    """ILS's descent drops the moves a model cannot use, never the ones it needs: a problem with
    optional visits keeps making visits active (else a dropped stop is never put back), one
    with pairs keeps the pair moves; the costly neighborhoods are off for all."""
    travel = [[[0, 5, 5], [5, 0, 5], [5, 5, 0]]]
    mandatory = MatrixProblem(
        travel=travel,
        demands=[0, 1, 1],
        windows=[(0, 100)] * 3,
        service=[0] * 3,
        vehicles=[MatrixVehicle(0, 0, 5, 0, 100)],
    )
    optional = dataclasses.replace(mandatory, drop_penalty=1000)
    paired = dataclasses.replace(mandatory, demands=[0, 1, -1], pairs=[(1, 2)])
    off, on = optional_boolean_pb2.BOOL_FALSE, optional_boolean_pb2.BOOL_TRUE
    ops = {
        name: _descent_operators(p)
        for name, p in [("mandatory", mandatory), ("optional", optional), ("paired", paired)]
    }
    assert ops["mandatory"].use_make_active == off and ops["mandatory"].use_relocate_pair == off
    assert ops["optional"].use_make_active == on and ops["optional"].use_make_inactive == on
    assert ops["paired"].use_relocate_pair == on and ops["paired"].use_exchange_subtrip == on
    assert all(o.use_lin_kernighan == off and o.use_relocate == on for o in ops.values())
