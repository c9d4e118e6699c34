"""Imports every module that defines tables, so the metadata is complete (Alembic, tests)."""

from models import (  # noqa: F401
    delivery,
    idempotency,
    notifications,
    orders,
    outbox,
    payments,
    products,
    recommender,
    users,
)
