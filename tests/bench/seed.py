"""Benchmark (not a test): the seed (admin, demo users, the whole catalog) on an empty,
migrated database, then again on the seeded one (the launcher runs it on every start), and the
catalog derivation alone (read the Parquet file, clean, price, categorise) for comparison.
Prints wall times and the peak resident memory of this process.

    python -m tests.bench.seed [--runs 3]     # needs DATABASE_URL (a server we may create a DB on)

A scratch database is created and dropped on the server DATABASE_URL points at.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import statistics
import time

import asyncpg

from config.settings import Settings
from models.migrate import upgrade
from pipelines import catalog
from pipelines.seed import seed
from tests.bench.common import asyncpg_dsn


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = asyncpg_dsn(os.environ["DATABASE_URL"])
    name = f"bench_seed_{secrets.token_hex(4)}"
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    try:
        url = _with_database(server, name)
        upgrade(url)
        settings = Settings(database_url=url)
        started = time.perf_counter()
        first = asyncio.run(seed(settings))
        first_s = time.perf_counter() - started
        again = []
        for _ in range(args.runs):
            started = time.perf_counter()
            result = asyncio.run(seed(settings))
            again.append(time.perf_counter() - started)
            assert result.products_changed == result.inventory_added == 0
        derive = []
        for _ in range(args.runs):
            started = time.perf_counter()
            catalog.build_products(catalog.read_source(catalog.DEFAULT_PARQUET))
            derive.append(time.perf_counter() - started)
    finally:
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}"'))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"catalog: {first.products} products, {first.categories} categories, {first.stores} stores,"
        f" {first.inventory_added} inventory rows"
    )
    print(f"first seed (empty database):  {first_s:6.2f} s")
    print(f"re-seed (no changes), median: {statistics.median(again):6.2f} s  (runs: {len(again)})")
    print(f"derivation alone, median:     {statistics.median(derive):6.2f} s")
    print(f"re-seed / derivation:         {statistics.median(again) / statistics.median(derive):6.2f}x")
    print(f"peak RSS of this process:     {rss_mb:6.0f} MB")


if __name__ == "__main__":
    main()
