"""Orders: placing an order (cart -> order with stock reserved), the order lifecycle as an
explicit transition table, its append-only history, and who may see or move an order
(`get_visible`). Everything here works inside one session and only flushes; the flows that
span transactions or call the gateway (checkout, payment events, refunds, reconciliation) are
in `models.order_flows`.

Stock. `inventory.reserved` holds what orders have claimed. An order's `reservation` says
where its claim is: `held` (unpaid online order; released when `reservation_expires_at`
passes), `committed` (paid or cash on delivery; kept until the order leaves the store),
`fulfilled` (handed to the partner: on hand and reserved both drop), `released` (cancelled)
or `returned` (a failed delivery brought back: on hand grows again).
Every move of the reservation is a conditional change of the order row made under its lock,
so stock is released or consumed exactly once.

Locks are always taken in one order, so concurrent checkouts, cancellations, payments and
sweeps cannot deadlock: user -> coupon -> inventory rows (by product id) for checkout;
order -> payment -> inventory rows (by product id) for everything after it.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    UniqueConstraint,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from config.settings import Settings
from models import carts, outbox
from models.bodies import Strict
from models.carts import CartContext, CartState, CartView, StoreRef
from models.db import Base, new_id
from models.errors import Conflict, Forbidden, NotFound, Unprocessable
from models.payments import (
    Payment,
    PaymentOut,
    open_payment,
    request_refund,
)
from models.products import Coupon, CouponRedemption, Inventory, decode_time_cursor, encode_cursor
from models.users import Address, Caller, Role, User

log = logging.getLogger("vurksha.orders")

# ---------------------------------------------------------------- the state machine (pure)


class Status(enum.StrEnum):
    pending_payment = "pending_payment"
    payment_failed = "payment_failed"
    placed = "placed"
    confirmed = "confirmed"
    packed = "packed"
    out_for_delivery = "out_for_delivery"
    delivered = "delivered"
    # The partner could not hand it over (customer unreachable, refused); the bag goes back.
    delivery_failed = "delivery_failed"
    returned = "returned"  # back at the store: stock on the shelf again, paid money refunded
    cancelled = "cancelled"
    partially_refunded = "partially_refunded"
    refunded = "refunded"


S = Status
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.pending_payment: frozenset({S.placed, S.payment_failed, S.cancelled}),
    # A failed attempt is not the end: the customer may pay again on the same gateway order.
    S.payment_failed: frozenset({S.placed, S.cancelled}),
    S.placed: frozenset({S.confirmed, S.cancelled}),
    S.confirmed: frozenset({S.packed, S.cancelled}),
    S.packed: frozenset({S.out_for_delivery, S.cancelled}),
    S.out_for_delivery: frozenset({S.delivered, S.delivery_failed}),
    S.delivery_failed: frozenset({S.returned}),
    S.returned: frozenset(),
    S.delivered: frozenset({S.partially_refunded, S.refunded}),
    S.partially_refunded: frozenset({S.partially_refunded, S.refunded}),
    S.cancelled: frozenset(),
    S.refunded: frozenset(),
}

Actor = Literal["customer", "staff", "ops", "admin", "system", "gateway", "delivery"]

# Who may ask for which target status (the table above says from where).
CUSTOMER_TARGETS = frozenset({S.cancelled})
STAFF_TARGETS = frozenset({S.confirmed, S.packed, S.cancelled})
# The delivery service drives these from the partner's progress (see models.delivery); ops
# and admins may still set them by hand, as an audited override with a reason.
DELIVERY_TARGETS = frozenset({S.out_for_delivery, S.delivered, S.delivery_failed, S.returned})
OPS_TARGETS = STAFF_TARGETS | DELIVERY_TARGETS
SYSTEM_TARGETS = frozenset(Status)
ACTOR_TARGETS: dict[str, frozenset[Status]] = {
    "customer": CUSTOMER_TARGETS,
    "staff": STAFF_TARGETS,
    "ops": OPS_TARGETS,
    "admin": OPS_TARGETS,
    "delivery": DELIVERY_TARGETS,
    "system": SYSTEM_TARGETS,
    "gateway": SYSTEM_TARGETS,
}
# Reservation moves that go with a transition.
RELEASES_STOCK = frozenset({S.cancelled})
FULFILS_STOCK = frozenset({S.out_for_delivery})
COMMITS_STOCK = frozenset({S.placed})
RESTOCKS = frozenset({S.returned})
# A paid order that ends here is refunded in full.
REFUNDS_IN_FULL = frozenset({S.cancelled, S.returned})


class InvalidTransition(Conflict):
    code = "invalid_transition"


def check_transition(current: Status, target: Status, actor: str, reason: str | None = None) -> None:
    """Raise unless `actor` may move an order from `current` to `target`. Ops and admins
    moving what the delivery service drives must say why (422 `reason_required`)."""
    if target not in ACTOR_TARGETS.get(actor, frozenset()):
        raise Forbidden(f"A {actor} cannot move an order to {target}", code="forbidden_transition")
    if actor in ("ops", "admin") and target in DELIVERY_TARGETS and not reason:
        raise Unprocessable(
            f"Setting {target} by hand overrides the delivery service: give a reason",
            code="reason_required",
        )
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(
            f"An order that is {current} cannot become {target}",
            extra={"current_status": str(current), "allowed": sorted(TRANSITIONS[current])},
        )


def actor_for_role(role: str) -> Actor:
    actors: dict[str, Actor] = {Role.admin: "admin", Role.ops: "ops", Role.staff: "staff"}
    return actors.get(role, "customer")


# ---------------------------------------------------------------- tables


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s.value) for s in Status)})", name="status"),
        CheckConstraint(
            "reservation IN ('held', 'committed', 'fulfilled', 'released', 'returned')", name="reservation"
        ),
        CheckConstraint("payment_method IN ('online', 'cod')", name="payment_method"),
        CheckConstraint(
            "subtotal_paise >= 0 AND coupon_discount_paise >= 0 AND coupon_discount_paise <= subtotal_paise"
            " AND delivery_fee_paise >= 0 AND small_cart_fee_paise >= 0 AND tip_paise >= 0"
            " AND total_paise = subtotal_paise - coupon_discount_paise + delivery_fee_paise"
            " + small_cart_fee_paise + tip_paise",
            name="money",
        ),
        CheckConstraint("refunded_paise >= 0 AND refunded_paise <= total_paise", name="refunded"),
        CheckConstraint("(reservation = 'held') = (reservation_expires_at IS NOT NULL)", name="expiry"),
        # A cart snapshot becomes at most one order (two checkouts of one cart cannot both win).
        UniqueConstraint("user_id", "cart_version", name="uq_orders_user_cart_version"),
        Index("ix_orders_user_created", "user_id", "created_at", "id"),
        Index("ix_orders_store_status_created", "store_id", "status", "created_at"),
        Index(
            "ix_orders_held_expiry", "reservation_expires_at", postgresql_where=text("reservation = 'held'")
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    store_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stores.id", ondelete="RESTRICT"))
    address_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("addresses.id", ondelete="SET NULL"))
    delivery_address: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(24))
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    payment_method: Mapped[str] = mapped_column(String(8))
    currency: Mapped[str] = mapped_column(String(3), server_default="INR")
    items_mrp_paise: Mapped[int] = mapped_column(Integer)
    subtotal_paise: Mapped[int] = mapped_column(Integer)
    coupon_code: Mapped[str | None] = mapped_column(String(32))
    coupon_discount_paise: Mapped[int] = mapped_column(Integer)
    taxable_value_paise: Mapped[int] = mapped_column(Integer)
    gst_paise: Mapped[int] = mapped_column(Integer)
    delivery_fee_paise: Mapped[int] = mapped_column(Integer)
    small_cart_fee_paise: Mapped[int] = mapped_column(Integer)
    tip_paise: Mapped[int] = mapped_column(Integer)
    total_paise: Mapped[int] = mapped_column(Integer)
    refunded_paise: Mapped[int] = mapped_column(Integer, server_default="0")
    reservation: Mapped[str] = mapped_column(String(16))
    reservation_expires_at: Mapped[datetime | None]
    cart_version: Mapped[datetime]
    cancel_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    placed_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class OrderLine(Base):
    """What was bought, frozen at checkout (later price changes do not touch it)."""

    __tablename__ = "order_lines"
    __table_args__ = (CheckConstraint("quantity > 0", name="quantity"),)

    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True)
    product_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("products.id", ondelete="RESTRICT"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    unit: Mapped[str] = mapped_column(String(40))
    image: Mapped[str | None] = mapped_column(String(500))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_paise: Mapped[int] = mapped_column(Integer)
    unit_mrp_paise: Mapped[int] = mapped_column(Integer)
    tax_rate_bp: Mapped[int] = mapped_column(Integer)
    line_total_paise: Mapped[int] = mapped_column(Integer)
    coupon_discount_paise: Mapped[int] = mapped_column(Integer)
    taxable_value_paise: Mapped[int] = mapped_column(Integer)
    gst_paise: Mapped[int] = mapped_column(Integer)


class OrderEvent(Base):
    """The order's history: append-only (a trigger refuses UPDATE and DELETE)."""

    __tablename__ = "order_events"
    __table_args__ = (Index("ix_order_events_order", "order_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="RESTRICT"))
    from_status: Mapped[str | None] = mapped_column(String(24))
    to_status: Mapped[str] = mapped_column(String(24))
    actor: Mapped[str] = mapped_column(String(16))
    actor_user_id: Mapped[uuid.UUID | None]
    reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]


# ---------------------------------------------------------------- schemas

Reason = Annotated[str, Field(min_length=1, max_length=200)]


class CheckoutIn(Strict):
    address_id: uuid.UUID
    payment_method: Literal["online", "cod"]
    tip_paise: int = Field(default=0, strict=True, ge=0, description="Tip for the delivery partner")


class CancelIn(Strict):
    reason: Reason | None = None
    version: int | None = Field(
        default=None, strict=True, ge=1, description="The version you saw; 409 version_conflict if stale"
    )


class TransitionIn(Strict):
    to: Literal[
        "confirmed", "packed", "cancelled", "out_for_delivery", "delivered", "delivery_failed", "returned"
    ]
    reason: Reason | None = None
    version: int | None = Field(default=None, strict=True, ge=1)


class OrderLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    product_id: uuid.UUID
    name: str
    unit: str
    image: str | None
    quantity: int
    unit_price_paise: int
    unit_mrp_paise: int
    tax_rate_bp: int
    line_total_paise: int
    coupon_discount_paise: int
    taxable_value_paise: int
    gst_paise: int


class OrderEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_status: str | None
    to_status: str
    actor: str
    reason: str | None
    created_at: datetime


class OrderTotals(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    currency: str
    items_mrp_paise: int
    subtotal_paise: int
    coupon_discount_paise: int
    taxable_value_paise: int
    gst_paise: int
    delivery_fee_paise: int
    small_cart_fee_paise: int
    tip_paise: int
    total_paise: int
    refunded_paise: int


class OrderSummary(BaseModel):
    id: uuid.UUID
    status: str
    version: int
    store_id: uuid.UUID
    payment_method: str
    total_paise: int
    item_count: int
    created_at: datetime


class OrderOut(BaseModel):
    id: uuid.UUID
    status: str
    version: int
    store: StoreRef
    delivery_address: dict[str, Any]
    payment_method: str
    coupon_code: str | None
    lines: list[OrderLineOut]
    totals: OrderTotals
    payment: PaymentOut | None
    razorpay_key_id: str | None = Field(description="The gateway key the checkout SDK needs (online)")
    reservation_expires_at: datetime | None = Field(description="Pay before this or the order is cancelled")
    cancel_reason: str | None
    created_at: datetime
    updated_at: datetime
    placed_at: datetime | None
    delivered_at: datetime | None
    cancelled_at: datetime | None
    events: list[OrderEventOut]


class OrderPage(BaseModel):
    items: list[OrderSummary]
    next_cursor: str | None


# ---------------------------------------------------------------- history and transitions


async def _record(
    session: AsyncSession,
    order: Order,
    previous: str | None,
    actor: str,
    actor_user_id: uuid.UUID | None,
    reason: str | None,
    now: datetime,
) -> None:
    session.add(
        OrderEvent(
            order_id=order.id,
            from_status=previous,
            to_status=order.status,
            actor=actor,
            actor_user_id=actor_user_id,
            reason=reason,
            created_at=now,
        )
    )
    await outbox.emit(
        session,
        f"order.{order.status}",
        order.id,
        {
            "order_id": str(order.id),
            "user_id": str(order.user_id),
            "store_id": str(order.store_id),
            "from": previous,
            "status": order.status,
            "version": order.version,
            "actor": actor,
            "reason": reason,
        },
    )


async def lock_order(session: AsyncSession, order_id: uuid.UUID) -> Order | None:
    return (await session.scalars(select(Order).where(Order.id == order_id).with_for_update())).one_or_none()


async def _lines(session: AsyncSession, order_id: uuid.UUID) -> Sequence[OrderLine]:
    return (
        await session.scalars(
            select(OrderLine).where(OrderLine.order_id == order_id).order_by(OrderLine.product_id)
        )
    ).all()


async def _move_stock(session: AsyncSession, order: Order, *, consume: bool) -> None:
    """Drop the order's reservation: given back to the shelf, or (`consume`) taken off it
    too. Row by row in product order (the global lock order)."""
    for line in await _lines(session, order.id):
        values: dict[str, Any] = {"reserved": Inventory.reserved - line.quantity}
        if consume:
            values["on_hand"] = Inventory.on_hand - line.quantity
        await session.execute(
            update(Inventory)
            .where(Inventory.store_id == order.store_id, Inventory.product_id == line.product_id)
            .values(**values)
        )


async def _restock(session: AsyncSession, order: Order) -> None:
    """A returned bag's goods go back on the shelf (their reservation ended at pickup)."""
    for line in await _lines(session, order.id):
        await session.execute(
            update(Inventory)
            .where(Inventory.store_id == order.store_id, Inventory.product_id == line.product_id)
            .values(on_hand=Inventory.on_hand + line.quantity)
        )


async def _mark_first_order(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> None:
    """The user's first placed order ends their first-order coupons."""
    await session.execute(
        update(User).where(User.id == user_id, User.first_order_at.is_(None)).values(first_order_at=now)
    )


async def transition(
    session: AsyncSession,
    order: Order,
    target: Status,
    *,
    actor: str,
    actor_user_id: uuid.UUID | None = None,
    reason: str | None = None,
    expected_version: int | None = None,
    now: datetime,
) -> Order:
    """Move a locked order to `target` if the table and the actor allow it, with what goes
    with it: the reservation, timestamps, the history row and the domain event."""
    if expected_version is not None and expected_version != order.version:
        raise Conflict(
            "The order changed since you read it",
            code="version_conflict",
            extra={"current_version": order.version, "current_status": order.status},
        )
    previous = Status(order.status)
    check_transition(previous, target, actor, reason)
    if target in RELEASES_STOCK and order.reservation in ("held", "committed"):
        await _move_stock(session, order, consume=False)
        order.reservation = "released"
        order.reservation_expires_at = None
        # A cancelled order gives its coupon use back.
        await session.execute(delete(CouponRedemption).where(CouponRedemption.order_id == order.id))
    if target in FULFILS_STOCK and order.reservation == "committed":
        await _move_stock(session, order, consume=True)
        order.reservation = "fulfilled"
    if target in RESTOCKS and order.reservation == "fulfilled":
        await _restock(session, order)
        order.reservation = "returned"
    if target in COMMITS_STOCK and order.reservation == "held":
        order.reservation = "committed"
        order.reservation_expires_at = None
    if target == S.placed:
        order.placed_at = now
        await _mark_first_order(session, order.user_id, now)
    elif target == S.delivered:
        order.delivered_at = now
    elif target in (S.cancelled, S.delivery_failed):
        order.cancelled_at = now
        order.cancel_reason = reason
    order.status = target
    order.version += 1
    order.updated_at = now
    await _record(session, order, previous, actor, actor_user_id, reason, now)
    await session.flush()
    return order


async def change_status(
    session: AsyncSession,
    order: Order,
    target: Status,
    *,
    actor: str,
    actor_user_id: uuid.UUID | None,
    reason: str | None,
    expected_version: int | None = None,
    now: datetime,
) -> Order:
    """Move a locked order (see `transition`). An order that ends cancelled or returned has
    whatever was captured refunded in full, once: the refund's key is the ending."""
    await transition(
        session,
        order,
        target,
        actor=actor,
        actor_user_id=actor_user_id,
        reason=reason,
        expected_version=expected_version,
        now=now,
    )
    if target not in REFUNDS_IN_FULL:
        return order
    payment = await lock_payment(session, order.id)
    if payment is not None and payment.captured_paise > payment.refund_reserved_paise:
        await request_refund(
            session,
            payment,
            amount_paise=None,
            reason=f"order {target}: {reason or actor}"[:200],
            idempotency_key=f"order-{target}",
            requested_by=actor_user_id,
        )
    return order


async def lock_payment(session: AsyncSession, order_id: uuid.UUID) -> Payment | None:
    return (
        await session.scalars(select(Payment).where(Payment.order_id == order_id).with_for_update())
    ).one_or_none()


# ---------------------------------------------------------------- checkout


class InsufficientStock(Conflict):
    code = "insufficient_stock"


def _snapshot(address: Address) -> dict[str, Any]:
    return {
        "label": address.label,
        "line1": address.line1,
        "line2": address.line2,
        "landmark": address.landmark,
        "city": address.city,
        "pincode": address.pincode,
        "lat": address.lat,
        "lng": address.lng,
    }


def _unsellable(view: CartView) -> list[dict[str, Any]]:
    return [
        {
            "product_id": str(line.product_id),
            "requested": line.quantity,
            "available_quantity": line.available_quantity,
            "reason": line.unavailable_reason,
        }
        for line in view.lines
        if not line.available
    ]


async def place_order(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    cart: CartState,
    body: CheckoutIn,
    settings: Settings,
    now: datetime,
) -> Order:
    """Turn the cart snapshot into an order in the caller's transaction: prices, tax,
    discount and fees recomputed here (never taken from the client), every line's stock
    reserved or none, the coupon use counted under the coupon's row lock. Online orders wait
    for payment holding their stock until `reservation_ttl_seconds`; cash-on-delivery orders
    are placed at once."""
    if body.tip_paise > settings.max_tip_paise:
        raise Unprocessable(
            f"A tip can be at most {settings.max_tip_paise} paise",
            code="tip_too_large",
            extra={"max_tip_paise": settings.max_tip_paise},
        )
    if not cart.lines:
        raise Conflict("The cart is empty", code="cart_empty")
    # Serialises one user's checkouts (NO KEY UPDATE: logins inserting sessions are not blocked).
    await session.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))
    if (
        await session.scalar(
            select(Order.id).where(Order.user_id == user_id, Order.cart_version == cart.updated_at)
        )
    ) is not None:
        raise Conflict("This cart has already been ordered", code="cart_already_ordered")
    binding = await carts.bind_store(session, user_id, body.address_id, strict=True)
    address = await session.get_one(Address, body.address_id)
    if cart.coupon_code:
        # Serialises checkouts using this coupon, so usage limits are counted exactly.
        await session.execute(select(Coupon.code).where(Coupon.code == cart.coupon_code).with_for_update())
    product_ids = sorted({line.product_id for line in cart.lines})
    await session.execute(
        select(Inventory.product_id)
        .where(Inventory.store_id == binding.store.id, Inventory.product_id.in_(product_ids))
        .order_by(Inventory.product_id)
        .with_for_update()
    )
    ctx = CartContext(
        binding=binding,
        store_issue=None,
        products=await carts.product_facts(session, binding.store.id, product_ids),
        coupon=await carts.coupon_facts(session, cart.coupon_code, user_id) if cart.coupon_code else None,
    )
    view = carts.build_view(cart, ctx, settings, now)
    if problems := _unsellable(view):
        raise InsufficientStock(
            "Some items cannot be sold in these quantities now", extra={"lines": problems}
        )
    if view.coupon is not None and not view.coupon.applied:
        raise Unprocessable(
            view.coupon.message or "The coupon no longer applies",
            code=view.coupon.reason or "coupon_not_applicable",
        )
    # The conditional decrement is the guarantee; the locks above make it never fail here.
    reserved = await session.execute(
        text(
            """
            UPDATE inventory i SET reserved = i.reserved + v.quantity, updated_at = now()
            FROM (SELECT unnest(CAST(:ids AS uuid[])) AS product_id,
                         unnest(CAST(:quantities AS int[])) AS quantity) v
            WHERE i.store_id = :store AND i.product_id = v.product_id
              AND i.on_hand - i.reserved >= v.quantity
            """
        ),
        {
            "ids": [line.product_id for line in view.lines],
            "quantities": [line.quantity for line in view.lines],
            "store": binding.store.id,
        },
    )
    if reserved.rowcount != len(view.lines):  # type: ignore[attr-defined]
        raise InsufficientStock("Some items just sold out")
    b = view.breakdown
    online = body.payment_method == "online"
    order = Order(
        id=new_id(),
        user_id=user_id,
        store_id=binding.store.id,
        address_id=address.id,
        delivery_address=_snapshot(address),
        status=S.pending_payment if online else S.placed,
        version=1,
        payment_method=body.payment_method,
        items_mrp_paise=b.items_mrp_paise,
        subtotal_paise=b.subtotal_paise,
        coupon_code=cart.coupon_code if view.coupon else None,
        coupon_discount_paise=b.coupon_discount_paise,
        taxable_value_paise=b.taxable_value_paise,
        gst_paise=b.gst_paise,
        delivery_fee_paise=b.delivery_fee_paise,
        small_cart_fee_paise=b.small_cart_fee_paise,
        tip_paise=body.tip_paise,
        total_paise=b.total_paise + body.tip_paise,
        reservation="held" if online else "committed",
        reservation_expires_at=now + timedelta(seconds=settings.reservation_ttl_seconds) if online else None,
        cart_version=cart.updated_at,
        created_at=now,
        updated_at=now,
        placed_at=None if online else now,
    )
    session.add(order)
    session.add_all(
        OrderLine(
            order_id=order.id,
            product_id=line.product_id,
            position=i,
            name=line.name or "",
            unit=line.unit or "",
            image=line.image,
            quantity=line.quantity,
            unit_price_paise=line.unit_price_paise,
            unit_mrp_paise=line.unit_mrp_paise,
            tax_rate_bp=line.tax_rate_bp,
            line_total_paise=line.line_total_paise,
            coupon_discount_paise=line.coupon_discount_paise,
            taxable_value_paise=line.taxable_value_paise,
            gst_paise=line.gst_paise,
        )
        for i, line in enumerate(view.lines)
    )
    session.add(open_payment(order.id, body.payment_method, order.total_paise))
    if order.coupon_code:
        session.add(CouponRedemption(coupon_code=order.coupon_code, user_id=user_id, order_id=order.id))
    if not online:
        await _mark_first_order(session, user_id, now)
    await session.flush()
    await _record(session, order, None, "customer", user_id, None, now)
    await session.flush()
    return order


# ---------------------------------------------------------------- reads


async def order_out(session: AsyncSession, order: Order, settings: Settings) -> OrderOut:
    store = (
        await session.execute(
            text("SELECT id, code, name FROM stores WHERE id = :id"), {"id": order.store_id}
        )
    ).one()
    lines = (
        await session.scalars(
            select(OrderLine).where(OrderLine.order_id == order.id).order_by(OrderLine.position)
        )
    ).all()
    events = (
        await session.scalars(
            select(OrderEvent).where(OrderEvent.order_id == order.id).order_by(OrderEvent.id)
        )
    ).all()
    payment = (await session.scalars(select(Payment).where(Payment.order_id == order.id))).one_or_none()
    return OrderOut(
        id=order.id,
        status=order.status,
        version=order.version,
        store=StoreRef(id=store.id, code=store.code, name=store.name),
        delivery_address=order.delivery_address,
        payment_method=order.payment_method,
        coupon_code=order.coupon_code,
        lines=[OrderLineOut.model_validate(line) for line in lines],
        totals=OrderTotals.model_validate(order),
        payment=PaymentOut.model_validate(payment) if payment else None,
        razorpay_key_id=settings.razorpay_key_id if order.payment_method == "online" else None,
        reservation_expires_at=order.reservation_expires_at,
        cancel_reason=order.cancel_reason,
        created_at=order.created_at,
        updated_at=order.updated_at,
        placed_at=order.placed_at,
        delivered_at=order.delivered_at,
        cancelled_at=order.cancelled_at,
        events=[OrderEventOut.model_validate(e) for e in events],
    )


async def get_visible(
    session: AsyncSession,
    order_id: uuid.UUID,
    user: Caller,
    *,
    to: Literal["see", "own", "move"] = "see",
    lock: bool = False,
) -> Order:
    """The order, if this user may do `to` with it; the one place that decides it.
    - see: its customer, staff of its store, ops and admins;
    - own (cancel it, track it): its customer only;
    - move it along (as the store): staff of its store, ops and admins; 403 `forbidden_role`
      for anyone else who may see it.
    Anyone who may not see it (or own it, for `own`) gets the same 404 as for a missing order."""
    stmt = select(Order).where(Order.id == order_id)
    if lock:
        stmt = stmt.with_for_update()
    order = (await session.scalars(stmt)).one_or_none()
    if order is None or not can_see(order, user) or (to == "own" and order.user_id != user.id):
        raise order_not_found()
    if to == "move":
        if actor_for_role(user.role) == "customer":
            raise staff_only()
        user_store_scope(user, order.store_id)
    return order


def order_not_found() -> NotFound:
    return NotFound("No such order", code="order_not_found")


def staff_only() -> Forbidden:
    return Forbidden("Only store staff, ops and admins move orders along", code="forbidden_role")


def can_see(order: Order, user: Caller) -> bool:
    return order.user_id == user.id or works_for(user, order.store_id)


def works_for(user: Caller, store_id: uuid.UUID) -> bool:
    """Staff work for their own store; ops and admins for every store."""
    return user.role in (Role.admin, Role.ops) or (user.role == Role.staff and user.store_id == store_id)


async def list_orders(
    session: AsyncSession,
    *,
    user_id: uuid.UUID | None = None,
    store_id: uuid.UUID | None = None,
    status: str | None = None,
    cursor: str | None,
    limit: int,
) -> OrderPage:
    """Newest first, keyset-paged on (created_at, id)."""
    count = (
        select(func.coalesce(func.sum(OrderLine.quantity), 0))
        .where(OrderLine.order_id == Order.id)
        .scalar_subquery()
    )
    stmt = (
        select(Order, count.label("items"))
        .order_by(Order.created_at.desc(), Order.id.desc())
        .limit(limit + 1)
    )
    if user_id is not None:
        stmt = stmt.where(Order.user_id == user_id)
    if store_id is not None:
        stmt = stmt.where(Order.store_id == store_id)
    if status is not None:
        stmt = stmt.where(Order.status == status)
    if cursor:
        created, oid = decode_time_cursor(cursor)
        stmt = stmt.where(tuple_(Order.created_at, Order.id) < tuple_(created, oid))
    rows = (await session.execute(stmt)).all()
    items = [
        OrderSummary(
            id=o.id,
            status=o.status,
            version=o.version,
            store_id=o.store_id,
            payment_method=o.payment_method,
            total_paise=o.total_paise,
            item_count=int(n),
            created_at=o.created_at,
        )
        for o, n in rows[:limit]
    ]
    last = rows[limit - 1][0] if len(rows) > limit else None
    return OrderPage(
        items=items, next_cursor=encode_cursor(last.created_at.isoformat(), last.id) if last else None
    )


# ---------------------------------------------------------------- sweeping


async def expired_reservations(session: AsyncSession, now: datetime, limit: int = 100) -> list[uuid.UUID]:
    return list(
        (
            await session.scalars(
                select(Order.id)
                .where(Order.reservation == "held", Order.reservation_expires_at <= now)
                .order_by(Order.reservation_expires_at)
                .limit(limit)
            )
        ).all()
    )


async def expire_reservation(session: AsyncSession, order_id: uuid.UUID, now: datetime) -> bool:
    """Cancel an unpaid order whose reservation ran out, releasing its stock. Skips an order
    another transaction holds (it is being paid or cancelled right now)."""
    order = (
        await session.scalars(select(Order).where(Order.id == order_id).with_for_update(skip_locked=True))
    ).one_or_none()
    if order is None or order.reservation != "held" or order.reservation_expires_at is None:
        return False
    if order.reservation_expires_at > now:
        return False
    await change_status(
        session,
        order,
        S.cancelled,
        actor="system",
        actor_user_id=None,
        reason="payment not received in time",
        now=now,
    )
    return True


def user_store_scope(user: Caller, store_id: uuid.UUID) -> None:
    if not works_for(user, store_id):
        raise Forbidden("You are not allowed to act for this store", code="forbidden_role")
