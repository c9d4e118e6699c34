"""products: the listing's order (name in byte order, id) as a partial index of active products

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 08:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_products_listing",
        "products",
        [sa.text('name COLLATE "C"'), "id"],
        postgresql_where=sa.text("is_active"),
    )


def downgrade() -> None:
    op.drop_index("ix_products_listing", table_name="products")
