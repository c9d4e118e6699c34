"""Benchmark (not a test): checkout (`POST /orders`, cash on delivery) through Ray Serve, and
the bare reservation transaction under it, straight on PostgreSQL.

- Serve: `concurrency` clients, each with its own customers (logged in through the OTP flow,
  an address inside a bench store's radius), loop: put one item in the cart
  (`POST /carts/me/items`), then check out with a fresh `Idempotency-Key`. Only the checkout
  request is timed for the checkout figures (the add is reported on its own line).
  (a) distinct: every client orders its own product; (b) hot: every client orders the same
  one, so all checkouts queue on one inventory row lock.
- Floor: what checkout must do in PostgreSQL, from one asyncio process over `concurrency`
  asyncpg connections: in one transaction lock the user row (FOR NO KEY UPDATE) and the
  inventory row (FOR UPDATE), the conditional reserve, and the orders, order_lines,
  payments, order_events and outbox rows; commit. Same two variants, on products of its own.

Prints req/s, p50/p99 per variant, the Serve/floor ratio, and a stock check: every bench
product's `reserved` must equal what the successful checkouts ordered of it.

    python -m tests.bench.checkout --seconds 15 --concurrency 32

The load generator is aiohttp (each checkout is a two-request journey with a fresh key, which
`wrk` cannot script); it and the floor run at nice 15 like Ray's workers, on the same 2-core
machine as the backend: compare within the run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from tests.bench.common import (
    asyncpg_dsn,
    at_bench_niceness,
    bench_arguments,
    bench_environment,
    login,
    report,
    summary,
)

STOCK = 10_000_000
SHOW_ERRORS = 5


@dataclass(frozen=True)
class Customer:
    user_id: uuid.UUID
    address_id: uuid.UUID
    headers: dict[str, str]


@dataclass(frozen=True)
class Product:
    id: uuid.UUID
    name: str
    price_paise: int
    mrp_paise: int
    tax_rate_bp: int


@dataclass
class Run:
    """What one measured variant produced."""

    add: dict[str, float]
    checkout: dict[str, float]
    ordered: Counter[uuid.UUID]  # product -> quantity the successful checkouts ordered
    errors: list[str]


# ---------------------------------------------------------------- fixture


async def make_store(database_url: str, n_products: int) -> tuple[uuid.UUID, float, float, list[Product]]:
    """A bench store somewhere no seeded store covers, and `n_products` products with stock
    that cannot run out in a run. Written straight to the database."""
    import asyncpg

    lat, lng = round(random.uniform(-45, -20), 5), round(random.uniform(-150, -100), 5)
    store, category = uuid.uuid4(), uuid.uuid4()
    products = [
        Product(
            uuid.uuid4(),
            f"Checkout bench product {i}",
            1000 + 250 * i,
            1200 + 250 * i,
            (0, 500, 1200, 1800)[i % 4],
        )
        for i in range(n_products)
    ]
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)"
                " VALUES ($1, $2, 'Checkout bench store', 'Benchville', $3, $4, 2, '00:00', '00:00')",
                store,
                "CHKB" + store.hex[:8].upper(),
                lat,
                lng,
            )
            await conn.execute(
                "INSERT INTO categories (id, slug, name) VALUES ($1, $2, 'Checkout bench')",
                category,
                "checkout-bench-" + category.hex[:8],
            )
            await conn.executemany(
                "INSERT INTO products (id, sku, name, category_id, mrp_paise, price_paise, tax_rate_bp)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [
                    (
                        p.id,
                        "CHKB-" + p.id.hex[:12],
                        p.name,
                        category,
                        p.mrp_paise,
                        p.price_paise,
                        p.tax_rate_bp,
                    )
                    for p in products
                ],
            )
            await conn.executemany(
                "INSERT INTO inventory (store_id, product_id, on_hand) VALUES ($1, $2, $3)",
                [(store, p.id, STOCK) for p in products],
            )
    finally:
        await conn.close()
    return store, lat, lng, products


def make_customers(base: str, n: int, lat: float, lng: float) -> list[Customer]:
    """`n` customers logged in through the OTP flow, each with a default address at the store."""
    import httpx

    run = random.randrange(10**4)
    customers: list[Customer] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(n):
            token = login(base, phone=f"+9196{run:04d}{i:04d}")
            headers = {"Authorization": f"Bearer {token}"}
            me = client.get("/users/me", headers=headers)
            me.raise_for_status()
            address = client.post(
                "/users/me/addresses",
                headers=headers,
                json={
                    "line1": "1 Checkout Bench Road",
                    "city": "Benchville",
                    "pincode": "560001",
                    "lat": lat,
                    "lng": lng,
                    "is_default": True,
                },
            )
            address.raise_for_status()
            customers.append(Customer(uuid.UUID(me.json()["id"]), uuid.UUID(address.json()["id"]), headers))
    return customers


# ---------------------------------------------------------------- through Serve


async def serve_checkouts(
    base: str, clients: list[list[Customer]], products: list[uuid.UUID], seconds: float
) -> Run:
    """Each client loops over its own customers: add one of its product, check out. Client
    `i` orders `products[i % len(products)]`."""
    add_latencies: list[float] = []
    checkout_latencies: list[float] = []
    add_errors = checkout_errors = 0
    ordered: Counter[uuid.UUID] = Counter()
    shown: list[str] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=len(clients))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(i: int) -> None:
            nonlocal add_errors, checkout_errors
            product = str(products[i % len(products)])
            for customer in itertools.cycle(clients[i]):
                start = time.perf_counter()
                if start >= deadline:
                    return
                async with session.post(
                    f"{base}/carts/me/items",
                    json={"product_id": product, "quantity": 1},
                    headers=customer.headers,
                ) as r:
                    body = await r.read()
                    add_latencies.append(time.perf_counter() - start)
                    if r.status != 200:
                        add_errors += 1
                        if len(shown) < SHOW_ERRORS:
                            shown.append(
                                f"POST /carts/me/items {r.status} {body[:300].decode(errors='replace')}"
                            )
                        continue
                start = time.perf_counter()
                async with session.post(
                    f"{base}/orders",
                    json={"address_id": str(customer.address_id), "payment_method": "cod"},
                    headers={**customer.headers, "Idempotency-Key": str(uuid.uuid4())},
                ) as r:
                    body = await r.read()
                    checkout_latencies.append(time.perf_counter() - start)
                    if r.status != 201:
                        checkout_errors += 1
                        if len(shown) < SHOW_ERRORS:
                            shown.append(f"POST /orders {r.status} {body[:300].decode(errors='replace')}")
                        continue
                    for line in json.loads(body)["lines"]:
                        ordered[uuid.UUID(line["product_id"])] += line["quantity"]

        began = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(len(clients))))
        elapsed = time.perf_counter() - began
    return Run(
        add=summary(add_latencies, add_errors, elapsed),
        checkout=summary(checkout_latencies, checkout_errors, elapsed),
        ordered=ordered,
        errors=shown,
    )


# ---------------------------------------------------------------- the floor


ORDER_SQL = """
INSERT INTO orders (id, user_id, store_id, address_id, delivery_address, status, version,
    payment_method, currency, items_mrp_paise, subtotal_paise, coupon_code, coupon_discount_paise,
    taxable_value_paise, gst_paise, delivery_fee_paise, small_cart_fee_paise, tip_paise,
    total_paise, refunded_paise, reservation, reservation_expires_at, cart_version,
    created_at, updated_at, placed_at)
VALUES ($1, $2, $3, $4, $5::jsonb, 'placed', 1, 'cod', 'INR', $6, $7, NULL, 0, $8, $9, $10, $11, 0,
    $12, 0, 'committed', NULL, $13, $14, $14, $14)
"""
LINE_SQL = """
INSERT INTO order_lines (order_id, product_id, position, name, unit, image, quantity,
    unit_price_paise, unit_mrp_paise, tax_rate_bp, line_total_paise, coupon_discount_paise,
    taxable_value_paise, gst_paise)
VALUES ($1, $2, 0, $3, '1 pc', NULL, 1, $4, $5, $6, $4, 0, $7, $8)
"""
PAYMENT_SQL = """
INSERT INTO payments (id, order_id, method, status, amount_paise)
VALUES ($1, $2, 'cod', 'cod_pending', $3)
"""
EVENT_SQL = """
INSERT INTO order_events (order_id, from_status, to_status, actor, actor_user_id, reason, created_at)
VALUES ($1, NULL, 'placed', 'customer', $2, NULL, $3)
"""
OUTBOX_SQL = """
INSERT INTO outbox (topic, aggregate_id, payload, status, pending)
VALUES ('order.placed', $1, $2::jsonb, 'delivered', '{}')
"""


async def floor_checkouts(
    database_url: str,
    store: uuid.UUID,
    customers: list[Customer],
    products: list[Product],
    seconds: float,
    concurrency: int,
    settings: Any,
) -> Run:
    """The reservation transaction of a one-item COD checkout, on asyncpg: worker `i` orders
    `products[i % len(products)]` for `customers[i]`."""
    import asyncpg

    from models.carts import contained_gst

    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=concurrency, max_size=concurrency)
    latencies: list[float] = []
    errors = 0
    ordered: Counter[uuid.UUID] = Counter()
    shown: list[str] = []
    # (user_id, cart_version) is unique: every order gets its own microsecond.
    versions = itertools.count()
    epoch = datetime.now(UTC)
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        customer, product = customers[i], products[i % len(products)]
        gst = contained_gst(product.price_paise, product.tax_rate_bp)
        delivery = (
            settings.delivery_fee_paise if product.price_paise < settings.free_delivery_threshold_paise else 0
        )
        small = (
            settings.small_cart_fee_paise if product.price_paise < settings.small_cart_threshold_paise else 0
        )
        total = product.price_paise + delivery + small
        address = json.dumps({"label": "home", "line1": "1 Checkout Bench Road", "city": "Benchville"})
        async with pool.acquire() as conn:
            while (start := time.perf_counter()) < deadline:
                order_id, now = uuid.uuid4(), datetime.now(UTC)
                try:
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE", customer.user_id
                        )
                        await conn.execute(
                            "SELECT product_id FROM inventory WHERE store_id = $1 AND product_id = ANY($2::uuid[])"
                            " ORDER BY product_id FOR UPDATE",
                            store,
                            [product.id],
                        )
                        status = await conn.execute(
                            "UPDATE inventory SET reserved = reserved + 1, updated_at = now()"
                            " WHERE store_id = $1 AND product_id = $2 AND on_hand - reserved >= 1",
                            store,
                            product.id,
                        )
                        if status != "UPDATE 1":
                            raise RuntimeError(f"not reserved: {status}")
                        await conn.execute(
                            ORDER_SQL,
                            order_id,
                            customer.user_id,
                            store,
                            customer.address_id,
                            address,
                            product.mrp_paise,
                            product.price_paise,
                            product.price_paise - gst,
                            gst,
                            delivery,
                            small,
                            total,
                            epoch + timedelta(microseconds=next(versions)),
                            now,
                        )
                        await conn.execute(
                            LINE_SQL,
                            order_id,
                            product.id,
                            product.name,
                            product.price_paise,
                            product.mrp_paise,
                            product.tax_rate_bp,
                            product.price_paise - gst,
                            gst,
                        )
                        await conn.execute(PAYMENT_SQL, uuid.uuid4(), order_id, total)
                        await conn.execute(EVENT_SQL, order_id, customer.user_id, now)
                        payload = {
                            "order_id": str(order_id),
                            "user_id": str(customer.user_id),
                            "store_id": str(store),
                            "from": None,
                            "status": "placed",
                            "version": 1,
                            "actor": "customer",
                            "reason": None,
                        }
                        await conn.execute(OUTBOX_SQL, order_id, json.dumps(payload))
                except (asyncpg.PostgresError, RuntimeError) as exc:
                    errors += 1
                    if len(shown) < SHOW_ERRORS:
                        shown.append(f"floor {type(exc).__name__}: {exc}")
                else:
                    ordered[product.id] += 1
                latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    await pool.close()
    return Run(add={}, checkout=summary(latencies, errors, elapsed), ordered=ordered, errors=shown)


async def reserved(database_url: str, store: uuid.UUID) -> tuple[dict[uuid.UUID, int], dict[uuid.UUID, int]]:
    """Per product at the store: `reserved`, and the quantity its committed orders hold."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch("SELECT product_id, reserved FROM inventory WHERE store_id = $1", store)
        lines = await conn.fetch(
            "SELECT l.product_id, sum(l.quantity) AS quantity FROM order_lines l"
            " JOIN orders o ON o.id = l.order_id"
            " WHERE o.store_id = $1 AND o.reservation IN ('held', 'committed') GROUP BY l.product_id",
            store,
        )
    finally:
        await conn.close()
    return {r["product_id"]: r["reserved"] for r in rows}, {
        r["product_id"]: int(r["quantity"]) for r in lines
    }


# ---------------------------------------------------------------- main


def main() -> None:
    args = bench_arguments(__doc__, seconds=15, concurrency=32, customers_per_client=2)

    bench_environment()
    # Every customer logs in from 127.0.0.1: lift the per-network OTP cap for the setup.
    os.environ["VURKSHA_OTP_MAX_SENDS_PER_IP_PER_HOUR"] = str(10**6)

    from deployments.launcher import backend

    n = args.concurrency
    with backend(reset=True) as settings:
        assert settings.database_url
        base = f"http://{settings.http_host}:{settings.http_port}"
        # Serve: n distinct + 1 hot product; the floor: the same, of its own.
        store, lat, lng, products = asyncio.run(make_store(settings.database_url, 2 * (n + 1)))
        serve_distinct, serve_hot = products[:n], products[n]
        floor_distinct, floor_hot = products[n + 1 : 2 * n + 1], products[2 * n + 1]
        began = time.perf_counter()
        customers = make_customers(base, n * args.customers_per_client, lat, lng)
        setup_s = time.perf_counter() - began
        clients = [customers[i::n] for i in range(n)]
        at_bench_niceness()

        results: dict[str, Run] = {}
        # Warm up (pools, shard actors, caches) on the distinct products; counted in the stock check.
        warmup = asyncio.run(serve_checkouts(base, clients, [p.id for p in serve_distinct], 3))
        results["Serve (a) distinct"] = asyncio.run(
            serve_checkouts(base, clients, [p.id for p in serve_distinct], args.seconds)
        )
        results["Serve (b) hot"] = asyncio.run(serve_checkouts(base, clients, [serve_hot.id], args.seconds))
        # The floor orders for the first customer of each client (idle by now: the Serve runs ended).
        floor_customers = [c[0] for c in clients]
        for name, chosen in (("Floor (a) distinct", floor_distinct), ("Floor (b) hot", [floor_hot])):
            results[name] = asyncio.run(
                floor_checkouts(
                    settings.database_url, store, floor_customers, chosen, args.seconds, n, settings
                )
            )
        stock, in_orders = asyncio.run(reserved(settings.database_url, store))

    print(
        f"\ncheckout (COD, 1 item), {n} concurrent clients over {len(customers)} customers"
        f" (logged in and given addresses in {setup_s:.1f} s), {args.seconds:.0f} s each;"
        f" replica DB pool {settings.db_pool_size}+{settings.db_max_overflow}"
    )
    for variant in ("(a) distinct", "(b) hot"):
        serve_r, floor_r = results[f"Serve {variant}"], results[f"Floor {variant}"]
        report(f"POST /carts/me/items {variant}", serve_r.add, name_width=34, rps_width=8)
        report(f"POST /orders (Serve) {variant}", serve_r.checkout, name_width=34, rps_width=8)
        report(f"asyncpg floor {variant}", floor_r.checkout, name_width=34, rps_width=8)
        print(f"ratio Serve/floor, {variant}: {serve_r.checkout['rps'] / floor_r.checkout['rps']:.3f}")
    errors = [e for r in (warmup, *results.values()) for e in r.errors]
    if errors:
        print(f"first errors ({len(errors)} shown, non-201 counted above):")
        for e in errors[: 2 * SHOW_ERRORS]:
            print("  " + e)

    expected: Counter[uuid.UUID] = Counter()
    for r in (warmup, *results.values()):
        expected.update(r.ordered)
    wrong = {
        p: (stock.get(p, 0), expected[p])
        for p in stock.keys() | expected.keys()
        if stock.get(p, 0) != expected[p]
    }
    serve_ids = {p.id for p in (*serve_distinct, serve_hot)}
    print(
        f"stock check: {len(stock)} products, reserved == ordered by successful checkouts:"
        f" {'OK' if not wrong else 'MISMATCH'}"
        f" (Serve {sum(v for p, v in expected.items() if p in serve_ids)} units,"
        f" floor {sum(v for p, v in expected.items() if p not in serve_ids)} units;"
        f" hot product reserved {stock.get(serve_hot.id, 0)} via Serve, {stock.get(floor_hot.id, 0)} via floor)"
    )
    for p, (have, want) in list(wrong.items())[:10]:
        print(
            f"  {p}: reserved {have}, successful checkouts ordered {want}, orders in the database hold {in_orders.get(p, 0)}"
        )
    # A checkout answered 408 may still have committed (Serve times the request out, the replica
    # carries on): the database invariant is reserved == what the orders hold.
    unheld = [p for p in stock if stock[p] != in_orders.get(p, 0)]
    print(
        f"stock check: reserved == quantity held by the orders in the database: {'OK' if not unheld else 'MISMATCH'}"
        f" ({sum(in_orders.values()) - sum(expected.values())} units ordered by checkouts the client saw fail)"
    )


if __name__ == "__main__":
    main()
