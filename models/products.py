"""Catalog: dark stores, the category tree, products, per-store inventory, reviews.

Money is integer paise. Stock guarantees live in PostgreSQL: `reserved <= on_hand` and both
non-negative are CHECK constraints, so no code path can oversell even by mistake.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import datetime, time
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
)
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ColumnElement,
    Float,
    ForeignKey,
    Index,
    Integer,
    Row,
    Select,
    String,
    Text,
    UniqueConstraint,
    and_,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, Mapped, mapped_column

from models.bodies import Strict
from models.db import Base, TimestampMixin, new_id, patch_changes
from models.errors import AppError, Conflict, NotFound, Unprocessable
from models.users import Address, Lat, Lng, no_nul, round_coordinate, storable

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
        # The listing's order and keyset: without it every page sorted the whole catalog.
        Index("ix_products_listing", text('name COLLATE "C"'), "id", postgresql_where=text("is_active")),
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
    order_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
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


# A coordinate: a number, or a column to correlate with (e.g. `Address.lat`).
Coordinate = float | ColumnElement[float] | InstrumentedAttribute[float]


def distance_km(lat: Coordinate, lng: Coordinate) -> ColumnElement[float]:
    """Great-circle (haversine) distance in km from a store to a point: numbers, or columns
    (e.g. an address's) for a correlated query."""
    dlat = func.radians(lat - Store.lat) / 2
    dlng = func.radians(lng - Store.lng) / 2
    a = func.power(func.sin(dlat), 2) + func.cos(func.radians(Store.lat)) * func.cos(
        func.radians(lat)
    ) * func.power(func.sin(dlng), 2)
    return 2 * 6371.0 * func.asin(func.sqrt(a))


def serving_stores_query(lat: Coordinate, lng: Coordinate) -> Select[Store, float]:
    """Active stores whose radius covers the point, nearest first (ties by code): THE rule for
    which store serves an address, shared by browsing and carts."""
    distance = distance_km(lat, lng).label("distance_km")
    return (
        select(Store, distance)
        .where(Store.is_active, distance <= Store.service_radius_km)
        .order_by(distance, Store.code)
    )


async def serving_stores(session: AsyncSession, lat: float, lng: float) -> list[tuple[Store, float]]:
    """Active stores whose service radius covers the point, nearest first, with distance."""
    rows = await session.execute(serving_stores_query(round_coordinate(lat), round_coordinate(lng)))
    return [(store, float(km)) for store, km in rows.all()]


async def serving_store(session: AsyncSession, lat: float, lng: float) -> Store:
    """The one store that serves a point (the nearest covering it), or 422 not_serviceable."""
    stores = await serving_stores(session, lat, lng)
    if not stores:
        raise NotServiceable("No dark store delivers to this location yet")
    return stores[0][0]


# ================================================================ schemas
#
# Inputs forbid unknown fields: sending a read-only field (id, rating aggregates, reserved,
# created_at, search_vector ...) is a 422, never silently applied. Business rules that need
# a clear code of their own (price above MRP, GST slab) are checked by the ops below, so the
# same rule gives the same code on create, patch and bulk import.


MAX_IMPORT_ROWS = 1000
MAX_PAGE = 100


_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$")


def _clock(value: Any) -> time:
    # Opening hours are local wall-clock times in the store's `timezone`: "HH:MM[:SS]", no
    # offset (it would be ambiguous, and the column has no zone).
    if isinstance(value, time) and value.tzinfo is None:
        return value
    if isinstance(value, str) and _CLOCK.match(value):
        return time.fromisoformat(value)
    raise ValueError('expected a local time "HH:MM" or "HH:MM:SS" without an offset')


NoNul = AfterValidator(no_nul)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120), NoNul]
City = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), NoNul]
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$", max_length=80)]
Sku = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
StoreCode = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9_-]{0,31}$")]
ProductName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NoNul]
Brand = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80), NoNul]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=5000), NoNul]
Unit = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40), NoNul]
ImageUrl = Annotated[str, StringConstraints(pattern=r"^https://[!-~]{1,500}$")]
TimeZone = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_+/-]{0,63}$")]
# Wall-clock times are documented as plain "HH:MM[:SS]" strings: JSON Schema's `time` format
# demands an offset, which these deliberately lack.
_CLOCK_SCHEMA = WithJsonSchema({"type": "string", "pattern": _CLOCK.pattern, "examples": ["07:00"]})
LocalTime = Annotated[time, BeforeValidator(_clock), _CLOCK_SCHEMA]
ClockOut = Annotated[time, PlainSerializer(lambda t: t.strftime("%H:%M:%S"), return_type=str), _CLOCK_SCHEMA]
ReviewTitle = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120), NoNul]
ReviewBody = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000), NoNul]
Paise = Annotated[int, Field(strict=True, gt=0, le=10_000_000_00, description="Integer paise")]
TaxBp = Annotated[int, Field(strict=True, description=f"GST slab in basis points, one of {GST_SLABS_BP}")]
Radius = Annotated[float, Field(strict=True, gt=0, le=50)]
Count = Annotated[int, Field(strict=True, ge=0, le=1_000_000)]
Flag = Annotated[bool, Field(strict=True)]
Position = Annotated[int, Field(strict=True, ge=0, le=100_000)]


class StoreIn(Strict):
    code: StoreCode
    name: Name
    city: City
    lat: Lat
    lng: Lng
    service_radius_km: Radius
    opens_at: LocalTime = Field(description="Local opening time; equal to closes_at means 24 h")
    closes_at: LocalTime = Field(description="Local closing time; earlier than opens_at spans midnight")
    timezone: TimeZone = "Asia/Kolkata"
    is_active: Flag = True


class StorePatch(Strict):
    name: Name | None = None
    city: City | None = None
    lat: Lat | None = None
    lng: Lng | None = None
    service_radius_km: Radius | None = None
    opens_at: LocalTime | None = None
    closes_at: LocalTime | None = None
    timezone: TimeZone | None = None
    is_active: Flag | None = None


class StoreOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    code: str
    name: str
    city: str
    lat: float
    lng: float
    service_radius_km: float
    opens_at: ClockOut
    closes_at: ClockOut
    timezone: str
    is_active: bool


class NearbyStoreOut(StoreOut):
    distance_km: float
    is_open: bool


class CategoryIn(Strict):
    parent_id: uuid.UUID | None = None
    slug: Slug
    name: Name
    position: Position = 0
    is_active: Flag = True


class CategoryPatch(Strict):
    parent_id: uuid.UUID | None = Field(default=None, description="null moves it to the root")
    slug: Slug | None = None
    name: Name | None = None
    position: Position | None = None
    is_active: Flag | None = None


class CategoryOut(BaseModel):
    """One node of the category tree, flat: clients nest by `parent_id`, siblings by
    `position`. `depth` is 0 for roots."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    parent_id: uuid.UUID | None
    slug: str
    name: str
    position: int
    is_active: bool
    depth: int = 0


class ProductIn(Strict):
    sku: Sku
    name: ProductName
    brand: Brand | None = None
    description: Description | None = None
    unit: Unit = "1 pc"
    images: Annotated[list[ImageUrl], Field(max_length=10)] = []
    category_id: uuid.UUID
    mrp_paise: Paise
    price_paise: Paise
    tax_rate_bp: TaxBp = 0
    is_active: Flag = True


class ProductPatch(Strict):
    name: ProductName | None = None
    brand: Brand | None = None
    description: Description | None = None
    unit: Unit | None = None
    images: Annotated[list[ImageUrl], Field(max_length=10)] | None = None
    category_id: uuid.UUID | None = None
    mrp_paise: Paise | None = None
    price_paise: Paise | None = None
    tax_rate_bp: TaxBp | None = None
    is_active: Flag | None = None


class ProductImportRow(Strict):
    """One row of a bulk import: upserted by `sku`; the category is named by its slug."""

    sku: Sku
    name: ProductName
    brand: Brand | None = None
    description: Description | None = None
    unit: Unit = "1 pc"
    images: Annotated[list[ImageUrl], Field(max_length=10)] = []
    category_slug: Slug
    mrp_paise: Paise
    price_paise: Paise
    tax_rate_bp: TaxBp = 0
    is_active: Flag = True


class ProductImport(Strict):
    products: Annotated[list[ProductImportRow], Field(min_length=1, max_length=MAX_IMPORT_ROWS)]


class ImportResult(BaseModel):
    created: int
    updated: int
    product_ids: list[uuid.UUID]


class Availability(BaseModel):
    """Stock of the product in one store, as a customer sees it."""

    store_id: uuid.UUID
    available: int = Field(description="on_hand - reserved; 0 when the store does not stock it")
    in_stock: bool
    low_stock: bool = Field(description="in stock but at or below the store's low-stock threshold")


class Ratings(BaseModel):
    average: float | None = Field(description="Mean rating rounded to 2 places; null without reviews")
    count: int
    histogram: dict[str, int] = Field(description='Reviews per star, keys "1".."5"')


class ProductOut(BaseModel):
    id: uuid.UUID
    sku: str
    name: str
    brand: str | None
    unit: str
    images: list[str]
    category_id: uuid.UUID
    mrp_paise: int
    price_paise: int
    savings_paise: int
    currency: str
    tax_rate_bp: int
    rating_average: float | None
    rating_count: int
    availability: Availability | None = None


class ProductDetail(ProductOut):
    description: str | None
    is_active: bool
    ratings: Ratings


class ProductPage(BaseModel):
    items: list[ProductOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end")


class InventoryIn(Strict):
    on_hand: Count
    low_stock_threshold: Count = 5


class InventoryOut(BaseModel):
    store_id: uuid.UUID
    product_id: uuid.UUID
    on_hand: int
    reserved: int
    available: int
    low_stock_threshold: int
    in_stock: bool
    low_stock: bool


class ReviewIn(Strict):
    rating: Annotated[int, Field(strict=True, ge=1, le=5)]
    title: ReviewTitle | None = None
    body: ReviewBody | None = None


class ReviewOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    product_id: uuid.UUID
    rating: int
    title: str | None
    body: str | None
    created_at: datetime
    updated_at: datetime


class ReviewResult(BaseModel):
    review: ReviewOut
    ratings: Ratings


class ReviewPage(BaseModel):
    items: list[ReviewOut]
    next_cursor: str | None


# ================================================================ errors


class InvalidCursor(AppError):
    status_code = 400
    code = "invalid_cursor"


class StoreNotFound(NotFound):
    code = "store_not_found"


class CategoryNotFound(NotFound):
    code = "category_not_found"


class ProductNotFound(NotFound):
    code = "product_not_found"


# ================================================================ pure rules


def is_open(store: Store, now: datetime) -> bool:
    """Whether the store is open at `now` in its own timezone. opens == closes is 24 h; a
    closing time before the opening time spans midnight."""
    local = now.astimezone(ZoneInfo(store.timezone)).time()
    if store.opens_at == store.closes_at:
        return True
    if store.opens_at < store.closes_at:
        return store.opens_at <= local < store.closes_at
    return local >= store.opens_at or local < store.closes_at


def price_errors(mrp_paise: int, price_paise: int, tax_rate_bp: int) -> list[tuple[str, str]]:
    """(code, detail) for each price rule broken; empty when the prices are valid."""
    errors = []
    if price_paise > mrp_paise:
        errors.append(("price_above_mrp", "The selling price cannot exceed the MRP"))
    if tax_rate_bp not in GST_SLABS_BP:
        errors.append(("invalid_gst_slab", f"tax_rate_bp must be one of {list(GST_SLABS_BP)}"))
    return errors


def _check_prices(mrp_paise: int, price_paise: int, tax_rate_bp: int) -> None:
    if errors := price_errors(mrp_paise, price_paise, tax_rate_bp):
        code, detail = errors[0]
        raise Unprocessable(detail, code=code)


# A row of selected columns, whatever their types (a listing's, a store's stock).
AnyRow = Row[*tuple[Any, ...]]


def _average(rating_sum: int, count: int) -> float | None:
    return round(rating_sum / count, 2) if count else None


def ratings_of(p: Product) -> Ratings:
    hist = {"1": p.r1, "2": p.r2, "3": p.r3, "4": p.r4, "5": p.r5}
    return Ratings(average=_average(p.rating_sum, p.rating_count), count=p.rating_count, histogram=hist)


def availability_of(store_id: uuid.UUID, inv: Inventory | AnyRow | None) -> Availability:
    available = (inv.on_hand - inv.reserved) if inv is not None else 0
    in_stock = available > 0
    low = in_stock and inv is not None and available <= inv.low_stock_threshold
    return Availability(store_id=store_id, available=available, in_stock=in_stock, low_stock=low)


def inventory_out(inv: Inventory) -> InventoryOut:
    available = inv.on_hand - inv.reserved
    return InventoryOut(
        store_id=inv.store_id,
        product_id=inv.product_id,
        on_hand=inv.on_hand,
        reserved=inv.reserved,
        available=available,
        low_stock_threshold=inv.low_stock_threshold,
        in_stock=available > 0,
        low_stock=0 < available <= inv.low_stock_threshold,
    )


def product_out(p: Product | AnyRow, availability: Availability | None = None) -> ProductOut:
    """From a product, or a row of the listing's columns (`_LISTED`)."""
    return ProductOut(
        id=p.id,
        sku=p.sku,
        name=p.name,
        brand=p.brand,
        unit=p.unit,
        images=list(p.images or []),
        category_id=p.category_id,
        mrp_paise=p.mrp_paise,
        price_paise=p.price_paise,
        savings_paise=p.mrp_paise - p.price_paise,
        currency=p.currency,
        tax_rate_bp=p.tax_rate_bp,
        rating_average=_average(p.rating_sum, p.rating_count),
        rating_count=p.rating_count,
        availability=availability,
    )


def product_detail(p: Product, availability: Availability | None = None) -> ProductDetail:
    base = product_out(p, availability).model_dump()
    return ProductDetail(**base, description=p.description, is_active=p.is_active, ratings=ratings_of(p))


# Cursors are base64url JSON of the last row's sort key. They are opaque to clients; anything
# that does not decode to the exact expected shape is a 400 invalid_cursor.


def encode_cursor(*key: Any) -> str:
    raw = json.dumps([str(k) for k in key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (ValueError, binascii.Error):
        raise InvalidCursor("The cursor is not valid") from None
    if (
        not isinstance(key, list)
        or len(key) != n
        or not all(isinstance(k, str) and len(k) <= 300 and storable(k) for k in key)
    ):
        raise InvalidCursor("The cursor is not valid")
    return key


def _cursor_uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidCursor("The cursor is not valid") from None


def decode_time_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """A (created_at, id) cursor of a newest-first page."""
    created, last = decode_cursor(cursor, 2)
    try:
        return datetime.fromisoformat(created), _cursor_uuid(last)
    except ValueError:
        raise InvalidCursor("The cursor is not valid") from None


# ================================================================ stores


async def list_stores(session: AsyncSession) -> list[Store]:
    rows = await session.scalars(select(Store).where(Store.is_active).order_by(Store.city, Store.code))
    return list(rows)


async def nearby_stores(session: AsyncSession, lat: float, lng: float, now: datetime) -> list[NearbyStoreOut]:
    """Stores serving the point, nearest first; none is 422 not_serviceable."""
    found = await serving_stores(session, lat, lng)
    if not found:
        raise NotServiceable("No dark store delivers to this location yet")
    return [
        NearbyStoreOut(
            **StoreOut.model_validate(s).model_dump(), distance_km=round(km, 3), is_open=is_open(s, now)
        )
        for s, km in found
    ]


async def get_store(session: AsyncSession, store_id: uuid.UUID, *, active_only: bool = True) -> Store:
    store = await session.get(Store, store_id)
    if store is None or (active_only and not store.is_active):
        raise StoreNotFound("No such store")
    return store


def _check_timezone(tz: str) -> None:
    try:
        ZoneInfo(tz)
    except (ValueError, KeyError, OSError):
        raise Unprocessable("Unknown timezone", code="invalid_timezone") from None


async def _flush_unique(session: AsyncSession, conflict: Conflict, add: Base | None = None) -> None:
    """Flush (adding `add` first) in a savepoint; a unique-key violation becomes `conflict`
    and leaves the request's transaction usable."""
    try:
        async with session.begin_nested():
            if add is not None:
                session.add(add)
            await session.flush()
    except IntegrityError:
        raise conflict from None


async def create_store(session: AsyncSession, data: StoreIn) -> Store:
    _check_timezone(data.timezone)
    store = Store(**data.model_dump())
    await _flush_unique(session, Conflict("A store with this code exists", code="store_code_taken"), store)
    await session.refresh(store)
    return store


async def update_store(session: AsyncSession, store_id: uuid.UUID, patch: StorePatch) -> Store:
    store = await session.get(Store, store_id, with_for_update=True)
    if store is None:
        raise StoreNotFound("No such store")
    changes = patch_changes(patch)
    if "timezone" in changes:
        _check_timezone(changes["timezone"])
    for field, value in changes.items():
        setattr(store, field, value)
    await session.flush()
    await session.refresh(store)
    return store


async def store_for_address(session: AsyncSession, user_id: uuid.UUID, address_id: uuid.UUID) -> Store:
    """The store serving one of the caller's own addresses. Someone else's address is a 404,
    exactly like a missing one."""
    address = await session.get(Address, address_id)
    if address is None or address.user_id != user_id:
        raise NotFound("No such address", code="address_not_found")
    return await serving_store(session, address.lat, address.lng)


# ================================================================ categories

_TREE_SQL = """
WITH RECURSIVE tree AS (
    SELECT id, 0 AS depth, ARRAY[position::bigint] AS path_pos, ARRAY[id] AS path_id
    FROM categories WHERE parent_id IS NULL
    UNION ALL
    SELECT c.id, t.depth + 1, t.path_pos || c.position::bigint, t.path_id || c.id
    FROM categories c JOIN tree t ON c.parent_id = t.id
)
SELECT id, depth FROM tree ORDER BY path_pos, path_id
"""


async def category_tree(session: AsyncSession, *, active_only: bool = True) -> list[CategoryOut]:
    """The whole tree, flat and in depth-first order (siblings by position). An inactive
    category hides its whole subtree from customers."""
    order = (await session.execute(sql_text(_TREE_SQL))).all()
    cats = {c.id: c for c in await session.scalars(select(Category))}
    out: list[CategoryOut] = []
    hidden: set[uuid.UUID] = set()
    for cid, depth in order:
        c = cats[cid]
        if active_only and (not c.is_active or (c.parent_id is not None and c.parent_id in hidden)):
            hidden.add(cid)
            continue
        out.append(CategoryOut.model_validate(c).model_copy(update={"depth": depth}))
    return out


def _subtree_ids(root: uuid.UUID) -> Any:
    """A SELECT of the category and all its descendants (recursive CTE)."""
    base = select(Category.id).where(Category.id == root).cte("subtree", recursive=True)
    return base.union_all(select(Category.id).join(base, Category.parent_id == base.c.id))


async def _lock_tree(session: AsyncSession) -> None:
    # Tree writes are rare: one transaction-scoped advisory lock makes the cycle check and the
    # move atomic, so two concurrent moves cannot build a loop between them.
    await session.execute(sql_text("SELECT pg_advisory_xact_lock(hashtext('vurksha:category-tree'))"))


async def get_category_by_slug(session: AsyncSession, slug: str) -> Category:
    cat = await session.scalar(select(Category).where(Category.slug == slug))
    if cat is None:
        raise CategoryNotFound("No such category")
    return cat


async def create_category(session: AsyncSession, data: CategoryIn) -> Category:
    await _lock_tree(session)
    if data.parent_id is not None and await session.get(Category, data.parent_id) is None:
        raise CategoryNotFound("The parent category does not exist")
    cat = Category(**data.model_dump())
    await _flush_unique(session, Conflict("A category with this slug exists", code="slug_taken"), cat)
    await session.refresh(cat)
    return cat


async def update_category(session: AsyncSession, category_id: uuid.UUID, patch: CategoryPatch) -> Category:
    await _lock_tree(session)
    cat = await session.get(Category, category_id)
    if cat is None:
        raise CategoryNotFound("No such category")
    changes = patch_changes(patch, required=("slug", "name", "position", "is_active"))
    if (parent_id := changes.get("parent_id")) is not None:
        if await session.get(Category, parent_id) is None:
            raise CategoryNotFound("The parent category does not exist")
        subtree = _subtree_ids(category_id)
        inside = await session.scalar(
            select(func.count()).select_from(subtree).where(subtree.c.id == parent_id)
        )
        if inside:
            raise Conflict("A category cannot move under itself or its descendants", code="category_cycle")
    renamed = "name" in changes and changes["name"] != cat.name
    for field, value in changes.items():
        setattr(cat, field, value)
    await _flush_unique(session, Conflict("A category with this slug exists", code="slug_taken"))
    if renamed:  # the category name is part of its products' search documents
        ids = list(await session.scalars(select(Product.id).where(Product.category_id == category_id)))
        if ids:
            await refresh_search_vectors(session, ids)
    await session.refresh(cat)
    return cat


# ================================================================ products


async def _inventory(session: AsyncSession, store_id: uuid.UUID, product_id: uuid.UUID) -> Inventory | None:
    return await session.get(Inventory, (store_id, product_id), populate_existing=True)


# A listing's columns, read as rows: loading whole Product instances (and each store's stock
# as Inventory instances) was most of a listing's CPU.
_LISTED = (
    Product.id,
    Product.sku,
    Product.name,
    Product.brand,
    Product.unit,
    Product.images,
    Product.category_id,
    Product.mrp_paise,
    Product.price_paise,
    Product.currency,
    Product.tax_rate_bp,
    Product.rating_sum,
    Product.rating_count,
)
_STOCK = (Inventory.on_hand, Inventory.reserved, Inventory.low_stock_threshold)


async def list_products(
    session: AsyncSession,
    *,
    category_id: uuid.UUID | None = None,
    store_id: uuid.UUID | None = None,
    cursor: str | None = None,
    limit: int = 20,
) -> ProductPage:
    """Active products in (name, id) order, keyset-paged; with a category, that category and
    every descendant; with a store, that store's availability on each item."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(*_LISTED).where(Product.is_active)
    if store_id is not None:
        if not await session.scalar(select(Store.is_active).where(Store.id == store_id)):
            raise StoreNotFound("No such store")
        stock = and_(Inventory.store_id == store_id, Inventory.product_id == Product.id)
        query = query.add_columns(*_STOCK).outerjoin(Inventory, stock)
    if category_id is not None:
        if await session.get(Category, category_id) is None:
            raise CategoryNotFound("No such category")
        subtree = _subtree_ids(category_id)
        query = query.where(Product.category_id.in_(select(subtree.c.id)))
    # Byte order, not the locale's: keyset comparison and ORDER BY must agree exactly.
    # A row comparison, so the next page starts where the index says instead of filtering.
    key = tuple_(Product.name.collate("C"), Product.id)
    query = query.order_by(*key.clauses).limit(limit + 1)
    if cursor is not None:
        name, last = decode_cursor(cursor, 2)
        query = query.where(key > tuple_(literal(name), literal(_cursor_uuid(last))))
    rows = (await session.execute(query)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        product_out(
            r, None if store_id is None else availability_of(store_id, r if r.on_hand is not None else None)
        )
        for r in rows
    ]
    next_cursor = encode_cursor(rows[-1].name, rows[-1].id) if more else None
    return ProductPage(items=items, next_cursor=next_cursor)


async def get_product(session: AsyncSession, product_id: uuid.UUID, *, active_only: bool = True) -> Product:
    p = await session.get(Product, product_id, populate_existing=True)
    if p is None or (active_only and not p.is_active):
        raise ProductNotFound("No such product")
    return p


async def product_view(
    session: AsyncSession, product_id: uuid.UUID, store_id: uuid.UUID | None = None
) -> ProductDetail:
    p = await get_product(session, product_id)
    availability = None
    if store_id is not None:
        # The store's check and its stock of the product in one round trip, read as a row.
        stock = and_(Inventory.store_id == Store.id, Inventory.product_id == product_id)
        row = (
            await session.execute(
                select(Store.is_active, *_STOCK).outerjoin(Inventory, stock).where(Store.id == store_id)
            )
        ).one_or_none()
        if row is None or not row.is_active:
            raise StoreNotFound("No such store")
        availability = availability_of(store_id, row if row.on_hand is not None else None)
    return product_detail(p, availability)


async def create_product(session: AsyncSession, data: ProductIn) -> Product:
    _check_prices(data.mrp_paise, data.price_paise, data.tax_rate_bp)
    if await session.get(Category, data.category_id) is None:
        raise CategoryNotFound("No such category")
    product = Product(**data.model_dump())
    await _flush_unique(session, Conflict("A product with this SKU exists", code="sku_taken"), product)
    await refresh_search_vectors(session, [product.id])
    await session.refresh(product)
    return product


async def update_product(session: AsyncSession, product_id: uuid.UUID, patch: ProductPatch) -> Product:
    product = await session.get(Product, product_id, with_for_update=True)
    if product is None:
        raise ProductNotFound("No such product")
    changes = patch_changes(
        patch,
        required=(
            "name",
            "unit",
            "images",
            "category_id",
            "mrp_paise",
            "price_paise",
            "tax_rate_bp",
            "is_active",
        ),
    )
    _check_prices(
        changes.get("mrp_paise", product.mrp_paise),
        changes.get("price_paise", product.price_paise),
        changes.get("tax_rate_bp", product.tax_rate_bp),
    )
    if "category_id" in changes and await session.get(Category, changes["category_id"]) is None:
        raise CategoryNotFound("No such category")
    for field, value in changes.items():
        setattr(product, field, value)
    await session.flush()
    await refresh_search_vectors(session, [product.id])
    await session.refresh(product)
    return product


async def import_products(session: AsyncSession, data: ProductImport) -> ImportResult:
    """Upsert up to MAX_IMPORT_ROWS products by SKU in the caller's transaction: every row is
    checked first and any error rejects the whole batch (422 `import_invalid` listing each
    bad row's index), so nothing is half-applied."""
    slugs = {r.category_slug for r in data.products}
    cats = dict(
        (await session.execute(select(Category.slug, Category.id).where(Category.slug.in_(slugs)))).all()
    )
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(data.products):
        for code, detail in price_errors(row.mrp_paise, row.price_paise, row.tax_rate_bp):
            errors.append({"row": i, "code": code, "detail": detail})
        if row.category_slug not in cats:
            errors.append({"row": i, "code": "category_not_found", "detail": "No such category slug"})
        if row.sku in seen:
            errors.append({"row": i, "code": "duplicate_sku", "detail": f"SKU repeats row {seen[row.sku]}"})
        seen.setdefault(row.sku, i)
    if errors:
        raise Unprocessable(
            f"{len({e['row'] for e in errors})} row(s) are invalid; nothing was imported",
            code="import_invalid",
            extra={"errors": errors},
        )
    values = [
        {**row.model_dump(exclude={"category_slug"}), "category_id": cats[row.category_slug]}
        for row in data.products
    ]
    stmt = pg_insert(Product).values(values)
    writable = [k for k in values[0] if k != "sku"]
    upsert: Any = stmt.on_conflict_do_update(
        index_elements=[Product.sku],
        set_={**{k: stmt.excluded[k] for k in writable}, "updated_at": func.now()},
    ).returning(Product.id, literal_column("(xmax = 0)").label("inserted"))
    rows = (await session.execute(upsert)).all()
    ids = [r.id for r in rows]
    await refresh_search_vectors(session, ids)
    created = sum(1 for r in rows if r.inserted)
    return ImportResult(created=created, updated=len(rows) - created, product_ids=ids)


# ================================================================ inventory


async def set_inventory(
    session: AsyncSession, store_id: uuid.UUID, product_id: uuid.UUID, data: InventoryIn
) -> InventoryOut:
    """Set on-hand stock and the low-stock threshold. One conditional upsert: the update
    happens only if the new on_hand still covers what is reserved, so a concurrent
    reservation can never be stranded (the table's CHECK is the last line of defence)."""
    await get_store(session, store_id, active_only=False)
    await get_product(session, product_id, active_only=False)
    stmt = pg_insert(Inventory).values(
        store_id=store_id,
        product_id=product_id,
        on_hand=data.on_hand,
        low_stock_threshold=data.low_stock_threshold,
    )
    upsert = stmt.on_conflict_do_update(
        index_elements=[Inventory.store_id, Inventory.product_id],
        set_={
            "on_hand": stmt.excluded.on_hand,
            "low_stock_threshold": stmt.excluded.low_stock_threshold,
            "updated_at": func.now(),
        },
        where=Inventory.reserved <= stmt.excluded.on_hand,
    ).returning(Inventory.store_id)
    if (await session.execute(upsert)).first() is None:
        inv = await _inventory(session, store_id, product_id)
        reserved = inv.reserved if inv is not None else 0
        raise Conflict(
            f"on_hand cannot go below the {reserved} unit(s) already reserved",
            code="below_reserved",
            extra={"reserved": reserved},
        )
    inv = await _inventory(session, store_id, product_id)
    assert inv is not None
    return inventory_out(inv)


# ================================================================ reviews

_BUCKETS = {1: "r1", 2: "r2", 3: "r3", 4: "r4", 5: "r5"}


async def upsert_review(
    session: AsyncSession, product_id: uuid.UUID, user_id: uuid.UUID, data: ReviewIn
) -> ReviewResult:
    """Write the caller's one review of a product (posting again replaces it) and move the
    product's aggregates by exactly the difference, in one transaction. The product row is
    locked first, so concurrent reviews of one product apply one after another and the
    aggregates always equal what the reviews table says."""
    product = await session.scalar(
        select(Product).where(Product.id == product_id, Product.is_active).with_for_update()
    )
    if product is None:
        raise ProductNotFound("No such product")
    review = await session.scalar(
        select(Review).where(Review.product_id == product_id, Review.user_id == user_id)
    )
    delta: dict[str, int] = {"rating_sum": data.rating, "rating_count": 1, _BUCKETS[data.rating]: 1}
    if review is None:
        review = Review(product_id=product_id, user_id=user_id, **data.model_dump())
        session.add(review)
    else:
        old = review.rating
        delta["rating_sum"] -= old
        delta["rating_count"] -= 1
        delta[_BUCKETS[old]] = delta.get(_BUCKETS[old], 0) - 1
        review.rating, review.title, review.body = data.rating, data.title, data.body
    await session.flush()
    await _apply_delta(session, product_id, delta)
    await session.refresh(review)
    product = await get_product(session, product_id)
    return ReviewResult(review=ReviewOut.model_validate(review), ratings=ratings_of(product))


async def delete_review(session: AsyncSession, product_id: uuid.UUID, user_id: uuid.UUID) -> Ratings:
    """Remove the caller's review and its share of the aggregates."""
    product = await session.scalar(select(Product).where(Product.id == product_id).with_for_update())
    if product is None:
        raise ProductNotFound("No such product")
    review = await session.scalar(
        select(Review).where(Review.product_id == product_id, Review.user_id == user_id)
    )
    if review is None:
        raise NotFound("You have not reviewed this product", code="review_not_found")
    await session.delete(review)
    await session.flush()
    await _apply_delta(
        session, product_id, {"rating_sum": -review.rating, "rating_count": -1, _BUCKETS[review.rating]: -1}
    )
    return ratings_of(await get_product(session, product_id, active_only=False))


async def _apply_delta(session: AsyncSession, product_id: uuid.UUID, delta: dict[str, int]) -> None:
    cols = Product.__table__.c
    values = {name: cols[name] + d for name, d in delta.items() if d}
    if values:
        await session.execute(update(Product).where(Product.id == product_id).values(**values))


async def list_reviews(
    session: AsyncSession, product_id: uuid.UUID, *, cursor: str | None = None, limit: int = 20
) -> ReviewPage:
    """Newest first, keyset-paged on (created_at, id)."""
    limit = max(1, min(limit, MAX_PAGE))
    await get_product(session, product_id)
    query = select(Review).where(Review.product_id == product_id)
    if cursor is not None:
        created_at, last_id = decode_time_cursor(cursor)
        query = query.where(
            or_(Review.created_at < created_at, and_(Review.created_at == created_at, Review.id < last_id))
        )
    rows = list(
        await session.scalars(query.order_by(Review.created_at.desc(), Review.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at.isoformat(), rows[-1].id) if more else None
    return ReviewPage(items=[ReviewOut.model_validate(r) for r in rows], next_cursor=next_cursor)
