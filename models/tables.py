"""Imports every module that defines tables, so the metadata is complete (Alembic, tests)."""

from models import users  # noqa: F401
