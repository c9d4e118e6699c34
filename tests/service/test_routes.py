"""Route optimization through the real stack: ops' REST planning on the RouteOptimizer
deployment (solves as Ray tasks), its answers checked independently against every window and
capacity, bad input as 422s naming the field, concurrent requests, the time budget, and
dispatch ordering a batched trip with the optimizer or, when it is down, nearest-neighbour."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import ray

from config.settings import get_settings
from models.delivery_rules import LatLng, Vehicle, haversine_m, travel_s
from models.routing import SOLVER_PORTFOLIO
from tests.conftest import Live, Session
from tests.service.shop import Shop, make_shop
from tests.service.test_delivery import confirmed_order, move_to, offer_for, ok, partner_at, round_now
from tests.service.test_orders import wait_for

pytestmark = pytest.mark.usefixtures("live")

STORE = (12.9716, 77.5946)


@pytest.fixture(scope="module")
def ops(live: Live) -> Session:
    session = live.login()
    live.sql("UPDATE users SET role = 'ops' WHERE id = :id", id=session.user_id)
    return session


@pytest.fixture
def shop(live: Live) -> Shop:
    return make_shop(live, "routes-test")


def store_batch(seed: int, stops: int = 30, vehicles: int = 8, *, hard: bool = False) -> dict[str, Any]:
    """A store's batch: drops within ~3 km, partners within ~2 km, ten-to-forty-five-minute
    windows, one to three items each, open routes from where the partners are."""
    rng = random.Random(seed)

    def near(km: float) -> dict[str, float]:
        return {"lat": STORE[0] + rng.uniform(-km, km) / 111, "lng": STORE[1] + rng.uniform(-km, km) / 111}

    return {
        "depot": {"location": {"lat": STORE[0], "lng": STORE[1]}},
        "vehicles": [
            {
                "id": f"p{k}",
                "start": near(2),
                "capacity": 10,
                "shift_end_s": 3 * 3600,
                "vehicle_type": rng.choice(["bicycle", "scooter", "motorbike"]),
            }
            for k in range(vehicles)
        ],
        "stops": [
            {
                "id": f"s{i}",
                "location": near(3),
                "demand": rng.randint(1, 3),
                "latest_s": rng.randint(600, 2700),
                "service_s": 120,
            }
            for i in range(stops)
        ],
        "open_routes": True,
        **({"max_lateness_s": 0} if hard else {}),
    }


def optimize(ops: Session, body: dict[str, Any], time_limit_s: float = 0.3) -> Any:
    return ops.request("POST", f"/delivery/routes/optimize?time_limit_s={time_limit_s}", json=body)


def check_routes(body: dict[str, Any], answer: dict[str, Any]) -> None:
    """Recompute every route from the problem alone: each stop served once or dropped, loads
    within capacity, hard windows kept (soft ones: lateness as reported), arrivals as the
    delivery ETA model (haversine x road factor / speed, whole seconds up) gives them."""
    settings = get_settings()
    stops = {s["id"]: s for s in body["stops"]}
    vehicles = {v["id"]: v for v in body["vehicles"]}
    served = [v["stop_id"] for r in answer["routes"] for v in r["visits"]]
    dropped = [d["stop_id"] for d in answer["dropped"]]
    assert sorted(served + dropped) == sorted(stops) and len(set(served)) == len(served)
    hard = body.get("max_lateness_s") == 0
    for route in answer["routes"]:
        vehicle = vehicles[route["vehicle_id"]]
        here = LatLng(**vehicle["start"])
        t, load = route["start_s"], sum(stops[v["stop_id"]]["demand"] for v in route["visits"])
        assert load <= vehicle["capacity"]
        for visit in route["visits"]:
            stop = stops[visit["stop_id"]]
            there = LatLng(**stop["location"])
            t += math.ceil(travel_s(haversine_m(here, there), Vehicle(vehicle["vehicle_type"]), settings))
            t = max(t, stop["earliest_s"] if "earliest_s" in stop else 0)
            assert visit["arrival_s"] == t
            assert visit["lateness_s"] == max(0, t - stop["latest_s"])
            if hard:
                assert t <= stop["latest_s"]
            load -= stop["demand"]
            assert visit["load_after"] == load
            t += stop["service_s"]
            here = there


# ---------------------------------------------------------------- ops over REST


def test_ops_plans_routes_that_keep_every_window_and_capacity(ops: Session):
    body = store_batch(1, stops=12, vehicles=3, hard=True)
    answer = ok(optimize(ops, body))
    check_routes(body, answer)
    assert answer["routes"] and answer["stats"]["objective"] is not None
    assert answer["travel_s"] == sum(r["travel_s"] for r in answer["routes"])
    # Soft windows: every stop served, late ones say by how much.
    soft = store_batch(2, stops=30, vehicles=8)
    answer = ok(optimize(ops, soft))
    check_routes(soft, answer)
    assert answer["dropped"] == []


def test_only_ops_and_admins_plan_routes(live: Live, user: Session):
    assert user.request("POST", "/delivery/routes/optimize", json=store_batch(3, 3, 1)).status_code == 403
    anonymous = live.client().post("/delivery/routes/optimize", json=store_batch(3, 3, 1))
    assert anonymous.status_code == 401


def _bad(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("path", "value", "loc", "kind"),
    [
        (("stops", 0, "location", "lat"), 91, ["body", "stops", 0, "location", "lat"], "less_than_equal"),
        (("stops", 1, "earliest_s"), 5000, ["body", "stops", 1, "latest_s"], "window_order"),
        (("stops", 2, "demand"), 99, ["body", "stops", 2, "demand"], "over_capacity"),
        (("stops", 1, "id"), "s0", ["body", "stops", 1, "id"], "duplicate_id"),
        (("pairs",), [{"pickup": "s0", "drop": "nope"}], ["body", "pairs", 0, "drop"], "unknown_stop"),
        (("vehicles",), [], ["body", "vehicles"], "too_short"),
        (("vehicles", 0, "vehicle_type"), "rocket", ["body", "vehicles", 0, "vehicle_type"], "enum"),
    ],
)
def test_bad_problems_are_422_naming_the_field(ops: Session, path, value, loc, kind):
    body = _bad(store_batch(4, stops=4, vehicles=2), path, value)
    if path == ("pairs",):
        for stop in body["stops"]:
            stop["demand"] = 0
    response = optimize(ops, body)
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert (error["loc"], error["type"]) == (loc, kind)
    assert "input" not in error  # nothing echoed back


def test_a_budget_out_of_range_is_422(ops: Session):
    for limit in (0, -1, 26):
        response = optimize(ops, store_batch(5, 3, 1), time_limit_s=limit)
        assert response.status_code == 422 and response.json()["errors"][0]["loc"] == [
            "query",
            "time_limit_s",
        ]


def test_concurrent_requests_each_get_their_own_plan(ops: Session):
    bodies = [store_batch(10 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: optimize(ops, b), bodies))
    for body, response in zip(bodies, answers, strict=True):
        check_routes(body, ok(response))


def test_past_its_budget_a_request_returns_the_best_found(ops: Session):
    answer = ok(optimize(ops, store_batch(6, stops=80, vehicles=25), time_limit_s=0.5))
    stats = answer["stats"]
    assert stats["time_limit_reached"] is True
    assert stats["objective"] is not None and answer["dropped"] == []
    assert stats["wall_time_s"] < 2.0


# ---------------------------------------------------------------- dispatch


async def test_solvers_start_with_the_first_solve_and_stop_when_idle() -> None:
    """An optimizer (here in this driver) holds no solver process until it solves, and lets
    them go after `route_optimizer_solver_idle_seconds` without a solve."""
    from actors.routing import RouteOptimizer
    from models.routing import RoutingProblem

    optimizer = RouteOptimizer.func_or_class()  # the class behind the deployment
    optimizer.settings = optimizer.settings.model_copy(update={"route_optimizer_solver_idle_seconds": 1.0})
    assert optimizer._solvers == []
    problem = RoutingProblem.model_validate(store_batch(7, stops=12, vehicles=3))
    solution = await optimizer.solve(problem, 0.3)
    solvers = list(optimizer._solvers)
    assert len(solvers) == get_settings().route_optimizer_portfolio and solution.routes
    assert await optimizer.solve(problem, 0.2) and optimizer._solvers == solvers  # kept while in use
    for _ in range(50):
        if not optimizer._solvers:
            break
        await asyncio.sleep(0.1)
    assert optimizer._solvers == []
    with pytest.raises(ray.exceptions.RayActorError):
        await solvers[0].solve.remote(problem, time.time() + 0.1, SOLVER_PORTFOLIO[0])


def _queued_pair(live: Live, shop: Shop, ops: Session) -> tuple[Session, dict[str, tuple[float, float]]]:
    """A partner without a position yet and two confirmed orders whose drops are close
    together (one trip), both queued; returns the partner and each order's (north, east) m."""
    store = shop.store_a
    partner = partner_at(live, ops, store, km_north=None)
    drops = {}
    for north, east in ((-150.0, 40.0), (-320.0, 160.0)):
        order = confirmed_order(live, shop, north_m=north, east_m=east)[1]
        drops[order["id"]] = (north, east)
    board = f"/delivery/stores/{store['id']}/board"
    wait_for(
        lambda: sum(o["state"] == "queued" for o in ok(ops.request("GET", board))["orders"]) == 2 or None,
        30,
        "both orders queued",
    )
    return partner, drops


def _best_order(start: tuple[float, float], drops: dict[str, tuple[float, float]]) -> list[str]:
    def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
        return math.dist(a, b)

    def length(order: tuple[str, ...]) -> float:
        here, total = (0.0, 0.0), 0.0
        for oid in order:
            total += metres(here, drops[oid])
            here = drops[oid]
        return total

    return list(min(itertools.permutations(drops), key=length))


def test_dispatch_orders_a_batched_trip_with_the_optimizer(live: Live, shop: Shop, ops: Session):
    partner, drops = _queued_pair(live, shop, ops)
    store = shop.store_a
    move_to(partner, store["lat"] + 0.4 / 111, store["lng"])
    round_now(ops, store)
    offer = offer_for(partner)
    assert (offer["route_planner"], offer["route_fallback"]) == ("optimizer", None)
    assert [str(o) for o in offer["order_ids"]] == _best_order((0, 0), drops)
    # Planned ETAs: the ride to the store, a handover, then each drop with its own handover.
    settings = get_settings()
    first, second = offer["planned_eta_s"]
    handover = settings.delivery_handover_seconds
    to_store = travel_s(400, Vehicle.scooter, settings) + handover
    assert first > to_store + handover and second > first + handover


def test_dispatch_falls_back_to_nearest_neighbour_when_the_optimizer_is_down(
    live: Live, shop: Shop, ops: Session
):
    partner, drops = _queued_pair(live, shop, ops)
    store = shop.store_a
    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "#RouteOptimizer#" in a["name"] and a["namespace"] == "serve"
    ]
    assert replicas
    for name in replicas:  # Serve starts new ones, which takes seconds
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    move_to(partner, store["lat"] + 0.4 / 111, store["lng"])
    round_now(ops, store)
    offer = offer_for(partner)
    assert offer["route_planner"] == "nearest_neighbour"
    assert offer["route_fallback"] in ("optimizer_unavailable", "optimizer_late")
    nearest = min(drops, key=lambda oid: math.dist((0, 0), drops[oid]))
    assert str(offer["order_ids"][0]) == nearest
    assert len(offer["planned_eta_s"]) == 2
    # Serve brings the optimizer back.
    wait_for(lambda: optimize(ops, store_batch(7, 3, 1)).status_code == 200 or None, 90, "the optimizer")


def test_ops_see_a_what_if_plan_of_the_queue_that_changes_nothing(live: Live, shop: Shop, ops: Session):
    partner, drops = _queued_pair(live, shop, ops)
    store = shop.store_a
    plan = f"/delivery/stores/{store['id']}/routes/plan?time_limit_s=0.2"
    response = ops.request("POST", plan)
    assert (response.status_code, response.json()["code"]) == (409, "no_idle_partners")
    # A position too old for dispatch (no offer follows) is still where the partner is.
    stale = {"lat": store["lat"] + 0.4 / 111, "lng": store["lng"], "ts": time.time() - 120, "accuracy_m": 8.0}
    ok(partner.request("POST", "/delivery/partners/me/positions", json={"points": [stale]}))
    answer = ok(ops.request("POST", plan))
    (route,) = answer["routes"]
    assert route["vehicle_id"] == partner.user_id
    visits = [v["stop_id"] for v in route["visits"]]
    assert sorted(visits) == sorted([*drops, *(f"pickup:{o}" for o in drops)])
    assert all(visits.index(f"pickup:{o}") < visits.index(o) for o in drops)
    round_now(ops, store)
    assert ok(partner.request("GET", "/delivery/partners/me/offers")) == []
    board = ok(ops.request("GET", f"/delivery/stores/{store['id']}/board"))
    assert sorted(o["id"] for o in board["orders"] if o["state"] == "queued") == sorted(drops)
    assert user_forbidden(live, plan)


def user_forbidden(live: Live, path: str) -> bool:
    return live.login().request("POST", path).status_code == 403
