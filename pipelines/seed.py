"""Seed data: the admin account, demo customers, the catalog (stores, categories, products,
stock; see pipelines/catalog.py), a few hundred demo customers' purchase histories as delivered
orders (pipelines/history.py) and, when no model is in production yet, a first recommender
model trained on them and promoted. Idempotent: running it twice changes nothing.
`python -m pipelines.seed [--parquet PATH]` (or `vurksha seed`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from config.logging import setup_logging
from config.settings import Settings, get_settings
from models import users
from models.db import make_engine, make_sessionmaker
from pipelines import catalog, history

log = logging.getLogger(__name__)

DEMO_CUSTOMERS = [
    {
        "phone": "+919000000101",
        "name": "Asha Demo",
        "address": users.AddressIn(
            label="home",
            line1="14, 5th Cross, Indiranagar",
            city="Bengaluru",
            pincode="560038",
            lat=12.9784,
            lng=77.6408,
        ),
    },
    {
        "phone": "+919000000102",
        "name": "Ravi Demo",
        "address": users.AddressIn(
            label="work",
            line1="Prestige Tech Park, Marathahalli",
            city="Bengaluru",
            pincode="560103",
            lat=12.9399,
            lng=77.6976,
        ),
    },
]


async def seed_users(session: AsyncSession, settings: Settings) -> None:
    await users.ensure_admin(session, settings.admin_phone)
    for demo in DEMO_CUSTOMERS:
        phone = str(demo["phone"])
        existing = await session.scalar(select(users.User).where(users.User.phone == phone))
        if existing is not None:
            continue
        user = users.User(phone=phone, name=str(demo["name"]))
        session.add(user)
        await session.flush()
        address = demo["address"]
        assert isinstance(address, users.AddressIn)
        await users.create_address(session, user.id, address)


async def seed(settings: Settings, *, parquet: Path | None = None) -> catalog.LoadResult:
    """Seed everything in one transaction. `parquet` overrides `settings.catalog_parquet`,
    which defaults to the dataset vendored in `pipelines/data/online_retail/`."""
    assert settings.database_url
    source = parquet or settings.catalog_parquet or catalog.DEFAULT_PARQUET
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            await seed_users(session, settings)
            result = await catalog.load_catalog(
                session, parquet=source, image_base_url=settings.catalog_image_base_url
            )
            orders = await history.import_histories(
                session, settings, parquet=source, demo_phones=[str(d["phone"]) for d in DEMO_CUSTOMERS]
            )
        loaded = (
            ["stores", "categories", "products", "inventory"]
            if result.products_changed or result.inventory_added
            else []
        )
        loaded += ["orders", "order_lines", "payments"] if orders else []
        if loaded:
            # Fresh statistics after a bulk load, or the planner misjudges the search indexes
            # (and GIN pending lists stay unmerged) until autovacuum gets round to it.
            async with engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(f"VACUUM ANALYZE {', '.join(loaded)}"))
        if orders:
            log.info("demo purchase histories: %d delivered orders imported", orders)
        await first_model(engine, settings)
    finally:
        await engine.dispose()
    log.info("seed data in place (admin %s)", settings.admin_phone[:-4] + "****")
    log.info(
        "catalog: %d stores (%d changed), %d categories (%d changed), %d products (%d changed),"
        " %d inventory rows added, in %.2f s",
        result.stores,
        result.stores_changed,
        result.categories,
        result.categories_changed,
        result.products,
        result.products_changed,
        result.inventory_added,
        result.seconds,
    )
    return result


async def first_model(engine: AsyncEngine, settings: Settings) -> None:
    """Train and promote a recommender model on the demo histories when none is in production,
    so the recommendation routes serve ALS results on a fresh start."""
    from models.recommender import production_version
    from pipelines import recommender

    async with make_sessionmaker(engine)() as session:
        if await production_version(session) is not None:
            return
    result = await recommender.train_async(
        source="orders", promote=True, by="seed", progress=False, settings=settings
    )
    log.info("recommender: first model v%s trained and promoted", result.version)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.seed", description=__doc__)
    parser.add_argument("--parquet", type=Path, help="the Online Retail Parquet file to load")
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings.log_level)
    asyncio.run(seed(settings, parquet=args.parquet))


if __name__ == "__main__":
    main()
