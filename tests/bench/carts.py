"""Benchmark (not a test): the cart hot paths through Ray Serve, and the Redis floor under them.

- `POST /carts/me/items` and `GET /carts/me` through Serve (HAProxy ingress, one carts
  replica, the shard actors), 32 concurrent clients spread over many users;
- the same operations done directly on Redis from one asyncio process: an add is GET + SET
  (with TTL) of the cart JSON, a read is GET; that is the write-through with nothing else.

Prints req/s, p50/p99 and the Serve/Redis ratio.

    python -m tests.bench.carts --seconds 15 --concurrency 32 --users 256

HTTP load comes from `wrk`, cycling through pre-built requests (users and products in random
order); it and the Redis floor run at nice 15 like Ray's workers, on the same 2-core machine as
the backend: compare within the run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from datetime import timedelta
from typing import Any

from tests.bench.common import at_bench_niceness, bench_arguments, bench_environment, report, summary, wrk


async def redis_floor(
    redis_url: str, op: str, payloads: list[str], seconds: float, concurrency: int
) -> dict[str, float]:
    """The bare write-through: GET + SET EX of a cart JSON (add) or GET (read), same JSON sizes."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, decode_responses=True, max_connections=concurrency)
    keys = [f"bench-cart:{i}" for i in range(len(payloads))]
    for key, payload in zip(keys, payloads, strict=True):
        await redis.set(key, payload, ex=3600)
    latencies: list[float] = []
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (start := time.perf_counter()) < deadline:
            key = keys[next(counter) % len(keys)]
            state = json.loads(await redis.get(key) or "{}")
            if op == "add":
                state.setdefault("lines", []).append({"quantity": 1})
                state["lines"] = state["lines"][-8:]  # keep the size steady
                await redis.set(key, json.dumps(state), ex=3600)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await redis.delete(*keys)
    await redis.aclose()
    return summary(latencies, 0, elapsed)


async def make_fixture(settings: Any, n_users: int, n_products: int) -> tuple[list[str], list[str]]:
    """A store, products with ample stock, and `n_users` customers with an address there and a
    session each; returns (access tokens, product ids). Written straight to the database."""
    from sqlalchemy import text

    from models.db import make_engine, utcnow
    from models.tokens import TokenService

    tokens = TokenService.from_settings(settings)
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    lat, lng = round(random.uniform(-45, -20), 5), round(random.uniform(-150, -100), 5)
    store, category = uuid.uuid4(), uuid.uuid4()
    products = [uuid.uuid4() for _ in range(n_products)]
    now = utcnow()
    access: list[str] = []
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)"
                " VALUES (:id, :code, 'Bench store', 'Benchville', :lat, :lng, 2, '00:00', '00:00')"
            ),
            {"id": store, "code": "BENCH" + store.hex[:8].upper(), "lat": lat, "lng": lng},
        )
        await conn.execute(
            text("INSERT INTO categories (id, slug, name) VALUES (:id, :slug, 'Bench')"),
            {"id": category, "slug": "bench-" + category.hex[:8]},
        )
        for i, pid in enumerate(products):
            price = 1000 + 250 * i
            await conn.execute(
                text(
                    "INSERT INTO products (id, sku, name, category_id, mrp_paise, price_paise, tax_rate_bp)"
                    " VALUES (:id, :sku, :name, :cid, :mrp, :price, :tax)"
                ),
                {
                    "id": pid,
                    "sku": "BENCH-" + pid.hex[:12],
                    "name": f"Bench product {i}",
                    "cid": category,
                    "mrp": price + 200,
                    "price": price,
                    "tax": (0, 500, 1200, 1800)[i % 4],
                },
            )
            await conn.execute(
                text("INSERT INTO inventory (store_id, product_id, on_hand) VALUES (:s, :p, 1000000)"),
                {"s": store, "p": pid},
            )
        for i in range(n_users):
            uid, sid = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                text("INSERT INTO users (id, phone) VALUES (:id, :phone)"),
                {"id": uid, "phone": f"+9197{i:08d}"},
            )
            await conn.execute(
                text(
                    "INSERT INTO addresses (id, user_id, label, line1, city, pincode, lat, lng, is_default)"
                    " VALUES (:id, :u, 'home', '1 Bench Road', 'Benchville', '560001', :lat, :lng, true)"
                ),
                {"id": uuid.uuid4(), "u": uid, "lat": lat, "lng": lng},
            )
            await conn.execute(
                text(
                    "INSERT INTO auth_sessions (id, user_id, created_at, last_used_at, expires_at)"
                    " VALUES (:id, :u, :now, :now, :exp)"
                ),
                {"id": sid, "u": uid, "now": now, "exp": now + timedelta(days=1)},
            )
            access.append(tokens.issue(user_id=uid, session_id=sid, role="customer", now=now))
    await engine.dispose()
    return access, [str(p) for p in products]


def main() -> None:
    args = bench_arguments(__doc__, seconds=15, concurrency=32, users=256, products=40)

    bench_environment()

    from deployments.launcher import backend

    with backend(reset=True) as settings:
        base = f"http://{settings.http_host}:{settings.http_port}/carts/me"
        tokens, products = asyncio.run(make_fixture(settings, args.users, args.products))
        headers = [{"Authorization": f"Bearer {t}"} for t in tokens]
        at_bench_niceness()
        adds = [
            ("POST", f"{base}/items", random.choice(headers), json.dumps({"product_id": random.choice(products), "quantity": 1}))
            for _ in range(4096)
        ]
        reads = [("GET", base, h, None) for h in headers]

        results: dict[str, dict[str, float]] = {}
        wrk(reads, 3, args.concurrency)  # warm up: shards, pools, caches
        results["POST /carts/me/items (Serve)"] = wrk(adds, args.seconds, args.concurrency)
        results["GET /carts/me (Serve)"] = wrk(reads, args.seconds, args.concurrency)

        # The Redis floor uses the carts as the run left them: the same JSON sizes.
        import redis as sync_redis

        kv = sync_redis.Redis.from_url(settings.redis_url, decode_responses=True)
        payloads = [v for k in kv.scan_iter("cart:*") if (v := kv.get(k))]
        kv.close()
        sizes = sorted(len(p) for p in payloads)
        for name, op in (("add", "add"), ("get", "get")):
            results[f"Redis {name} floor ({'GET+SET' if op == 'add' else 'GET'})"] = asyncio.run(
                redis_floor(settings.redis_url, op, payloads, args.seconds, args.concurrency)
            )

    print(
        f"\ncarts, {args.concurrency} concurrent clients over {args.users} users, {args.seconds:.0f} s each;"
        f" cart JSON {sizes[0]}-{sizes[-1]} bytes (median {sizes[len(sizes) // 2]}) in {len(sizes)} carts"
    )
    for name, r in results.items():
        report(name, r, name_width=34, rps_width=8)
    post, get, floor_add, floor_get = results.values()
    print(f"ratio Serve/Redis, add:  {post['rps'] / floor_add['rps']:.3f}")
    print(f"ratio Serve/Redis, read: {get['rps'] / floor_get['rps']:.3f}")


if __name__ == "__main__":
    main()
