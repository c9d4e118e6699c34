"""recommender registry, promotions and impressions

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 03:23:04.541907
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "recommender_models",
        sa.Column("version", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_by", sa.String(length=120), nullable=False),
        sa.Column("algorithm", sa.String(length=8), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("data_cutoff", sa.DateTime(timezone=True), nullable=False),
        sa.Column("params", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "metrics",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("git_commit", sa.String(length=40), nullable=True),
        sa.Column("users", sa.Integer(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("interactions", sa.Integer(), nullable=False),
        sa.Column("train_seconds", sa.Double(), nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact_bytes", sa.Integer(), nullable=False),
        sa.Column("artifact", sa.LargeBinary(), nullable=False),
        sa.Column("report", sa.Text(), nullable=True),
        sa.CheckConstraint("algorithm IN ('als', 'bpr')", name=op.f("ck_recommender_models_algorithm")),
        sa.CheckConstraint(
            "source IN ('orders', 'online_retail')", name=op.f("ck_recommender_models_source")
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_recommender_models")),
    )
    op.create_table(
        "recommender_promotions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("previous_version", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("forced", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("promoted_by", sa.String(length=120), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "action IN ('promote', 'rollback')", name=op.f("ck_recommender_promotions_action")
        ),
        sa.ForeignKeyConstraint(
            ["previous_version"],
            ["recommender_models.version"],
            name=op.f("fk_recommender_promotions_previous_version_recommender_models"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["version"],
            ["recommender_models.version"],
            name=op.f("fk_recommender_promotions_version_recommender_models"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recommender_promotions")),
    )
    op.create_table(
        "recommendation_impressions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("served_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("store_id", sa.Uuid(), nullable=False),
        sa.Column("surface", sa.String(length=8), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("product_ids", postgresql.ARRAY(sa.Uuid()), nullable=False),
        sa.Column("sources", postgresql.ARRAY(sa.String(length=10)), nullable=False),
        sa.CheckConstraint(
            "surface IN ('for_you', 'similar', 'basket')", name=op.f("ck_recommendation_impressions_surface")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_recommendation_impressions_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recommendation_impressions")),
    )
    op.create_index(
        op.f("ix_recommendation_impressions_user_id"), "recommendation_impressions", ["user_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_recommendation_impressions_user_id"), table_name="recommendation_impressions")
    op.drop_table("recommendation_impressions")
    op.drop_table("recommender_promotions")
    op.drop_table("recommender_models")
