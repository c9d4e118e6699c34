"""The seeded catalog in the live database: plausible counts, a real category tree, stock in
every store, idempotent re-runs (in process and through the CLI), and demo customers who are
served by a store. Other tests may add their own rows: assertions stick to the seeded keys."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from functools import cache

from config.settings import get_settings
from pipelines import catalog
from pipelines.seed import DEMO_CUSTOMERS, seed
from tests.conftest import ROOT, Live


@cache
def seeded_skus() -> list[str]:
    return [p.sku for p in catalog.build_products(catalog.read_source(catalog.DEFAULT_PARQUET))]


STORE_CODES = [s.code for s in catalog.STORES]
CATEGORY_SLUGS = [c.slug for c in catalog.category_tree()]

# One md5 per table over every column of every seeded row (updated_at and the search document
# included), so any write to a seeded row shows up.
CHECKSUMS = {
    "products": "SELECT md5(string_agg(t::text, ',' ORDER BY t.sku)) FROM products t"
    " WHERE t.sku = ANY(CAST(:skus AS text[]))",
    "categories": "SELECT md5(string_agg(t::text, ',' ORDER BY t.slug)) FROM categories t"
    " WHERE t.slug = ANY(CAST(:slugs AS text[]))",
    "stores": "SELECT md5(string_agg(t::text, ',' ORDER BY t.code)) FROM stores t"
    " WHERE t.code = ANY(CAST(:codes AS text[]))",
    "inventory": "SELECT md5(string_agg(t::text, ',' ORDER BY s.code, p.sku)) FROM inventory t"
    " JOIN stores s ON s.id = t.store_id JOIN products p ON p.id = t.product_id"
    " WHERE s.code = ANY(CAST(:codes AS text[])) AND p.sku = ANY(CAST(:skus AS text[]))",
}


def checksums(live: Live) -> dict[str, str]:
    params = {"skus": seeded_skus(), "slugs": CATEGORY_SLUGS, "codes": STORE_CODES}
    out = {}
    for table, query in CHECKSUMS.items():
        needed = {k: v for k, v in params.items() if f":{k}" in query}
        out[table] = live.sql(query, **needed)[0][0]
    return out


def test_catalog_counts_are_plausible(live: Live):
    skus = seeded_skus()
    assert len(skus) >= 3000
    [(products, with_search, branded, active)] = live.sql(
        "SELECT count(*), count(search_vector), count(brand), count(*) FILTER (WHERE is_active)"
        " FROM products WHERE sku = ANY(CAST(:skus AS text[]))",
        skus=skus,
    )
    assert products == with_search == len(skus) and active == len(skus) and branded >= 300
    [(stores,)] = live.sql("SELECT count(*) FROM stores WHERE is_active AND city = 'Bengaluru'")
    assert stores >= 3
    [(parents, children, filled)] = live.sql(
        "SELECT count(*) FILTER (WHERE parent_id IS NULL), count(*) FILTER (WHERE parent_id IS NOT NULL),"
        " count(*) FILTER (WHERE EXISTS (SELECT 1 FROM products p WHERE p.category_id = c.id))"
        " FROM categories c WHERE slug = ANY(CAST(:slugs AS text[]))",
        slugs=CATEGORY_SLUGS,
    )
    assert parents >= 10 and children >= 30 and filled >= 30
    # Children hang under seeded parents, and products sit on leaf categories.
    [(orphans,)] = live.sql(
        "SELECT count(*) FROM categories c JOIN categories parent ON parent.id = c.parent_id"
        " WHERE c.slug = ANY(CAST(:slugs AS text[])) AND parent.parent_id IS NOT NULL",
        slugs=CATEGORY_SLUGS,
    )
    assert orphans == 0
    # Every seeded product has a stock row in every seeded store, with some out of stock.
    [(missing,)] = live.sql(
        "SELECT count(*) FROM products p CROSS JOIN stores s"
        " LEFT JOIN inventory i ON i.product_id = p.id AND i.store_id = s.id"
        " WHERE p.sku = ANY(CAST(:skus AS text[])) AND s.code = ANY(CAST(:codes AS text[]))"
        " AND i.product_id IS NULL",
        skus=skus,
        codes=STORE_CODES,
    )
    assert missing == 0
    [(rows, zero, low)] = live.sql(
        "SELECT count(*), count(*) FILTER (WHERE on_hand = 0),"
        " count(*) FILTER (WHERE on_hand > 0 AND on_hand <= low_stock_threshold)"
        " FROM inventory i JOIN stores s ON s.id = i.store_id WHERE s.code = ANY(CAST(:codes AS text[]))",
        codes=STORE_CODES,
    )
    assert rows >= len(skus) * len(STORE_CODES) and zero > 0 and low > 0
    # The staples make the quick-commerce demo work: full-text search finds bananas.
    found = live.sql(
        "SELECT name FROM products WHERE search_vector @@ plainto_tsquery('english', 'bananas') ORDER BY name"
    )
    assert {"Banana Robusta", "Banana Yelakki"} <= {r[0] for r in found}


def test_seeding_again_changes_nothing(live: Live):
    settings = get_settings()
    assert settings.database_url == live.database_url
    # Bring the seeded rows back to seed state first: earlier tests may have edited some.
    asyncio.run(seed(settings))
    before = checksums(live)
    assert all(before.values()), before

    again = asyncio.run(seed(settings))
    assert (again.stores_changed, again.categories_changed, again.products_changed) == (0, 0, 0)
    assert again.inventory_added == 0 and again.products == len(seeded_skus())
    assert checksums(live) == before

    # The CLI runs the same seed, and says what it did.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": live.database_url}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.seed"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert f"{len(seeded_skus())} products (0 changed)" in output and "0 inventory rows added" in output
    assert checksums(live) == before


def test_seed_repairs_a_drifted_product_but_keeps_live_stock(live: Live):
    settings = get_settings()
    asyncio.run(seed(settings))
    sku = "STP-BANANA-ROBUSTA"
    live.sql("UPDATE products SET price_paise = 1, name = 'tampered' WHERE sku = :sku", sku=sku)
    live.sql(
        "UPDATE inventory SET on_hand = 7, reserved = 3 FROM products p"
        " WHERE p.id = inventory.product_id AND p.sku = :sku",
        sku=sku,
    )
    result = asyncio.run(seed(settings))
    assert result.products_changed == 1 and result.inventory_added == 0
    [(name, price, matched)] = live.sql(
        "SELECT name, price_paise, search_vector @@ plainto_tsquery('english', 'banana')"
        " FROM products WHERE sku = :sku",
        sku=sku,
    )
    assert (name, price, matched) == ("Banana Robusta", 4200, True)
    # Stock is operational data: the seed never overwrites it (it would also break reservations).
    stock = live.sql(
        "SELECT DISTINCT on_hand, reserved FROM inventory i JOIN products p ON p.id = i.product_id"
        " WHERE p.sku = :sku",
        sku=sku,
    )
    assert stock == [(7, 3)]
    banana = next(p for p in catalog.staple_products() if p.sku == sku)
    for store in catalog.STORES:  # leave the shared database as seeded
        live.sql(
            "UPDATE inventory SET reserved = 0, on_hand = :n FROM products p, stores s"
            " WHERE p.id = inventory.product_id AND s.id = inventory.store_id AND p.sku = :sku AND s.code = :code",
            n=catalog.seeded_stock(store.code, banana),
            sku=sku,
            code=store.code,
        )


def test_demo_customers_are_served_by_a_store(live: Live):
    from models.db import make_engine, make_sessionmaker
    from models.products import serving_store

    phones = [str(d["phone"]) for d in DEMO_CUSTOMERS]
    addresses = live.sql(
        "SELECT u.phone, a.lat, a.lng FROM users u JOIN addresses a ON a.user_id = u.id AND a.is_default"
        " WHERE u.phone = ANY(CAST(:phones AS text[])) ORDER BY u.phone",
        phones=phones,
    )
    assert [a[0] for a in addresses] == sorted(phones)

    async def serve() -> list[str]:
        engine = make_engine(live.database_url, pool_size=1, max_overflow=0)
        try:
            async with make_sessionmaker(engine)() as session:
                return [(await serving_store(session, lat, lng)).code for _, lat, lng in addresses]
        finally:
            await engine.dispose()

    assert asyncio.run(serve()) == ["BLR-IND", "BLR-MRT"]
