"""Imports every module that defines tables, so the metadata is complete (Alembic, tests)."""

from models import delivery, idempotency, orders, outbox, payments, products, recommender, users  # noqa: F401
