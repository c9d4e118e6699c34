"""offers carry their planned route: ETAs per drop, who ordered the drops, why not the optimizer

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 00:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "delivery_offers",
        sa.Column("planned_eta_s", postgresql.ARRAY(sa.Integer()), server_default="{}", nullable=False),
    )
    op.add_column(
        "delivery_offers",
        sa.Column("route_planner", sa.String(length=24), server_default="direct", nullable=False),
    )
    op.add_column("delivery_offers", sa.Column("route_fallback", sa.String(length=32), nullable=True))
    op.create_check_constraint(
        op.f("ck_delivery_offers_route_planner"),
        "delivery_offers",
        "route_planner IN ('direct', 'optimizer', 'nearest_neighbour')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_delivery_offers_route_planner"), "delivery_offers", type_="check")
    op.drop_column("delivery_offers", "route_fallback")
    op.drop_column("delivery_offers", "route_planner")
    op.drop_column("delivery_offers", "planned_eta_s")
