"""Benchmark (not a test): `GET /search` and `GET /search/autocomplete` through Ray Serve at
modest concurrency, and in the same run the same SQL statements executed directly with
asyncpg from one process (the floor under the service). Prints p50/p99 and the ratios.

    python -m tests.bench.search --seconds 10 --concurrency 8

The backend starts through `deployments.launcher.backend(reset=True)` with the seed data. If
the seed holds fewer than `--min-products` products (the catalog seed is not there), a
synthetic catalog of that size is inserted first so the figures are at catalog scale.

Autocomplete is measured twice through Serve: cold (every request a prefix not asked before,
so it misses the Redis cache and runs the SQL) and warm (the usual 1-3 character prefixes,
served from the cache after their first request).

HTTP load comes from `wrk`, cycling through the URLs; it and the SQL floor run at nice 15 like
Ray's workers.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import string
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from tests.bench.common import (
    WrkRequest,
    asyncpg_dsn,
    at_bench_niceness,
    bench_arguments,
    bench_environment,
    report,
    summary,
    wrk,
)

QUERIES = ["banana", "banan", "bananna", "green tea", "organic rice", "chocolate", "milk", "soap", "mango"]
PREFIXES = [
    "b",
    "ba",
    "ban",
    "m",
    "mi",
    "mil",
    "c",
    "ch",
    "cho",
    "s",
    "so",
    "soa",
    "o",
    "or",
    "org",
    "t",
    "te",
]

BRANDS = [
    "Amul", "Tata", "Britannia", "Nestle", "Haldiram", "Dabur", "Patanjali", "Fortune", "Aashirvaad",
    "Mother Dairy", "Cadbury", "Parle", "ITC", "Himalaya", "Colgate", "Dove", "Lifebuoy", "Surf",
    "Maggi", "Kissan", "Lays", "Bingo", "Real", "Tropicana", "Organic India", "24 Mantra",
    "Fresho", "Good Life", "Nature Fresh", "Happilo",
]  # fmt: skip
CATEGORIES = {
    "Fruits & Vegetables": ["Fresh Fruits", "Fresh Vegetables", "Exotic Produce", "Herbs"],
    "Dairy & Breakfast": ["Milk", "Butter & Cheese", "Breakfast Cereals", "Bread & Eggs"],
    "Snacks & Beverages": ["Chips & Namkeen", "Biscuits", "Chocolates", "Tea & Coffee", "Juices"],
    "Staples": ["Rice", "Atta & Flour", "Dals & Pulses", "Oils & Ghee", "Spices"],
    "Personal Care": ["Soaps & Body Wash", "Oral Care", "Hair Care", "Skin Care"],
    "Home Care": ["Detergents", "Cleaners", "Kitchen Supplies"],
}
ITEMS = [
    "Banana", "Apple", "Mango", "Orange", "Grapes", "Papaya", "Tomato", "Onion", "Potato", "Spinach",
    "Milk", "Butter", "Cheese", "Paneer", "Curd", "Bread", "Eggs", "Cornflakes", "Oats", "Muesli",
    "Chips", "Namkeen", "Cookies", "Crackers", "Chocolate", "Green Tea", "Coffee", "Juice", "Cola",
    "Rice", "Basmati Rice", "Atta", "Maida", "Toor Dal", "Moong Dal", "Sunflower Oil", "Ghee",
    "Turmeric", "Chilli Powder", "Garam Masala", "Soap", "Body Wash", "Toothpaste", "Shampoo",
    "Face Wash", "Detergent", "Floor Cleaner", "Dishwash Gel", "Foil", "Tissues",
]  # fmt: skip
ADJECTIVES = [
    "Organic", "Fresh", "Premium", "Classic", "Lite", "Family Pack", "Crunchy", "Creamy", "Natural",
    "Spicy", "Masala", "Roasted", "Whole", "Pure", "Select", "Daily", "Gold", "Super", "Mini", "Jumbo",
]  # fmt: skip
UNITS = ["100 g", "250 g", "500 g", "1 kg", "200 ml", "500 ml", "1 l", "1 pc", "6 pcs", "12 pcs"]


# ---------------------------------------------------------------- synthetic catalog


async def ensure_catalog(database_url: str, minimum: int) -> int:
    """Top the catalog up with synthetic products until it holds `minimum`; return the count."""
    import asyncpg

    from models.products import SEARCH_DOCUMENT_SQL

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        have = await conn.fetchval("SELECT count(*) FROM products")
        if have >= minimum:
            return int(have)
        rng = random.Random(42)
        stores = [r["id"] for r in await conn.fetch("SELECT id FROM stores WHERE is_active")]
        for n in range(3 - len(stores)):
            sid = uuid.uuid4()
            await conn.execute(
                "INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)"
                " VALUES ($1, $2, $3, 'Bengaluru', $4, $5, 4, '06:00', '23:59')",
                sid,
                f"BENCH-{n}-{sid.hex[:6]}",
                f"Bench store {n}",
                12.95 + 0.02 * n,
                77.6 + 0.02 * n,
            )
            stores.append(sid)
        category_ids: list[uuid.UUID] = []
        run = uuid.uuid4().hex[:6]
        for position, (top, children) in enumerate(CATEGORIES.items()):
            top_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO categories (id, slug, name, position) VALUES ($1, $2, $3, $4)",
                top_id,
                f"bench-{run}-{position}",
                top,
                position,
            )
            for i, child in enumerate(children):
                cid = uuid.uuid4()
                await conn.execute(
                    "INSERT INTO categories (id, parent_id, slug, name, position) VALUES ($1, $2, $3, $4, $5)",
                    cid,
                    top_id,
                    f"bench-{run}-{position}-{i}",
                    child,
                    i,
                )
                category_ids.append(cid)
        products = []
        inventory = []
        for n in range(minimum - have):
            pid = uuid.uuid4()
            item = rng.choice(ITEMS)
            brand = rng.choice([*BRANDS, None])
            name = f"{rng.choice(ADJECTIVES)} {item}" + (
                f" {rng.choice(string.ascii_uppercase)}{n}" if n % 3 else ""
            )
            mrp = rng.randrange(1_000, 100_000, 100)
            stars = [rng.randrange(0, 20) if rng.random() < 0.6 else 0 for _ in range(5)]
            products.append(
                (
                    pid,
                    f"BN{run}{n:06d}",
                    name,
                    brand,
                    f"{name} by {brand or 'local farms'}: everyday {item.lower()} delivered in minutes.",
                    rng.choice(UNITS),
                    rng.choice(category_ids),
                    mrp,
                    mrp - rng.randrange(0, mrp // 4, 100) if mrp > 400 else mrp,
                    rng.choice((0, 500, 1200, 1800)),
                    sum(stars),
                    sum((i + 1) * s for i, s in enumerate(stars)),
                    *stars,
                )
            )
            for store in stores:
                on_hand = rng.choice((0, 0, 3, 10, 25, 60))
                inventory.append((store, pid, on_hand, min(on_hand, rng.choice((0, 0, 1, 2)))))
        await conn.executemany(
            "INSERT INTO products (id, sku, name, brand, description, unit, category_id, mrp_paise,"
            " price_paise, tax_rate_bp, rating_count, rating_sum, r1, r2, r3, r4, r5)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            products,
        )
        await conn.executemany(
            "INSERT INTO inventory (store_id, product_id, on_hand, reserved) VALUES ($1, $2, $3, $4)",
            inventory,
        )
        await conn.execute(SEARCH_DOCUMENT_SQL.replace(":ids", "NULL"))
        # VACUUM also merges the GIN pending lists the bulk insert filled (until it does,
        # every index search scans them linearly); ANALYZE gives the planner real counts.
        for table in ("products", "inventory", "categories"):
            await conn.execute(f"VACUUM ANALYZE {table}")
        return int(await conn.fetchval("SELECT count(*) FROM products"))
    finally:
        await conn.close()


# ---------------------------------------------------------------- measuring


async def load_sql(
    database_url: str, transactions: Callable[[], list[tuple[str, Sequence[Any]]]], seconds: float
) -> dict[str, float]:
    """The floor: the statements the service runs for one request, in one transaction on one
    asyncpg connection (prepared and cached, as SQLAlchemy does), one request at a time."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    latencies: list[float] = []
    try:
        deadline = time.perf_counter() + seconds
        began = time.perf_counter()
        while (start := time.perf_counter()) < deadline:
            statements = transactions()
            async with conn.transaction():
                for sql, args in statements:
                    await conn.fetch(sql, *args)
            latencies.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - began
    finally:
        await conn.close()
    return summary(latencies, 0, elapsed)


async def catalog_prefixes(database_url: str) -> list[str]:
    """Every distinct 1-5 character prefix of a word in a product name, shuffled: a stream
    of autocomplete requests that each miss the cache the first time they are asked."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT lower(substr(w, 1, n)) AS prefix"
            " FROM products, regexp_split_to_table(name, '[^[:alnum:]]+') AS w, generate_series(1, 5) AS n"
            " WHERE length(w) >= n"
        )
    finally:
        await conn.close()
    prefixes = [str(r["prefix"]) for r in rows]
    random.Random(7).shuffle(prefixes)
    return prefixes


def to_asyncpg(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    """Rewrite `:name` binds to `$n` as SQLAlchemy does for asyncpg."""
    from sqlalchemy import text
    from sqlalchemy.dialects import postgresql

    compiled = text(sql).compile(dialect=postgresql.asyncpg.dialect())  # type: ignore[attr-defined]
    positional = compiled.positiontup or []
    return str(compiled), [params[name] for name in positional]


def main() -> None:
    args = bench_arguments(__doc__, seconds=10, concurrency=8, min_products=4000)

    bench_environment()

    from deployments.launcher import backend
    from models.search import (
        AUTOCOMPLETE_SQL,
        PLANNER_GUARD_SQL,
        PLANNER_RESET_SQL,
        SEARCH_SQL,
        SearchParams,
        autocomplete_sql_params,
        search_sql_params,
    )

    with backend(reset=True) as settings:
        database_url = settings.database_url
        assert database_url
        base = f"http://{settings.http_host}:{settings.http_port}"
        count = asyncio.run(ensure_catalog(database_url, args.min_products))
        distinct = asyncio.run(catalog_prefixes(database_url))
        queries = itertools.cycle(QUERIES)
        floor_prefixes = itertools.cycle(distinct)
        guard = to_asyncpg(PLANNER_GUARD_SQL, {})
        reset = to_asyncpg(PLANNER_RESET_SQL, {})
        at_bench_niceness()

        def search_sql() -> list[tuple[str, Sequence[Any]]]:
            params = search_sql_params(SearchParams(q=next(queries)), None, None)
            return [guard, to_asyncpg(SEARCH_SQL, params), reset]

        def autocomplete_sql() -> list[tuple[str, Sequence[Any]]]:
            params = autocomplete_sql_params(next(floor_prefixes), None)
            return [guard, to_asyncpg(AUTOCOMPLETE_SQL, params), reset]

        def gets(path: str, values: Sequence[str]) -> list[WrkRequest]:
            return [("GET", f"{base}{path}?q={quote(v)}", {}, None) for v in values]

        searches = gets("/search", QUERIES)
        warm = gets("/search/autocomplete", PREFIXES)
        # Two disjoint halves of never-asked prefixes: the 1-client cold run must not hit what
        # the concurrent one cached.
        cold, cold_one = gets("/search/autocomplete", distinct[::2]), gets("/search/autocomplete", distinct[1::2])

        t = args.seconds
        n = args.concurrency
        cases: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("Serve GET /search", lambda: wrk(searches, t, n)),
            ("SQL search (asyncpg, 1 connection)", lambda: asyncio.run(load_sql(database_url, search_sql, t))),
            ("Serve GET /search/autocomplete (cold)", lambda: wrk(cold, t, n)),
            ("Serve GET /search/autocomplete (warm)", lambda: wrk(warm, t, n)),
            (
                "SQL autocomplete (asyncpg, 1 connection)",
                lambda: asyncio.run(load_sql(database_url, autocomplete_sql, t)),
            ),
        ]
        # The same three HTTP cases with one client: the latency one user sees, without queueing
        # behind the other clients on a 2-core machine.
        cases += [
            ("Serve GET /search, 1 client", lambda: wrk(searches, t, 1)),
            ("Serve autocomplete cold, 1 client", lambda: wrk(cold_one, t, 1)),
            ("Serve autocomplete warm, 1 client", lambda: wrk(warm, t, 1)),
        ]
        load_before = os.getloadavg()[0]
        results = {}
        for name, run in cases:
            if "cold" not in name:
                wrk(gets("/search", ["milk"]), 1, 2)  # warm pools
            results[name] = run()
        cold_asked = min(int(results["Serve GET /search/autocomplete (cold)"]["requests"]), len(cold)) + min(
            int(results["Serve autocomplete cold, 1 client"]["requests"]), len(cold_one)
        )
        cold_requests = int(results["Serve GET /search/autocomplete (cold)"]["requests"]) + int(
            results["Serve autocomplete cold, 1 client"]["requests"]
        )
        load_after = os.getloadavg()[0]

    print(
        f"\ncatalog: {count} products; HTTP at {args.concurrency} concurrent clients, {args.seconds:.0f} s each"
    )
    print(
        f"cold autocomplete: {cold_asked} of {cold_requests} requests were a"
        f" prefix not asked before (cache miss); warm: {len(PREFIXES)} prefixes repeated"
    )
    print(
        f"machine load average (1 min) before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores"
    )
    for name, r in results.items():
        report(name, r, name_width=40, rps_width=8, digits=2)
    s = results
    floor_search = s["SQL search (asyncpg, 1 connection)"]
    floor_ac = s["SQL autocomplete (asyncpg, 1 connection)"]
    print(
        "ratio Serve/SQL p50 (p99): search {:.1f}x ({:.1f}x), autocomplete cold {:.1f}x ({:.1f}x),"
        " warm {:.1f}x ({:.1f}x)".format(
            s["Serve GET /search"]["p50_ms"] / floor_search["p50_ms"],
            s["Serve GET /search"]["p99_ms"] / floor_search["p99_ms"],
            s["Serve GET /search/autocomplete (cold)"]["p50_ms"] / floor_ac["p50_ms"],
            s["Serve GET /search/autocomplete (cold)"]["p99_ms"] / floor_ac["p99_ms"],
            s["Serve GET /search/autocomplete (warm)"]["p50_ms"] / floor_ac["p50_ms"],
            s["Serve GET /search/autocomplete (warm)"]["p99_ms"] / floor_ac["p99_ms"],
        )
    )
    print(
        "goal: autocomplete p99 < 20 ms through Serve; 1 client: cold {:.1f} ms, warm {:.1f} ms".format(
            s["Serve autocomplete cold, 1 client"]["p99_ms"], s["Serve autocomplete warm, 1 client"]["p99_ms"]
        )
    )


if __name__ == "__main__":
    main()
