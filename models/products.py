"""Catalog: dark stores, the category tree, products, per-store inventory, reviews.

Money is integer paise. Stock guarantees live in PostgreSQL: `reserved <= on_hand` and both
non-negative are CHECK constraints, so no code path can oversell even by mistake.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, time

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ColumnElement,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base, TimestampMixin, new_id
from models.errors import AppError

# GST slabs in basis points (0 %, 5 %, 12 %, 18 %, 28 %).
GST_SLABS_BP = (0, 500, 1200, 1800, 2800)


class Store(TimestampMixin, Base):
    """A dark store: the unit that holds stock and serves a radius around it."""

    __tablename__ = "stores"
    __table_args__ = (
        CheckConstraint("lat BETWEEN -90 AND 90 AND lng BETWEEN -180 AND 180", name="coords"),
        CheckConstraint("service_radius_km > 0 AND service_radius_km <= 50", name="radius"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    city: Mapped[str] = mapped_column(String(100))
    lat: Mapped[float] = mapped_column(Float)
    lng: Mapped[float] = mapped_column(Float)
    service_radius_km: Mapped[float] = mapped_column(Float)
    # Local opening hours; opens_at == closes_at means open around the clock.
    opens_at: Mapped[time]
    closes_at: Mapped[time]
    timezone: Mapped[str] = mapped_column(String(64), server_default="Asia/Kolkata")
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))


class Category(TimestampMixin, Base):
    __tablename__ = "categories"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("categories.id", ondelete="RESTRICT"), index=True
    )
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    position: Mapped[int] = mapped_column(Integer, server_default="0")
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))


class Product(TimestampMixin, Base):
    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("mrp_paise > 0 AND price_paise > 0 AND price_paise <= mrp_paise", name="prices"),
        CheckConstraint(f"tax_rate_bp IN {GST_SLABS_BP}", name="gst_slab"),
        CheckConstraint(
            "rating_count >= 0 AND rating_sum = r1 + 2*r2 + 3*r3 + 4*r4 + 5*r5"
            " AND rating_count = r1 + r2 + r3 + r4 + r5",
            name="rating_aggregate",
        ),
        Index("ix_products_search", "search_vector", postgresql_using="gin"),
        Index(
            "ix_products_name_trgm", "name", postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"}
        ),
        Index(
            "ix_products_brand_trgm",
            "brand",
            postgresql_using="gin",
            postgresql_ops={"brand": "gin_trgm_ops"},
        ),
        Index("ix_products_category_name", "category_id", "name", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    sku: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    brand: Mapped[str | None] = mapped_column(String(80))
    description: Mapped[str | None] = mapped_column(Text)
    unit: Mapped[str] = mapped_column(String(40), server_default="1 pc")
    images: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    category_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("categories.id", ondelete="RESTRICT"))
    mrp_paise: Mapped[int]
    price_paise: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3), server_default="INR")
    tax_rate_bp: Mapped[int] = mapped_column(Integer, server_default="0")
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # Review aggregates, updated in the same transaction as the review (see reviews ops).
    rating_count: Mapped[int] = mapped_column(Integer, server_default="0")
    rating_sum: Mapped[int] = mapped_column(Integer, server_default="0")
    r1: Mapped[int] = mapped_column(Integer, server_default="0")
    r2: Mapped[int] = mapped_column(Integer, server_default="0")
    r3: Mapped[int] = mapped_column(Integer, server_default="0")
    r4: Mapped[int] = mapped_column(Integer, server_default="0")
    r5: Mapped[int] = mapped_column(Integer, server_default="0")
    # Weighted full-text document: name (A) > brand (B) > category (C) > description (D).
    # Maintained by the write paths through `search_document_sql`.
    search_vector: Mapped[str | None] = mapped_column(TSVECTOR)


class Inventory(Base):
    """Stock of one product in one store. `available = on_hand - reserved`."""

    __tablename__ = "inventory"
    __table_args__ = (
        CheckConstraint("on_hand >= 0 AND reserved >= 0 AND reserved <= on_hand", name="stock"),
        CheckConstraint("low_stock_threshold >= 0", name="threshold"),
        Index("ix_inventory_product", "product_id"),
    )

    store_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"), primary_key=True)
    product_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    on_hand: Mapped[int] = mapped_column(Integer, server_default="0")
    reserved: Mapped[int] = mapped_column(Integer, server_default="0")
    low_stock_threshold: Mapped[int] = mapped_column(Integer, server_default="5")
    updated_at: Mapped[datetime] = mapped_column(server_default=text("now()"), onupdate=text("now()"))


class Review(TimestampMixin, Base):
    __tablename__ = "product_reviews"
    __table_args__ = (
        UniqueConstraint("product_id", "user_id", name="uq_product_reviews_product_user"),
        CheckConstraint("rating BETWEEN 1 AND 5", name="rating"),
        Index("ix_product_reviews_product_created", "product_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    rating: Mapped[int] = mapped_column(Integer)
    title: Mapped[str | None] = mapped_column(String(120))
    body: Mapped[str | None] = mapped_column(String(2000))


class Coupon(TimestampMixin, Base):
    """A discount code. Percentages are basis points; amounts are paise."""

    __tablename__ = "coupons"
    __table_args__ = (
        CheckConstraint("kind IN ('percent', 'flat')", name="kind"),
        CheckConstraint(
            "(kind = 'percent' AND value BETWEEN 1 AND 10000) OR (kind = 'flat' AND value > 0)",
            name="value",
        ),
        CheckConstraint("max_discount_paise IS NULL OR max_discount_paise > 0", name="cap"),
        CheckConstraint("min_order_paise >= 0 AND per_user_limit >= 1", name="limits"),
        CheckConstraint("code = upper(code)", name="code_upper"),
    )

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    description: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[int] = mapped_column(Integer)
    max_discount_paise: Mapped[int | None] = mapped_column(Integer)
    min_order_paise: Mapped[int] = mapped_column(Integer, server_default="0")
    first_order_only: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    per_user_limit: Mapped[int] = mapped_column(Integer, server_default="1")
    total_limit: Mapped[int | None] = mapped_column(Integer)
    valid_from: Mapped[datetime]
    valid_until: Mapped[datetime]
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))


class CouponRedemption(Base):
    """One use of a coupon by a user, written by checkout (issue 4) with the order."""

    __tablename__ = "coupon_redemptions"
    __table_args__ = (Index("ix_coupon_redemptions_code_user", "coupon_code", "user_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    coupon_code: Mapped[str] = mapped_column(ForeignKey("coupons.code", ondelete="RESTRICT"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    order_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


# The weighted document behind full-text search. English configuration: stemming makes
# "bananas" match "banana". Run after any write to a product's name, brand, description or
# category (or a category's name).
SEARCH_DOCUMENT_SQL = """
UPDATE products AS p SET search_vector =
    setweight(to_tsvector('english', coalesce(p.name, '')), 'A')
    || setweight(to_tsvector('english', coalesce(p.brand, '')), 'B')
    || setweight(to_tsvector('english', coalesce(c.name, '')), 'C')
    || setweight(to_tsvector('english', coalesce(p.description, '')), 'D')
FROM categories AS c
WHERE c.id = p.category_id AND (CAST(:ids AS uuid[]) IS NULL OR p.id = ANY(CAST(:ids AS uuid[])))
"""


async def refresh_search_vectors(session: AsyncSession, product_ids: list[uuid.UUID] | None = None) -> None:
    """Recompute the search document of the given products (all when None)."""
    await session.execute(sql_text(SEARCH_DOCUMENT_SQL), {"ids": product_ids})


class NotServiceable(AppError):
    status_code = 422
    code = "not_serviceable"


def distance_km(lat: float, lng: float) -> ColumnElement[float]:
    """Great-circle (haversine) distance in km from a store to the point."""
    dlat = func.radians(lat - Store.lat) / 2
    dlng = func.radians(lng - Store.lng) / 2
    a = func.power(func.sin(dlat), 2) + func.cos(func.radians(Store.lat)) * math.cos(
        math.radians(lat)
    ) * func.power(func.sin(dlng), 2)
    return 2 * 6371.0 * func.asin(func.sqrt(a))


async def serving_stores(session: AsyncSession, lat: float, lng: float) -> list[tuple[Store, float]]:
    """Active stores whose service radius covers the point, nearest first, with distance."""
    distance = distance_km(lat, lng).label("distance_km")
    rows = await session.execute(
        select(Store, distance)
        .where(Store.is_active, distance <= Store.service_radius_km)
        .order_by(distance, Store.code)
    )
    return [(store, float(km)) for store, km in rows.all()]


async def serving_store(session: AsyncSession, lat: float, lng: float) -> Store:
    """The one store that serves a point (the nearest covering it), or 422 not_serviceable."""
    stores = await serving_stores(session, lat, lng)
    if not stores:
        raise NotServiceable("No dark store delivers to this location yet")
    return stores[0][0]
