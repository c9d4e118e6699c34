"""Benchmark (not a test): a store's batch (30 stops, 8 partners, open routes, soft windows)
planned through Serve (`POST /delivery/routes/optimize`, the RouteOptimizer deployment, its
solves as Ray tasks) with the default search time, 100 requests one at a time and 100 from 4
clients at once; p50/p99 of each beside the same solve called in this process (no Serve, no
Ray task, one configuration): the floor, since OR-Tools' search runs for its time limit.

    make bench            # or: python -m tests.bench.route_service --requests 100
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.bench.common import at_bench_niceness, bench_environment, login, summary


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    bench_environment()

    from deployments.launcher import backend, local_ray_env

    local_ray_env()  # before anything imports Ray (the test module below does)
    from config.settings import get_settings
    from models.routing import HaversineTravelTimes, RoutingProblem, solve
    from tests.service.test_routes import store_batch

    bodies = [store_batch(1000 + i) for i in range(args.requests)]
    with backend(reset=True) as settings:
        base = f"http://{settings.http_host}:{settings.http_port}"
        token = login(base, settings.admin_phone)
        at_bench_niceness()
        limit = get_settings().route_optimizer_time_limit_seconds
        print(
            f"30 stops, 8 vehicles; search time {limit} s (the default); portfolio of "
            f"{settings.route_optimizer_portfolio} on problems over {settings.route_optimizer_portfolio_min_stops} stops"
        )
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:

            def one(body: dict[str, object]) -> tuple[float, bool, float]:
                began = time.perf_counter()
                r = client.post("/delivery/routes/optimize", json=body)
                ok = r.status_code == 200 and not r.json()["dropped"]
                return time.perf_counter() - began, ok, r.json()["travel_s"] if ok else 0

            for body in bodies[:3]:  # warm: the task workers, the connection
                one(body)
            for clients in (1, args.clients):
                began = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    runs = list(pool.map(one, bodies))
                s = summary(
                    [t for t, _, _ in runs], sum(not ok for _, ok, _ in runs), time.perf_counter() - began
                )
                print(
                    f"Serve, {clients} client(s):   p50 {s['p50_ms']:7.1f} ms   p99 {s['p99_ms']:7.1f} ms   "
                    f"{s['rps']:.2f} plans/s   ({int(s['errors'])} failed or dropped stops; "
                    f"mean travel {statistics.mean(tr for _, _, tr in runs):.0f} s)"
                )
        times = HaversineTravelTimes(settings)
        floor = []
        for body in bodies:
            began = time.perf_counter()
            solve(RoutingProblem.model_validate(body), times, time_limit_s=limit)
            floor.append(time.perf_counter() - began)
        s = summary(floor, 0, sum(floor))
        print(f"in-process solve (floor):  p50 {s['p50_ms']:7.1f} ms   p99 {s['p99_ms']:7.1f} ms")


if __name__ == "__main__":
    main()
