"""Carts: schemas, the pure pricing rules, and the reads that pricing and validation need.

A cart is plain state (`CartState`: lines, coupon code, chosen address) that the cart shard
actors hold and write through to Redis. Everything here is independent of Ray and HTTP: the
actor loads a `CartContext` (store, product facts, coupon facts) with one session, then the
rules below validate a change and build the priced `CartView` without further I/O.

Money is integer paise throughout. Rounding rules (the only places a paise can move):
- a percentage coupon discount is rounded DOWN to the paise (the customer is never charged a
  fraction of a paise more than the coupon promises to take off, and the cap and subtotal
  bound it);
- the coupon discount is allocated across lines in proportion to line totals by the largest
  remainder method (floor each share, give the leftover paise one each to the lines with the
  largest fractional parts, ties to the earlier line), so the shares sum exactly to the
  discount and no line gets more than its own total;
- prices are GST-inclusive (Indian retail: MRP and selling price include tax), so GST is the
  tax CONTAINED in each line's amount after its discount share:
  `gst = net * rate / (10000 + rate)` with `rate` in basis points, rounded half up to the
  paise, and `taxable value = net - gst`. Per-line rounding, so line taxes sum to the total.
- delivery and small-cart fees are flat amounts, charged as they are (their tax is invoiced
  with the order, not broken out in the cart).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import Select, Uuid, and_, bindparam, func, literal, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from config.settings import Settings
from models.bodies import Strict
from models.errors import AppError, Conflict, NotFound, Unprocessable
from models.products import (
    Coupon,
    CouponRedemption,
    Inventory,
    NotServiceable,
    Product,
    serving_stores_query,
)
from models.users import Address, User

# ---------------------------------------------------------------- state (held by the actors)


class CartLine(Strict):
    product_id: uuid.UUID
    quantity: int = Field(ge=1)
    added_at: datetime


class CartState(Strict):
    """What a cart is: the lines in the order they were added, the coupon code and the chosen
    address. Prices, stock and the store are looked up on every read, never stored."""

    user_id: uuid.UUID
    lines: list[CartLine] = []
    coupon_code: str | None = None
    address_id: uuid.UUID | None = None
    updated_at: datetime

    def line(self, product_id: uuid.UUID) -> CartLine | None:
        return next((line for line in self.lines if line.product_id == product_id), None)


def empty_cart(user_id: uuid.UUID, now: datetime) -> CartState:
    return CartState(user_id=user_id, updated_at=now)


# ---------------------------------------------------------------- request bodies

CouponCode = Annotated[
    str, StringConstraints(strip_whitespace=True, to_upper=True, min_length=1, max_length=32)
]


class AddItem(Strict):
    product_id: uuid.UUID
    quantity: int = Field(
        default=1, ge=1, strict=True, description="Added to the quantity already in the cart"
    )


class SetQuantity(Strict):
    quantity: int = Field(
        ge=1, strict=True, description="The line's new quantity; DELETE the item to remove it"
    )


class ApplyCoupon(Strict):
    code: CouponCode


class ChooseAddress(Strict):
    address_id: uuid.UUID


# ---------------------------------------------------------------- the priced view


class StoreRef(BaseModel):
    id: uuid.UUID
    code: str
    name: str


class CartLineView(BaseModel):
    product_id: uuid.UUID
    name: str | None = Field(description="None when the product no longer exists")
    unit: str | None
    image: str | None
    quantity: int
    unit_price_paise: int
    unit_mrp_paise: int
    tax_rate_bp: int
    line_total_paise: int = Field(description="Selling price x quantity (0 when unavailable)")
    line_mrp_paise: int
    mrp_savings_paise: int
    coupon_discount_paise: int = Field(description="This line's share of the coupon discount")
    taxable_value_paise: int
    gst_paise: int = Field(description="GST contained in the line's amount after discount")
    available: bool = Field(description="False when the store cannot sell this quantity now")
    available_quantity: int = Field(description="What the store can sell now (on hand - reserved)")
    unavailable_reason: (
        Literal["no_store", "product_not_found", "product_inactive", "out_of_stock", "insufficient_stock"]
        | None
    ) = None


class CouponView(BaseModel):
    code: str
    applied: bool
    discount_paise: int
    reason: str | None = Field(default=None, description="Stable code saying why it does not apply now")
    message: str | None = None


class PriceBreakdown(BaseModel):
    """All figures in paise; `total = subtotal - coupon_discount + delivery_fee + small_cart_fee`
    and `subtotal = items_mrp - mrp_savings`. Unavailable lines count in none of them."""

    currency: str = "INR"
    items_mrp_paise: int
    mrp_savings_paise: int
    subtotal_paise: int
    coupon_discount_paise: int
    taxable_value_paise: int
    gst_paise: int
    delivery_fee_paise: int
    small_cart_fee_paise: int
    total_paise: int
    total_savings_paise: int


class CartView(BaseModel):
    user_id: uuid.UUID
    address_id: uuid.UUID | None
    store: StoreRef | None
    store_issue: str | None = Field(
        default=None, description="Why no store is bound (address_required, not_serviceable)"
    )
    lines: list[CartLineView]
    coupon: CouponView | None
    breakdown: PriceBreakdown
    item_count: int = Field(description="Sum of quantities of the available lines")
    updated_at: datetime
    expires_at: datetime | None = Field(description="When the idle cart is dropped (None when empty)")


# ---------------------------------------------------------------- pure pricing


@dataclass(frozen=True)
class PriceInput:
    quantity: int
    unit_price_paise: int
    unit_mrp_paise: int
    tax_rate_bp: int


@dataclass(frozen=True)
class CouponTerms:
    kind: Literal["percent", "flat"]
    value: int  # basis points for percent, paise for flat
    max_discount_paise: int | None
    min_order_paise: int


@dataclass(frozen=True)
class FeeRules:
    delivery_fee_paise: int
    free_delivery_threshold_paise: int
    small_cart_threshold_paise: int
    small_cart_fee_paise: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FeeRules:
        return cls(
            delivery_fee_paise=settings.delivery_fee_paise,
            free_delivery_threshold_paise=settings.free_delivery_threshold_paise,
            small_cart_threshold_paise=settings.small_cart_threshold_paise,
            small_cart_fee_paise=settings.small_cart_fee_paise,
        )


@dataclass(frozen=True)
class LinePrice:
    line_total_paise: int
    line_mrp_paise: int
    mrp_savings_paise: int
    coupon_discount_paise: int
    taxable_value_paise: int
    gst_paise: int


@dataclass(frozen=True)
class Priced:
    lines: list[LinePrice]
    breakdown: PriceBreakdown


def coupon_discount(terms: CouponTerms, subtotal_paise: int) -> int:
    """The discount a coupon gives on a subtotal: 0 below the minimum order; percentages
    rounded down to the paise, then capped; never more than the subtotal."""
    if subtotal_paise <= 0 or subtotal_paise < terms.min_order_paise:
        return 0
    if terms.kind == "percent":
        discount = subtotal_paise * terms.value // 10_000
        if terms.max_discount_paise is not None:
            discount = min(discount, terms.max_discount_paise)
    else:
        discount = terms.value
    return max(0, min(discount, subtotal_paise))


def allocate(amount: int, weights: list[int]) -> list[int]:
    """Split `amount` in proportion to non-negative `weights` by the largest remainder method:
    shares sum exactly to `amount` and, when amount <= sum(weights), no share exceeds its
    weight."""
    total = sum(weights)
    if amount == 0 or total == 0:
        return [0] * len(weights)
    shares = [amount * w // total for w in weights]
    remainders = [amount * w % total for w in weights]
    leftover = amount - sum(shares)
    # Largest fractional part first; ties go to the earlier line (stable order).
    for i in sorted(range(len(weights)), key=lambda i: -remainders[i])[:leftover]:
        shares[i] += 1
    return shares


def contained_gst(amount_paise: int, rate_bp: int) -> int:
    """Tax contained in a GST-inclusive amount, rounded half up to the paise."""
    denominator = 10_000 + rate_bp
    return (2 * amount_paise * rate_bp + denominator) // (2 * denominator)


def fees(value_paise: int, rules: FeeRules) -> tuple[int, int]:
    """(delivery fee, small-cart fee) for a cart whose goods cost `value_paise` after the coupon.
    An empty cart pays nothing; delivery is free at or above the threshold; the small-cart fee
    applies below its threshold."""
    if value_paise <= 0:
        return 0, 0
    delivery = 0 if value_paise >= rules.free_delivery_threshold_paise else rules.delivery_fee_paise
    small = rules.small_cart_fee_paise if value_paise < rules.small_cart_threshold_paise else 0
    return delivery, small


def price_cart(lines: list[PriceInput], coupon: CouponTerms | None, rules: FeeRules) -> Priced:
    """Price the sellable lines of a cart. Pure: same input, same paise."""
    totals = [line.unit_price_paise * line.quantity for line in lines]
    mrps = [max(line.unit_mrp_paise, line.unit_price_paise) * line.quantity for line in lines]
    subtotal = sum(totals)
    discount = coupon_discount(coupon, subtotal) if coupon is not None else 0
    shares = allocate(discount, totals)
    priced: list[LinePrice] = []
    for line, total, mrp, share in zip(lines, totals, mrps, shares, strict=True):
        net = total - share
        gst = contained_gst(net, line.tax_rate_bp)
        priced.append(
            LinePrice(
                line_total_paise=total,
                line_mrp_paise=mrp,
                mrp_savings_paise=mrp - total,
                coupon_discount_paise=share,
                taxable_value_paise=net - gst,
                gst_paise=gst,
            )
        )
    value = subtotal - discount
    delivery, small = fees(value if subtotal > 0 else 0, rules)
    items_mrp = sum(mrps)
    breakdown = PriceBreakdown(
        items_mrp_paise=items_mrp,
        mrp_savings_paise=items_mrp - subtotal,
        subtotal_paise=subtotal,
        coupon_discount_paise=discount,
        taxable_value_paise=sum(p.taxable_value_paise for p in priced),
        gst_paise=sum(p.gst_paise for p in priced),
        delivery_fee_paise=delivery,
        small_cart_fee_paise=small,
        total_paise=value + delivery + small,
        total_savings_paise=items_mrp - subtotal + discount,
    )
    return Priced(lines=priced, breakdown=breakdown)


# ---------------------------------------------------------------- coupon eligibility (pure)


@dataclass(frozen=True)
class CouponFacts:
    """A coupon row plus what the user's eligibility depends on."""

    code: str
    terms: CouponTerms
    is_active: bool
    valid_from: datetime
    valid_until: datetime
    first_order_only: bool
    per_user_limit: int
    total_limit: int | None
    user_is_first_order: bool
    user_redemptions: int
    total_redemptions: int


def coupon_rejection(coupon: CouponFacts | None, subtotal_paise: int, now: datetime) -> AppError | None:
    """Why the coupon cannot apply to this user's cart now, as the error to raise (or show), or
    None when it applies. Checked in a fixed order so the reason is stable."""
    if coupon is None or not coupon.is_active:
        # An inactive code is indistinguishable from an unknown one.
        return NotFound("No such coupon", code="coupon_not_found")
    if now < coupon.valid_from:
        return Unprocessable("This coupon is not valid yet", code="coupon_not_started")
    if now >= coupon.valid_until:
        return Unprocessable("This coupon has expired", code="coupon_expired")
    if coupon.total_limit is not None and coupon.total_redemptions >= coupon.total_limit:
        return Unprocessable("This coupon has been fully used", code="coupon_exhausted")
    if coupon.first_order_only and not coupon.user_is_first_order:
        return Unprocessable("This coupon is for a first order only", code="coupon_first_order_only")
    if coupon.user_redemptions >= coupon.per_user_limit:
        return Unprocessable(
            "You have already used this coupon as often as allowed",
            code="coupon_usage_limit",
            extra={"per_user_limit": coupon.per_user_limit},
        )
    if subtotal_paise < coupon.terms.min_order_paise:
        return Unprocessable(
            "Add more to the cart to use this coupon",
            code="coupon_min_order",
            extra={
                "min_order_paise": coupon.terms.min_order_paise,
                "shortfall_paise": coupon.terms.min_order_paise - subtotal_paise,
            },
        )
    return None


# ---------------------------------------------------------------- context (the reads)


@dataclass(frozen=True)
class ProductFacts:
    id: uuid.UUID
    name: str
    unit: str
    image: str | None
    price_paise: int
    mrp_paise: int
    tax_rate_bp: int
    is_active: bool
    available: int  # at the bound store: on_hand - reserved, 0 without an inventory row


@dataclass(frozen=True)
class Binding:
    address_id: uuid.UUID
    store: StoreRef


@dataclass(frozen=True)
class CartContext:
    """Everything a cart operation reads from PostgreSQL, loaded once per operation."""

    binding: Binding | None
    store_issue: AppError | None
    products: dict[uuid.UUID, ProductFacts]
    coupon: CouponFacts | None


class AddressRequired(Conflict):
    code = "address_required"


@lru_cache(maxsize=1)
def _bind_query() -> Select[Any]:
    """The address (the chosen one if it is still the user's, else the default) and the store
    that serves it, in one round trip: `serving_stores_query` correlated to the address. Built
    once (it is on every cart operation and checkout; building it cost more than running it),
    with the user and the chosen address as bound parameters."""
    nearest = serving_stores_query(Address.lat, Address.lng).limit(1).lateral("nearest")
    chosen = Address.id == bindparam("address_id", type_=Uuid)
    return (
        select(
            Address.id.label("address_id"),
            nearest.c.id.label("store_id"),
            nearest.c.code.label("store_code"),
            nearest.c.name.label("store_name"),
        )
        .select_from(Address)
        .outerjoin(nearest, true())
        .where(Address.user_id == bindparam("user_id", type_=Uuid), or_(chosen, Address.is_default))
        .order_by(chosen.is_(True).desc())
        .limit(1)
    )


async def bind_store(
    session: AsyncSession, user_id: uuid.UUID, address_id: uuid.UUID | None, *, strict: bool
) -> Binding:
    """The store serving the user's chosen address (the default one when none was chosen, or
    the chosen one is gone). `strict`: the chosen address must exist and be the user's own."""
    row = (await session.execute(_bind_query(), {"user_id": user_id, "address_id": address_id})).one_or_none()
    if strict and (row is None or row.address_id != address_id):
        # Someone else's address is indistinguishable from a missing one.
        raise NotFound("No such address", code="address_not_found")
    if row is None:
        raise AddressRequired("Add a delivery address first: the cart is priced for the store serving it")
    if row.store_id is None:
        raise NotServiceable("No dark store delivers to this location yet")
    return Binding(
        address_id=row.address_id,
        store=StoreRef(id=row.store_id, code=row.store_code, name=row.store_name),
    )


async def product_facts(
    session: AsyncSession, store_id: uuid.UUID | None, product_ids: list[uuid.UUID]
) -> dict[uuid.UUID, ProductFacts]:
    if not product_ids:
        return {}
    # Without a store nothing is sellable.
    available = (
        func.coalesce(Inventory.on_hand - Inventory.reserved, 0) if store_id is not None else literal(0)
    )
    stmt = select(
        Product.id,
        Product.name,
        Product.unit,
        Product.images,
        Product.price_paise,
        Product.mrp_paise,
        Product.tax_rate_bp,
        Product.is_active,
        available.label("available"),
    ).where(Product.id.in_(product_ids))
    if store_id is not None:
        stmt = stmt.outerjoin(
            Inventory, and_(Inventory.product_id == Product.id, Inventory.store_id == store_id)
        )
    rows = (await session.execute(stmt)).all()
    return {
        r.id: ProductFacts(
            id=r.id,
            name=r.name,
            unit=r.unit,
            image=r.images[0] if r.images else None,
            price_paise=r.price_paise,
            mrp_paise=r.mrp_paise,
            tax_rate_bp=r.tax_rate_bp,
            is_active=r.is_active,
            available=max(0, int(r.available)),
        )
        for r in rows
    }


async def coupon_facts(session: AsyncSession, code: str, user_id: uuid.UUID) -> CouponFacts | None:
    """The coupon and this user's standing with it, in one query."""
    mine = (
        select(func.count())
        .select_from(CouponRedemption)
        .where(CouponRedemption.coupon_code == Coupon.code, CouponRedemption.user_id == user_id)
        .scalar_subquery()
    )
    everyone = (
        select(func.count())
        .select_from(CouponRedemption)
        .where(CouponRedemption.coupon_code == Coupon.code)
        .scalar_subquery()
    )
    first = select(User.first_order_at.is_(None)).where(User.id == user_id).scalar_subquery()
    row = (
        await session.execute(
            select(Coupon, mine.label("mine"), everyone.label("everyone"), first.label("first")).where(
                Coupon.code == code
            )
        )
    ).one_or_none()
    if row is None:
        return None
    c: Coupon = row[0]
    return CouponFacts(
        code=c.code,
        terms=CouponTerms(
            kind="percent" if c.kind == "percent" else "flat",
            value=c.value,
            max_discount_paise=c.max_discount_paise,
            min_order_paise=c.min_order_paise,
        ),
        is_active=c.is_active,
        valid_from=c.valid_from,
        valid_until=c.valid_until,
        first_order_only=c.first_order_only,
        per_user_limit=c.per_user_limit,
        total_limit=c.total_limit,
        user_is_first_order=bool(row.first),
        user_redemptions=int(row.mine),
        total_redemptions=int(row.everyone),
    )


async def load_context(
    session: AsyncSession,
    state: CartState,
    *,
    address_id: uuid.UUID | None = None,
    extra_products: tuple[uuid.UUID, ...] = (),
    coupon_code: str | None = None,
) -> CartContext:
    """Read what one cart operation needs. `address_id` re-binds strictly (PUT address);
    otherwise the cart's own address binds leniently and a missing store is reported, not
    raised, so the cart can still be read."""
    binding: Binding | None = None
    issue: AppError | None = None
    if address_id is not None:
        binding = await bind_store(session, state.user_id, address_id, strict=True)
    else:
        try:
            binding = await bind_store(session, state.user_id, state.address_id, strict=False)
        except AppError as exc:
            issue = exc
    ids = list(dict.fromkeys([line.product_id for line in state.lines] + list(extra_products)))
    products = await product_facts(session, binding.store.id if binding else None, ids)
    code = coupon_code or state.coupon_code
    coupon = await coupon_facts(session, code, state.user_id) if code else None
    return CartContext(binding=binding, store_issue=issue, products=products, coupon=coupon)


# ---------------------------------------------------------------- rules: validate and view


def _require_store(ctx: CartContext) -> Binding:
    if ctx.binding is None:
        assert ctx.store_issue is not None
        raise ctx.store_issue
    return ctx.binding


def _check_sellable(ctx: CartContext, product_id: uuid.UUID, quantity: int, settings: Settings) -> None:
    if quantity > settings.cart_max_quantity_per_item:
        raise Unprocessable(
            f"At most {settings.cart_max_quantity_per_item} of one item per order",
            code="quantity_limit",
            extra={"max_quantity": settings.cart_max_quantity_per_item},
        )
    _require_store(ctx)
    facts = ctx.products.get(product_id)
    if facts is None:
        raise NotFound("No such product", code="product_not_found")
    if not facts.is_active:
        raise Conflict("This product is no longer sold", code="product_inactive")
    if quantity > facts.available:
        raise Conflict(
            f"Only {facts.available} available at your store",
            code="insufficient_stock",
            extra={"product_id": str(product_id), "available_quantity": facts.available},
        )


def add_item(
    state: CartState, ctx: CartContext, body: AddItem, settings: Settings, now: datetime
) -> CartState:
    """Add `quantity` to the product's line (creating it), within the per-item and distinct-item
    bounds and what the store can sell."""
    existing = state.line(body.product_id)
    if existing is None and len(state.lines) >= settings.cart_max_distinct_items:
        raise Conflict(
            f"A cart holds at most {settings.cart_max_distinct_items} different items",
            code="cart_full",
            extra={"max_distinct_items": settings.cart_max_distinct_items},
        )
    quantity = body.quantity + (existing.quantity if existing else 0)
    _check_sellable(ctx, body.product_id, quantity, settings)
    lines = [
        line.model_copy(update={"quantity": quantity}) if line.product_id == body.product_id else line
        for line in state.lines
    ]
    if existing is None:
        lines.append(CartLine(product_id=body.product_id, quantity=quantity, added_at=now))
    return state.model_copy(update={"lines": lines, "updated_at": now})


def _missing_item() -> NotFound:
    return NotFound("This product is not in the cart", code="item_not_in_cart")


def set_quantity(
    state: CartState,
    ctx: CartContext,
    product_id: uuid.UUID,
    body: SetQuantity,
    settings: Settings,
    now: datetime,
) -> CartState:
    if state.line(product_id) is None:
        raise _missing_item()
    _check_sellable(ctx, product_id, body.quantity, settings)
    lines = [
        line.model_copy(update={"quantity": body.quantity}) if line.product_id == product_id else line
        for line in state.lines
    ]
    return state.model_copy(update={"lines": lines, "updated_at": now})


def remove_item(state: CartState, product_id: uuid.UUID, now: datetime) -> CartState:
    if state.line(product_id) is None:
        raise _missing_item()
    lines = [line for line in state.lines if line.product_id != product_id]
    return state.model_copy(update={"lines": lines, "updated_at": now})


def _sellable_subtotal(state: CartState, ctx: CartContext) -> int:
    total = 0
    for line in state.lines:
        facts = ctx.products.get(line.product_id)
        if ctx.binding and facts and facts.is_active and facts.available >= line.quantity:
            total += facts.price_paise * line.quantity
    return total


def apply_coupon(state: CartState, ctx: CartContext, body: ApplyCoupon, now: datetime) -> CartState:
    """Attach a coupon if it applies to the cart as it is now (replacing any other)."""
    if (error := coupon_rejection(ctx.coupon, _sellable_subtotal(state, ctx), now)) is not None:
        raise error
    return state.model_copy(update={"coupon_code": body.code, "updated_at": now})


def consume(state: CartState, ordered: CartState, now: datetime) -> CartState:
    """The cart after `ordered` (a snapshot of it) became an order."""
    if state.updated_at == ordered.updated_at:
        return state.model_copy(update={"lines": [], "coupon_code": None, "updated_at": now})
    bought = {line.product_id: line.quantity for line in ordered.lines}
    lines = [
        line.model_copy(update={"quantity": line.quantity - bought.get(line.product_id, 0)})
        for line in state.lines
        if line.quantity > bought.get(line.product_id, 0)
    ]
    coupon = None if state.coupon_code == ordered.coupon_code else state.coupon_code
    return state.model_copy(update={"lines": lines, "coupon_code": coupon, "updated_at": now})


def remove_coupon(state: CartState, now: datetime) -> CartState:
    return state.model_copy(update={"coupon_code": None, "updated_at": now})


def choose_address(state: CartState, ctx: CartContext, now: datetime) -> CartState:
    binding = _require_store(ctx)
    return state.model_copy(update={"address_id": binding.address_id, "updated_at": now})


def _line_view(line: CartLine, ctx: CartContext) -> CartLineView:
    facts = ctx.products.get(line.product_id)
    reason: str | None = None
    if ctx.binding is None:
        reason = "no_store"
    elif facts is None:
        reason = "product_not_found"
    elif not facts.is_active:
        reason = "product_inactive"
    elif facts.available == 0:
        reason = "out_of_stock"
    elif facts.available < line.quantity:
        reason = "insufficient_stock"
    return CartLineView(
        product_id=line.product_id,
        name=facts.name if facts else None,
        unit=facts.unit if facts else None,
        image=facts.image if facts else None,
        quantity=line.quantity,
        unit_price_paise=facts.price_paise if facts else 0,
        unit_mrp_paise=facts.mrp_paise if facts else 0,
        tax_rate_bp=facts.tax_rate_bp if facts else 0,
        line_total_paise=0,
        line_mrp_paise=0,
        mrp_savings_paise=0,
        coupon_discount_paise=0,
        taxable_value_paise=0,
        gst_paise=0,
        available=reason is None,
        available_quantity=facts.available if facts and ctx.binding else 0,
        unavailable_reason=reason,
    )


def build_view(state: CartState, ctx: CartContext, settings: Settings, now: datetime) -> CartView:
    """The priced cart. Lines the store cannot sell now stay in the cart, flagged, and count in
    no total; the coupon stays attached but says why it does not apply when it stops
    qualifying (e.g. the cart fell below its minimum)."""
    views = [_line_view(line, ctx) for line in state.lines]
    sellable = [v for v in views if v.available]
    inputs = [
        PriceInput(
            quantity=v.quantity,
            unit_price_paise=v.unit_price_paise,
            unit_mrp_paise=v.unit_mrp_paise,
            tax_rate_bp=v.tax_rate_bp,
        )
        for v in sellable
    ]
    subtotal = sum(i.unit_price_paise * i.quantity for i in inputs)
    coupon_view: CouponView | None = None
    terms: CouponTerms | None = None
    if state.coupon_code:
        rejection = coupon_rejection(ctx.coupon, subtotal, now)
        if rejection is None:
            assert ctx.coupon is not None
            terms = ctx.coupon.terms
        coupon_view = CouponView(
            code=state.coupon_code,
            applied=rejection is None,
            discount_paise=0,
            reason=rejection.code if rejection else None,
            message=rejection.message if rejection else None,
        )
    priced = price_cart(inputs, terms, FeeRules.from_settings(settings))
    for view, price in zip(sellable, priced.lines, strict=True):
        view.line_total_paise = price.line_total_paise
        view.line_mrp_paise = price.line_mrp_paise
        view.mrp_savings_paise = price.mrp_savings_paise
        view.coupon_discount_paise = price.coupon_discount_paise
        view.taxable_value_paise = price.taxable_value_paise
        view.gst_paise = price.gst_paise
    if coupon_view is not None:
        coupon_view.discount_paise = priced.breakdown.coupon_discount_paise
    return CartView(
        user_id=state.user_id,
        address_id=ctx.binding.address_id if ctx.binding else state.address_id,
        store=ctx.binding.store if ctx.binding else None,
        store_issue=ctx.store_issue.code if ctx.store_issue else None,
        lines=views,
        coupon=coupon_view,
        breakdown=priced.breakdown,
        item_count=sum(v.quantity for v in sellable),
        updated_at=state.updated_at,
        expires_at=state.updated_at + timedelta(days=settings.cart_ttl_days) if state.lines else None,
    )
