"""Benchmark (not a test): live tracking through Serve, partner socket -> fleet shard ->
Redis -> the customer's socket, against the same fan-out done by a bare uvicorn WebSocket
server in the same run (the floor: parse the position, forward it to the paired socket).

For each N (partners, each with one watching customer): every partner sends positions at a
given rate over `/delivery/ws/partner`; its customer watches its order over
`/delivery/ws/orders/{id}`; latency is the customer's receive time minus the position's
timestamp (one process, one clock). Prints p50/p99 at 1 position/s, and per N the highest
rate (of those tried) at which p99 stays <= 150 ms, ours and the floor's. Also times one
dispatch round of 200 queued orders x 500 partners.

    python -m tests.bench.tracking --seconds 10 --sizes 250,1000,2000 --rates 0.5,0.8,1,1.25,1.6,2

The rates are a grid fine enough for the sustainable-rate ratio (goal >= 0.8) to mean
something: on 0.5/1/2 alone every ratio is 0.5, 1 or 2.

The N pairs (users, sessions, partners, orders out for delivery, deliveries) are written
straight into PostgreSQL: the fixture is not what is measured. The load generator (Python
`websockets`) and the floor run at nice 15 like Ray's workers, on the same 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

from tests.bench.common import ROOT, at_bench_niceness, bench_environment, free_port, summary

GOAL_MS = 150.0

# ---------------------------------------------------------------- the floor: bare uvicorn fan-out


def floor_app() -> Any:
    """Partner i's positions, parsed and forwarded to watcher i: the fan-out with nothing else."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    watchers: dict[str, WebSocket] = {}

    async def watch(ws: WebSocket) -> None:
        await ws.accept()
        watchers[ws.path_params["i"]] = ws
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            watchers.pop(ws.path_params["i"], None)

    async def partner(ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                position = json.loads(await ws.receive_text())
                watcher = watchers.get(ws.path_params["i"])
                if watcher is not None:
                    await watcher.send_text(
                        json.dumps({"type": "tracking", "tracking": {"position": position}})
                    )
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[WebSocketRoute("/w/{i}", watch), WebSocketRoute("/p/{i}", partner)])


# ---------------------------------------------------------------- fixtures in PostgreSQL

FIXTURE = [
    """
    CREATE TEMP TABLE bench_pairs ON COMMIT DROP AS
    WITH s AS (SELECT id, lat, lng, row_number() OVER (ORDER BY code) - 1 AS k FROM stores WHERE is_active)
    SELECT i, s.id AS store_id, s.lat, s.lng,
           md5('bench-c-' || :run || i)::uuid AS customer, md5('bench-p-' || :run || i)::uuid AS partner,
           md5('bench-o-' || :run || i)::uuid AS order_id, md5('bench-f-' || :run || i)::uuid AS offer_id
    FROM generate_series(1, :n) AS i JOIN s ON s.k = i % (SELECT count(*) FROM s)
    """,
    """
    INSERT INTO users (id, phone, name, role)
    SELECT customer, '+917' || lpad((:base + i)::text, 9, '0'), 'Bench Customer', 'customer' FROM bench_pairs
    UNION ALL
    SELECT partner, '+918' || lpad((:base + i)::text, 9, '0'), 'Bench Partner', 'partner' FROM bench_pairs
    """,
    """
    INSERT INTO partners (user_id, store_id, vehicle, online, created_at, updated_at)
    SELECT partner, store_id, 'scooter', true, now(), now() FROM bench_pairs
    """,
    """
    INSERT INTO orders (id, user_id, store_id, delivery_address, status, payment_method, items_mrp_paise,
      subtotal_paise, coupon_discount_paise, taxable_value_paise, gst_paise, delivery_fee_paise,
      small_cart_fee_paise, tip_paise, total_paise, reservation, cart_version, created_at, updated_at)
    SELECT order_id, customer, store_id,
           jsonb_build_object('lat', lat + 0.01, 'lng', lng, 'line1', 'Bench', 'city', 'Bengaluru'),
           'out_for_delivery', 'cod', 1000, 1000, 0, 952, 48, 0, 0, 0, 1000, 'fulfilled', now(), now(), now()
    FROM bench_pairs
    """,
    """
    INSERT INTO payments (id, order_id, method, status, amount_paise)
    SELECT gen_random_uuid(), order_id, 'cod', 'cod_pending', 1000 FROM bench_pairs
    """,
    """
    INSERT INTO delivery_offers (id, store_id, partner_id, order_ids, status, created_at, expires_at)
    SELECT offer_id, store_id, partner, ARRAY[order_id], 'accepted', now(), now() FROM bench_pairs
    """,
    """
    INSERT INTO deliveries (id, order_id, offer_id, partner_id, store_id, seq, status, pin, created_at, updated_at)
    SELECT gen_random_uuid(), order_id, offer_id, partner, store_id, 0, 'picked_up', '1234', now(), now()
    FROM bench_pairs
    """,
    """
    INSERT INTO auth_sessions (id, user_id, created_at, last_used_at, expires_at)
    SELECT md5('s' || u)::uuid, u, now(), now(), now() + interval '1 day'
    FROM bench_pairs, LATERAL (VALUES (customer), (partner)) AS v(u)
    """,
]
PAIRS = "SELECT order_id, customer, partner, lat, lng FROM bench_pairs ORDER BY i"


async def make_pairs(settings: Any, n: int) -> list[dict[str, Any]]:
    """N (partner, customer) pairs with a delivery on the road, and an access token each."""
    from sqlalchemy import text

    from models.db import make_engine, utcnow
    from models.tokens import TokenService

    tokens = TokenService.from_settings(settings)
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    run = uuid.uuid4().hex[:8]
    base = int(time.time() * 1000) % 10**8
    try:
        async with engine.begin() as conn:
            for statement in FIXTURE:
                await conn.execute(text(statement), {"n": n, "run": run, "base": base})
            rows = (await conn.execute(text(PAIRS))).all()
        now = utcnow()

        def token(user_id: uuid.UUID, role: str) -> str:
            session_id = uuid.UUID(hashlib.md5(f"s{user_id}".encode()).hexdigest())  # noqa: S324 (an id)
            return tokens.issue(user_id=user_id, session_id=session_id, role=role, now=now)

        pairs = [
            {
                "order": str(r.order_id),
                "lat": r.lat,
                "lng": r.lng,
                "partner": token(r.partner, "partner"),
                "customer": token(r.customer, "customer"),
            }
            for r in rows
        ]
    finally:
        await engine.dispose()
    return pairs


# ---------------------------------------------------------------- the load


async def run_load(
    pairs: list[dict[str, Any]], partner_url: Any, watch_url: Any, rate: float, seconds: float, auth: bool
) -> dict[str, float]:
    """Open every watcher and partner socket, then send `rate` positions/s per partner for
    `seconds`; latency = receive time - the position's timestamp."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    latencies: list[float] = []
    arrivals: list[float] = []  # when each latency was seen, for the timeline
    opened: list[Any] = []

    async def open_socket(url: str, token: str) -> Any:
        # No client keepalive: an overloaded server answering pings late would be cut off by
        # the client, and the bench wants to see its latency instead.
        ws = await connect(
            url,
            open_timeout=60,
            max_queue=None,
            ping_interval=None,
            additional_headers={"X-Forwarded-For": "2001:db8::1"},
        )
        opened.append(ws)
        if auth:
            await ws.send(json.dumps({"type": "auth", "token": token}))
        return ws

    sem = asyncio.Semaphore(64)

    async def bounded(url: str, token: str) -> Any:
        async with sem:
            return await open_socket(url, token)

    opening = time.perf_counter()
    watchers = await asyncio.gather(*(bounded(watch_url(i, p), p["customer"]) for i, p in enumerate(pairs)))
    partners = await asyncio.gather(*(bounded(partner_url(i), p["partner"]) for i, p in enumerate(pairs)))
    if auth:  # each partner's `ready` (a socket the server closed instead counts as missing)
        await asyncio.gather(*(ws.recv() for ws in partners), return_exceptions=True)
    print(f"  {2 * len(pairs)} sockets open in {time.perf_counter() - opening:.1f} s", flush=True)
    measuring = False

    async def watch(ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                message = json.loads(raw)
                position = (message.get("tracking") or {}).get("position")
                if message.get("type") == "tracking" and position and measuring:
                    now = time.time()
                    latencies.append(now - position["ts"])
                    arrivals.append(now)

    async def send(i: int, ws: Any, pair: dict[str, Any], until: float) -> None:
        step = 0
        await asyncio.sleep((i % 100) / 100 / rate)  # spread the partners over the interval
        while time.monotonic() < until and ws.close_code is None:
            step += 1
            point = {"type": "position", "lat": pair["lat"] + 0.002 + step * 1e-6, "lng": pair["lng"],
                     "ts": time.time(), "accuracy_m": 5.0}  # fmt: skip
            with contextlib.suppress(ConnectionClosed):  # a dropped socket counts as missing
                await ws.send(json.dumps(point))
            await asyncio.sleep(1 / rate)

    readers = [asyncio.create_task(watch(ws)) for ws in watchers]
    await asyncio.gather(
        *(send(i, ws, p, time.monotonic() + 2) for i, (ws, p) in enumerate(zip(partners, pairs, strict=True)))
    )
    measuring = True
    began = time.perf_counter()
    began_at = time.time()
    await asyncio.gather(
        *(
            send(i, ws, p, time.monotonic() + seconds)
            for i, (ws, p) in enumerate(zip(partners, pairs, strict=True))
        )
    )
    await asyncio.sleep(1)
    elapsed = time.perf_counter() - began
    measuring = False
    for task in readers:
        task.cancel()
    closed = Counter(f"{who} {ws.close_code}" for who, group in (("watcher", watchers), ("partner", partners))
                     for ws in group if ws.close_code is not None)  # fmt: skip
    if closed:
        print(f"  sockets closed by the server during the run: {dict(closed)}", flush=True)
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    print_timeline(began_at, arrivals, latencies)
    expected = len(pairs) * rate * seconds
    errors = max(0, int(expected - len(latencies)))
    return summary(latencies, errors, elapsed)


def print_timeline(began_at: float, arrivals: list[float], latencies: list[float], slice_s: int = 5) -> None:
    """p50/p99 per slice of the run: a backlog left by opening the sockets shows in the first
    slices, a steady-state cost in all of them."""
    slices: dict[int, list[float]] = {}
    for at, latency in zip(arrivals, latencies, strict=True):
        slices.setdefault(int((at - began_at) // slice_s), []).append(latency * 1000)
    parts = []
    for k in sorted(slices):
        ms = sorted(slices[k])
        parts.append(
            f"{k * slice_s}s: {ms[len(ms) // 2]:.0f}/{ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.0f}"
        )
    print(f"  timeline p50/p99 ms per {slice_s} s: " + "  ".join(parts), flush=True)


def wait_answering(shards: list[Any]) -> None:
    """Until every restarted shard answers (a watcher connecting earlier would be told 1013)."""
    import ray

    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get([shard.stats.remote() for shard in shards], timeout=5)
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--sizes", default="250,1000,2000")
    parser.add_argument("--rates", default="0.5,0.8,1,1.25,1.6,2")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench_environment()
    os.environ["VURKSHA_PARTNER_POSITION_MIN_PERIOD_SECONDS"] = "0.05"  # the sweep goes past 2/s
    os.environ["VURKSHA_ACCESS_TOKEN_TTL_SECONDS"] = "3600"

    from deployments.launcher import backend

    results: dict[tuple[str, int, float], dict[str, float]] = {}
    with backend(reset=True) as settings:
        import ray

        base = f"ws://{settings.http_host}:{settings.http_port}"
        everyone = asyncio.run(make_pairs(settings, max(sizes)))  # each N uses the first N pairs
        shards = [
            ray.get_actor(f"fleet-shard-{i}", namespace="vurksha") for i in range(settings.fleet_shards)
        ]
        for shard in shards:  # load the trips just written
            ray.kill(shard, no_restart=False)
        wait_answering(shards)
        at_bench_niceness()
        port = free_port()
        floor = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "tests.bench.tracking:floor_app", "--port", str(port),
             "--log-level", "warning", "--ws-max-queue", "1024"],
            cwd=ROOT,
        )  # fmt: skip
        try:
            time.sleep(3)
            for n in sizes:
                pairs = everyone[:n]
                for rate in rates:
                    results[("Serve", n, rate)] = asyncio.run(
                        run_load(
                            pairs,
                            lambda i: f"{base}/delivery/ws/partner",
                            lambda i, p: f"{base}/delivery/ws/orders/{p['order']}",
                            rate,
                            args.seconds,
                            True,
                        )
                    )
                    results[("floor", n, rate)] = asyncio.run(
                        run_load(
                            pairs,
                            lambda i: f"ws://127.0.0.1:{port}/p/{i}",
                            lambda i, p: f"ws://127.0.0.1:{port}/w/{i}",
                            rate,
                            args.seconds,
                            False,
                        )
                    )
                    for who in ("Serve", "floor"):
                        r = results[(who, n, rate)]
                        print(
                            f"N={n:5d} rate={rate:g}/s {who:5s}: p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                            f"  ({int(r['requests'])} received, {int(r['errors'])} missing)",
                            flush=True,
                        )
        finally:
            floor.terminate()
            floor.wait(10)

    print(
        f"\npartner -> customer latency, {args.seconds:.0f} s per point; goal p99 <= {GOAL_MS:.0f} ms at N=1000, 1/s"
    )
    headline = 1.0 if 1.0 in rates else rates[0]
    for n in sizes:
        line = []
        sustainable = {}
        for who in ("Serve", "floor"):
            ok = [rate for rate in rates if results[(who, n, rate)]["p99_ms"] <= GOAL_MS]
            sustainable[who] = max(ok) if ok else 0.0
            r = results[(who, n, headline)]
            line.append(f"{who} p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms at {headline:g}/s")
        ratio = sustainable["Serve"] / sustainable["floor"] if sustainable["floor"] else float("nan")
        print(
            f"N={n}: {'; '.join(line)}; highest rate with p99 <= {GOAL_MS:.0f} ms:"
            f" Serve {sustainable['Serve']:g}/s, floor {sustainable['floor']:g}/s, ratio {ratio:.2f} (goal >= 0.8)"
        )
    round_timing()


def round_timing() -> None:
    """One dispatch round: 200 queued orders x 500 partners around one store."""
    import random

    from config.settings import Settings
    from models.delivery_rules import Candidate, LatLng, QueuedOrder, Vehicle, assignment_round

    rng = random.Random(9)
    store = LatLng(12.9716, 77.5946)

    def near(km: float) -> LatLng:
        return LatLng(store.lat + rng.uniform(-km, km) / 111, store.lng + rng.uniform(-km, km) / 111)

    queued = [QueuedOrder(uuid.uuid4(), store, near(3), rng.uniform(0, 60)) for _ in range(200)]
    fleet = [Candidate(uuid.uuid4(), near(5), 95, rng.choice(list(Vehicle))) for _ in range(500)]
    times = []
    for _ in range(5):
        began = time.perf_counter()
        offers = assignment_round(queued, fleet, now_s=100, settings=Settings())
        times.append(time.perf_counter() - began)
    print(
        f"dispatch round, 200 orders x 500 partners: {len(offers)} offers,"
        f" {min(times) * 1000:.1f} ms best / {sorted(times)[2] * 1000:.1f} ms median of 5"
    )


if __name__ == "__main__":
    main()
