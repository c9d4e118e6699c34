"""Seed data: the admin account and demo customers. Idempotent: running it twice changes
nothing. `python -m pipelines.seed` (or `vurksha seed`)."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from config.settings import Settings, get_settings
from models import users
from models.db import make_engine, make_sessionmaker

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


async def seed(settings: Settings) -> None:
    assert settings.database_url
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            await seed_users(session, settings)
    finally:
        await engine.dispose()
    log.info("seed data in place (admin %s)", settings.admin_phone[:-4] + "****")


def main() -> None:
    asyncio.run(seed(get_settings()))


if __name__ == "__main__":
    main()
