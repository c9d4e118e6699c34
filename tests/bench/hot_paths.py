"""Benchmark (not a test): the hot read routes of the default stack through Serve (HAProxy
ingress, one replica per deployment, the seed's data and first recommender model), each with
`wrk` at 32 connections at nice 15 after a short warm-up, 16 known customers cycling (the demo
customers and the imported histories, each at the store of their latest order). Beside each
route, the CPU time a request cost the five processes that spent most (replica, actors,
HAProxy, PostgreSQL...), read from /proc around the run, and first `GET /users/healthz` (a
PostgreSQL and a Redis round trip) as the platform's floor in the same run. Where the route's
app can run alone (users, products, search without the Recommender), the same app under bare
uvicorn (one worker, nice 15) right after it, and the ratio Serve/uvicorn: a figure to watch,
not a goal (the faster our code, the more Serve's own cost shows).

    python -m tests.bench.hot_paths [--seconds 10] [--concurrency 32]

Goal (issue 12): every route >= 600 req/s with p99 <= 100 ms.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import ExitStack

import psutil

from tests.bench.common import (
    WrkRequest,
    at_bench_niceness,
    bare_uvicorn,
    bench_arguments,
    bench_environment,
    known_customers,
    login,
    report,
    their_stores,
    wrk,
)

CUSTOMERS = 16


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        cmdline = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or "?"
        # PostgreSQL backends rename themselves by state: count them as one.
        name = "postgres (every backend)" if "postgres" in (proc.info["name"] or "") else cmdline[:60]
        out[proc.pid] = (name, times.user + times.system)
    return out


def _per_request_cpu(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], n: int
) -> str:
    spent: Counter[str] = Counter()
    for pid, (name, seconds) in after.items():
        spent[name] += seconds - before.get(pid, (name, 0.0))[1]
    shown = [(name, s * 1000 / max(n, 1)) for name, s in spent.most_common(5) if s * 1000 / max(n, 1) >= 0.05]
    return "\n".join(f"    {ms:6.3f} ms  {name}" for name, ms in shown)


def _requests(url: str, tokens: dict[str, str], stores: dict[str, str]) -> list[WrkRequest]:
    """`url` for each customer: their token, their store in place of `{store}`."""
    return [
        ("GET", url.replace("{store}", stores[phone]), {"Authorization": f"Bearer {token}"}, None)
        for phone, token in tokens.items()
    ]


def main() -> None:
    args = bench_arguments(__doc__, seconds=10, concurrency=32)
    bench_environment()
    from sqlalchemy import text

    from deployments.launcher import backend
    from models.db import make_engine, make_sessionmaker

    with backend(reset=True) as settings:
        assert settings.database_url
        base = f"http://{settings.http_host}:{settings.http_port}"
        phones = known_customers(CUSTOMERS)

        async def facts() -> tuple[dict[str, str], str]:
            engine = make_engine(settings.database_url or "", pool_size=1, max_overflow=0)
            try:
                async with make_sessionmaker(engine)() as session:
                    stores = await their_stores(session, phones)
                    product = await session.scalar(
                        text("SELECT id::text FROM products WHERE is_active ORDER BY sku LIMIT 1")
                    )
                    return stores, str(product)
            finally:
                await engine.dispose()

        stores, product = asyncio.run(facts())
        tokens = {phone: login(base, phone) for phone in phones}
        at_bench_niceness()
        # Each route, and the app that serves it alone under bare uvicorn for the baseline
        # (None: it needs Ray, the cart shards or the Recommender deployment).
        routes = [
            ("/users/healthz (floor)", "users"),
            ("/users/me", "users"),
            ("/products?store_id={store}&limit=20", "products"),
            ("/products/{id}?store_id={store}", "products"),
            ("/search?q=chocolate&store_id={store}", "search"),
            ("/carts/me", None),
            ("/search/recommendations?store_id={store}&limit=10", None),
            ("/search/recommendations/similar/{id}?store_id={store}&limit=10", None),
        ]
        print(f"\n{len(tokens)} customers, wrk -c{args.concurrency}, {args.seconds:g} s per route")
        with ExitStack() as bare:
            alone: dict[str, str] = {}  # service -> its bare uvicorn's base URL, started once
            for route, service in routes:
                path = route.removesuffix(" (floor)").replace("{id}", product)
                serve_requests = _requests(base + path, tokens, stores)
                wrk(serve_requests, 2, args.concurrency)  # warm-up: connections, caches, the carts
                before = _cpu_seconds()
                figures = wrk(serve_requests, args.seconds, args.concurrency)
                after = _cpu_seconds()
                report(route.split("?")[0], figures, name_width=44)
                print(_per_request_cpu(before, after, int(figures["requests"])))
                if service is None:
                    print("    (no bare-uvicorn baseline: the app needs Ray)")
                    continue
                if service not in alone:
                    alone[service] = bare.enter_context(bare_uvicorn(f"deployments.{service}:api", f"/{service}"))
                within = path.removeprefix(f"/{service}")  # the app's own path ("/?q=" for "?q=")
                within = within if within.startswith("/") else "/" + within
                bare_requests = _requests(alone[service] + within, tokens, stores)
                wrk(bare_requests, 2, args.concurrency)
                floor = wrk(bare_requests, args.seconds, args.concurrency)
                report("    same app, bare uvicorn", floor, name_width=44)
                print(f"    Serve/uvicorn {figures['rps'] / floor['rps']:.2f}")


if __name__ == "__main__":
    main()
