"""Delivery: partners, offers, deliveries and cash, as rows with the constraints that keep
dispatch honest, and the single-session operations on them. The pure rules (shift and
delivery transition tables, GPS filter, ETA, assignment rounds) are in `delivery_rules`; the
live view (positions, queues, rounds) is held by the fleet shard actors (`actors/fleet.py`),
which rebuild it from these rows after a restart.

What PostgreSQL guarantees, whatever the actors do:
- one open offer per partner (`uq_delivery_offers_open_partner`);
- one active delivery per order (`uq_deliveries_active_order`): two partners accepting
  offers that share an order cannot both get it, and an order is never carried twice;
- a partner's cash in hand never goes negative, each delivery's cash is collected once, and a
  deposit is recorded once per idempotency key.

Locks, always in this order: offer -> delivery -> order -> payment -> inventory rows.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Exists,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Select,
    SmallInteger,
    String,
    Uuid,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from models import orders, outbox
from models.bodies import Strict
from models.db import Base, new_id, note_auth_change
from models.delivery_rules import (
    ACTIVE_DELIVERY,
    ActiveDelivery,
    DeliveryActor,
    DeliveryStatus,
    RoutePlanner,
    TripRoute,
    Vehicle,
    check_delivery_transition,
)
from models.errors import AppError, Conflict, Forbidden, NotFound, Unprocessable
from models.orders import Order
from models.payments import Payment, PaymentStatus
from models.products import get_store
from models.users import Caller, Phone, Role, User

D = DeliveryStatus
OFFER_STATUSES = ("open", "accepted", "declined", "expired", "recalled")
ROUTE_PLANNERS = get_args(RoutePlanner)
ACTIVE_SQL = "status IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(ACTIVE_DELIVERY)))
# A wrong PIN this many times locks the handover: ops take over (a guessed PIN is a stolen bag).
MAX_PIN_ATTEMPTS = 5
# Orders the store hands to partners: confirmed (being packed) or packed, not yet on a trip.
DISPATCHABLE = (orders.Status.confirmed, orders.Status.packed)
# The order status a delivery status moves its order to, through the order rules.
ORDER_STATUS_AFTER = {
    D.picked_up: orders.Status.out_for_delivery,
    D.delivered: orders.Status.delivered,
    D.failed: orders.Status.delivery_failed,
    D.returned: orders.Status.returned,
}

# ---------------------------------------------------------------- tables


class Partner(Base):
    """A delivery partner: a user with role `partner`, attached to one store."""

    __tablename__ = "partners"
    __table_args__ = (
        CheckConstraint(f"vehicle IN ({', '.join(repr(v.value) for v in Vehicle)})", name="vehicle"),
        CheckConstraint("cash_in_hand_paise >= 0", name="cash"),
        Index("ix_partners_store", "store_id"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    store_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stores.id", ondelete="RESTRICT"))
    vehicle: Mapped[str] = mapped_column(String(16))
    # What the partner asked for; offered and assigned follow from offers and deliveries.
    online: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    expiries_in_a_row: Mapped[int] = mapped_column(Integer, server_default="0")
    suspended_at: Mapped[datetime | None]
    cash_in_hand_paise: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class DeliveryOffer(Base):
    """A trip (one or more orders, in drop order) offered to one partner until `expires_at`."""

    __tablename__ = "delivery_offers"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in OFFER_STATUSES)})", name="status"),
        CheckConstraint("cardinality(order_ids) >= 1", name="orders"),
        CheckConstraint(
            f"route_planner IN ({', '.join(repr(p) for p in ROUTE_PLANNERS)})", name="route_planner"
        ),
        Index(
            "uq_delivery_offers_open_partner",
            "partner_id",
            unique=True,
            postgresql_where=text("status = 'open'"),
        ),
        Index("ix_delivery_offers_store_status", "store_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    store_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stores.id", ondelete="RESTRICT"))
    partner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("partners.user_id", ondelete="RESTRICT"))
    order_ids: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(Uuid()))
    status: Mapped[str] = mapped_column(String(16), server_default="open")
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    answered_at: Mapped[datetime | None]
    # The trip's planned route (models.delivery_rules.TripRoute): seconds from `created_at`
    # until each order (same order as `order_ids`) is handed over, who ordered the drops, and
    # why the route optimizer's order was not used, if it was not.
    planned_eta_s: Mapped[list[int]] = mapped_column(ARRAY(Integer), server_default="{}")
    route_planner: Mapped[str] = mapped_column(String(24), server_default="direct")
    route_fallback: Mapped[str | None] = mapped_column(String(32))


class Delivery(Base):
    """One order carried by one partner, from acceptance to its end."""

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s.value) for s in D)})", name="status"),
        CheckConstraint("pin ~ '^[0-9]{4}$'", name="pin"),
        CheckConstraint("cash_collected_paise IS NULL OR cash_collected_paise > 0", name="cash"),
        Index("uq_deliveries_active_order", "order_id", unique=True, postgresql_where=text(ACTIVE_SQL)),
        Index("ix_deliveries_partner_status", "partner_id", "status"),
        Index("ix_deliveries_store_status", "store_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="RESTRICT"))
    offer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("delivery_offers.id", ondelete="RESTRICT"))
    partner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("partners.user_id", ondelete="RESTRICT"))
    store_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("stores.id", ondelete="RESTRICT"))
    seq: Mapped[int] = mapped_column(SmallInteger)  # place in the trip's drop order
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    pin: Mapped[str] = mapped_column(String(4))
    pin_attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    cash_collected_paise: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    picked_up_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]


# The rule of `uq_deliveries_active_order`, as an expression for queries.
ACTIVE = Delivery.status.in_(sorted(ACTIVE_DELIVERY))


# Whether the order of the enclosing query (`orders`) is with a partner now.
ORDER_CARRIED = select(Delivery.id).where(Delivery.order_id == Order.id, ACTIVE).exists()


def carrying(partner_id: uuid.UUID) -> Exists:
    """Whether the partner has an active delivery."""
    return select(Delivery.id).where(Delivery.partner_id == partner_id, ACTIVE).exists()


class DeliveryEvent(Base):
    """A delivery's history: append-only (the same trigger as the orders' history)."""

    __tablename__ = "delivery_events"
    __table_args__ = (Index("ix_delivery_events_delivery", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deliveries.id", ondelete="RESTRICT"))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(16))
    actor_user_id: Mapped[uuid.UUID | None]
    reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]


class CashEntry(Base):
    """The partner's cash-in-hand ledger: collected on COD deliveries, deposited with ops."""

    __tablename__ = "partner_cash_entries"
    __table_args__ = (
        CheckConstraint("kind IN ('collected', 'deposit')", name="kind"),
        CheckConstraint("amount_paise > 0", name="amount"),
        CheckConstraint("(kind = 'collected') = (delivery_id IS NOT NULL)", name="source"),
        Index("uq_partner_cash_entries_delivery", "delivery_id", unique=True),
        Index("uq_partner_cash_entries_key", "partner_id", "idempotency_key", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    partner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("partners.user_id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))
    amount_paise: Mapped[int] = mapped_column(Integer)
    delivery_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deliveries.id", ondelete="RESTRICT"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    recorded_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime]


# ---------------------------------------------------------------- schemas


Reason = Annotated[str, Field(min_length=1, max_length=200)]


class PartnerIn(Strict):
    """Attach a user (by phone; created if new, they log in by OTP) to a store as a partner."""

    phone: Phone
    store_id: uuid.UUID
    vehicle: Vehicle = Vehicle.scooter


class PartnerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    user_id: uuid.UUID
    store_id: uuid.UUID
    vehicle: Vehicle
    online: bool
    suspended: bool
    cash_in_hand_paise: int


class ShiftIn(Strict):
    online: bool = Field(strict=True)


# (lat, lng, ts_s, accuracy_m, speed_mps, heading_deg, battery_pct): a fix as it travels.
PositionRow = tuple[float, float, float, float | None, float | None, float | None, float | None]


class PositionIn(Strict):
    """One GPS fix as the partner's phone reports it (`ts`: device time, seconds since the
    epoch). Numbers must be JSON numbers; the ingest filter judges the values."""

    lat: float = Field(strict=True)
    lng: float = Field(strict=True)
    ts: float = Field(strict=True)
    accuracy_m: float | None = Field(default=None, strict=True)
    speed_mps: float | None = Field(default=None, strict=True)
    heading: float | None = Field(default=None, strict=True)
    battery: float | None = Field(default=None, strict=True)

    def row(self) -> PositionRow:
        return (self.lat, self.lng, self.ts, self.accuracy_m, self.speed_mps, self.heading, self.battery)


class PositionsIn(Strict):
    points: list[PositionIn] = Field(min_length=1, max_length=100)

    def rows(self) -> list[PositionRow]:
        return [p.row() for p in self.points]


class DepositIn(Strict):
    amount_paise: int = Field(strict=True, gt=0, le=10_000_000)


class StatusIn(Strict):
    """Move a delivery: `at_store`, `picked_up`, `arrived`, `delivered` (with the customer's
    `pin`, and `cash_collected_paise` for cash on delivery), `failed` (with a `reason`)."""

    to: Literal["at_store", "picked_up", "arrived", "delivered", "failed", "returned", "cancelled"]
    pin: Annotated[str, Field(pattern=r"^[0-9]{4}$")] | None = None
    cash_collected_paise: int | None = Field(default=None, strict=True, gt=0)
    reason: Reason | None = None
    version: int | None = Field(default=None, strict=True, ge=1)


class DeliveryOut(BaseModel):
    id: uuid.UUID
    order_id: uuid.UUID
    partner_id: uuid.UUID
    seq: int
    status: DeliveryStatus
    version: int
    order_status: orders.Status
    payment_method: str
    amount_due_paise: int  # cash to collect (0 for a paid order)
    drop: dict[str, object]  # the delivery address as checkout froze it
    customer_name: str | None


class OfferOut(BaseModel):
    id: uuid.UUID
    store_id: uuid.UUID
    order_ids: list[uuid.UUID]  # in drop order
    status: str
    expires_at: datetime
    created_at: datetime
    # Seconds from `created_at` until each order is handed over, along the planned route.
    planned_eta_s: list[int]
    route_planner: RoutePlanner
    route_fallback: str | None  # why not the optimizer's order (optimizer_late, _unavailable, ...)


# ---------------------------------------------------------------- errors


class PartnerNotFound(NotFound):
    code = "partner_not_found"


class NotAPartner(Forbidden):
    code = "not_a_partner"


class PartnerSuspended(Forbidden):
    code = "partner_suspended"


class OfferNotFound(NotFound):
    code = "offer_not_found"


class OfferClosed(Conflict):
    code = "offer_closed"


class OrderTaken(Conflict):
    code = "order_taken"


class DeliveryNotFound(NotFound):
    code = "delivery_not_found"


class WrongPin(Unprocessable):
    code = "wrong_pin"


class PinLocked(Conflict):
    code = "pin_locked"


class CashMismatch(Unprocessable):
    code = "cash_mismatch"


# ---------------------------------------------------------------- partners


async def attach_partner(session: AsyncSession, data: PartnerIn, now: datetime) -> Partner:
    """Make the user with `data.phone` (created if new) a partner of `data.store_id`: role partner,
    a partners row (store and vehicle updated if it exists). Admins and ops are refused (a
    demotion goes through the roles API)."""
    await get_store(session, data.store_id)
    user = await session.scalar(select(User).where(User.phone == data.phone).with_for_update())
    if user is None:
        user = User(phone=data.phone)
        session.add(user)
        await session.flush()
    if user.role not in (Role.customer, Role.partner):
        raise Conflict(f"This user is {user.role}: change their role first", code="role_conflict")
    if user.role != Role.partner:
        user.role = Role.partner
        note_auth_change(session, user.id)
    partner = await session.get(Partner, user.id, with_for_update=True)
    if partner is None:
        partner = Partner(
            user_id=user.id, store_id=data.store_id, vehicle=data.vehicle, created_at=now, updated_at=now
        )
        session.add(partner)
    else:
        if partner.store_id != data.store_id and await _busy(session, partner.user_id):
            raise Conflict("The partner is on a trip or holds an offer", code="partner_busy")
        partner.store_id, partner.vehicle, partner.updated_at = data.store_id, data.vehicle, now
    await session.flush()
    return partner


async def partner_for(session: AsyncSession, user: Caller, *, lock: bool = False) -> Partner:
    """The caller's partner row: 403 unless they are a partner, attached and not suspended."""
    if user.role != Role.partner:
        raise NotAPartner("Only delivery partners can do this")
    partner = await session.get(Partner, user.id, with_for_update=lock)
    if partner is None:
        raise NotAPartner("You are not attached to a store yet: ask ops")
    if partner.suspended_at is not None:
        raise PartnerSuspended("Your account is suspended: contact ops")
    return partner


async def get_partner(session: AsyncSession, user_id: uuid.UUID, *, lock: bool = False) -> Partner:
    partner = await session.get(Partner, user_id, with_for_update=lock)
    if partner is None:
        raise PartnerNotFound("No such partner")
    return partner


async def store_partners(session: AsyncSession, store_id: uuid.UUID) -> list[Partner]:
    return list(
        await session.scalars(
            select(Partner).where(Partner.store_id == store_id).order_by(Partner.created_at)
        )
    )


async def store_of_delivery(session: AsyncSession, delivery_id: uuid.UUID) -> uuid.UUID:
    store_id = await session.scalar(select(Delivery.store_id).where(Delivery.id == delivery_id))
    if store_id is None:
        raise DeliveryNotFound("No such delivery")
    return store_id


def partner_out(partner: Partner) -> PartnerOut:
    return PartnerOut(
        user_id=partner.user_id,
        store_id=partner.store_id,
        vehicle=Vehicle(partner.vehicle),
        online=partner.online,
        suspended=partner.suspended_at is not None,
        cash_in_hand_paise=partner.cash_in_hand_paise,
    )


async def _busy(session: AsyncSession, partner_id: uuid.UUID) -> bool:
    """Whether the partner holds an open offer or an active delivery."""
    offer = select(DeliveryOffer.id).where(
        DeliveryOffer.partner_id == partner_id, DeliveryOffer.status == "open"
    )
    return bool(await session.scalar(select(offer.exists() | carrying(partner_id))))


async def set_online(session: AsyncSession, partner: Partner, online: bool, now: datetime) -> Partner:
    """Go online or offline (a locked row). Offline is refused with an active delivery (409
    `active_delivery`); an open offer is recalled by the caller (the fleet shard)."""
    if not online and await session.scalar(select(carrying(partner.user_id))):
        raise ActiveDelivery("A partner with an active delivery cannot go offline")
    partner.online = online
    if online:
        partner.expiries_in_a_row = 0
    partner.updated_at = now
    await session.flush()
    return partner


async def set_suspended(session: AsyncSession, partner: Partner, suspended: bool, now: datetime) -> Partner:
    """Suspend (offline at once; the shard recalls the open offer and closes the sockets) or
    reinstate a locked partner row. Active deliveries are left to ops to reassign or finish."""
    partner.suspended_at = now if suspended else None
    if suspended:
        partner.online = False
    partner.updated_at = now
    await session.flush()
    return partner


async def record_deposit(
    session: AsyncSession, partner_id: uuid.UUID, amount_paise: int, key: str, by: uuid.UUID, now: datetime
) -> Partner:
    """Ops record cash handed in by the partner: the cash in hand drops by it, never below
    zero (409 `deposit_exceeds_cash`); the same idempotency key records it once."""
    partner = await get_partner(session, partner_id, lock=True)
    seen = await session.scalar(
        select(CashEntry.amount_paise).where(
            CashEntry.partner_id == partner_id, CashEntry.idempotency_key == key
        )
    )
    if seen is not None:
        if seen != amount_paise:
            raise Unprocessable(
                "This idempotency key was used for another amount", code="idempotency_key_reused"
            )
        return partner
    if amount_paise > partner.cash_in_hand_paise:
        raise Conflict(
            "The deposit is more than the partner holds",
            code="deposit_exceeds_cash",
            extra={"cash_in_hand_paise": partner.cash_in_hand_paise},
        )
    partner.cash_in_hand_paise -= amount_paise
    partner.updated_at = now
    session.add(
        CashEntry(
            partner_id=partner_id,
            kind="deposit",
            amount_paise=amount_paise,
            idempotency_key=key,
            recorded_by=by,
            created_at=now,
        )
    )
    await session.flush()
    return partner


# ---------------------------------------------------------------- offers


async def create_offer(
    session: AsyncSession,
    store_id: uuid.UUID,
    partner_id: uuid.UUID,
    route: TripRoute,
    now: datetime,
    expires_at: datetime,
) -> DeliveryOffer | None:
    """Offer a trip along its planned route, or None when the database says no: the partner
    already holds an open offer, or one of the orders is no longer dispatchable (cancelled,
    already carried)."""
    order_ids = route.order_ids
    dispatchable = await session.scalar(
        select(func.count())
        .select_from(Order)
        .where(
            Order.id.in_(order_ids),
            Order.status.in_(DISPATCHABLE),
            ~ORDER_CARRIED,
        )
    )
    if dispatchable != len(order_ids):
        return None
    offer = DeliveryOffer(
        store_id=store_id,
        partner_id=partner_id,
        order_ids=list(order_ids),
        created_at=now,
        expires_at=expires_at,
        planned_eta_s=list(route.etas_s),
        route_planner=route.planner,
        route_fallback=route.fallback,
    )
    try:
        async with session.begin_nested():
            session.add(offer)
    except IntegrityError:
        return None
    await outbox.emit(
        session,
        "delivery.offered",
        None,
        {
            "offer_id": str(offer.id),
            "partner_id": str(partner_id),
            "store_id": str(store_id),
            "orders": len(order_ids),
            "expires_at": expires_at.isoformat(),
        },
    )
    return offer


async def open_offers(session: AsyncSession, partner_id: uuid.UUID, now: datetime) -> list[DeliveryOffer]:
    rows = await session.scalars(
        select(DeliveryOffer).where(
            DeliveryOffer.partner_id == partner_id,
            DeliveryOffer.status == "open",
            DeliveryOffer.expires_at > now,
        )
    )
    return list(rows)


def new_pin() -> str:
    return f"{secrets.randbelow(10_000):04d}"


async def answer_offer(
    session: AsyncSession, offer_id: uuid.UUID, partner_id: uuid.UUID, accept: bool, now: datetime
) -> tuple[DeliveryOffer, list[Delivery]]:
    """Accept (one delivery per order, each with its PIN) or decline an open offer of the
    partner's. 404 `offer_not_found` for someone else's, 409 `offer_closed` once it expired or
    was answered or recalled, 409 `order_taken` if an order went to someone else meanwhile."""
    offer = await session.get(DeliveryOffer, offer_id, with_for_update=True)
    if offer is None or offer.partner_id != partner_id:
        raise OfferNotFound("No such offer")
    if offer.status != "open" or offer.expires_at <= now:
        raise OfferClosed(f"This offer is {offer.status if offer.status != 'open' else 'expired'}")
    offer.answered_at = now
    if not accept:
        offer.status = "declined"
        await session.flush()
        return offer, []
    offer.status = "accepted"
    deliveries = [
        Delivery(
            order_id=order_id,
            offer_id=offer.id,
            partner_id=partner_id,
            store_id=offer.store_id,
            seq=seq,
            status=D.assigned,
            pin=new_pin(),
            created_at=now,
            updated_at=now,
        )
        for seq, order_id in enumerate(offer.order_ids)
    ]
    try:
        async with session.begin_nested():
            session.add_all(deliveries)
    except IntegrityError:
        raise OrderTaken("An order of this offer is already with another partner") from None
    for d in deliveries:
        await _record(session, d, None, "partner", partner_id, None, now)
    await session.flush()
    return offer, deliveries


async def close_offers(
    session: AsyncSession, status: Literal["expired", "recalled"], now: datetime, *, ids: Sequence[uuid.UUID]
) -> list[DeliveryOffer]:
    """Close these offers if still open (expired or recalled); returns those it closed."""
    rows = await session.scalars(
        update(DeliveryOffer)
        .where(DeliveryOffer.id.in_(ids), DeliveryOffer.status == "open")
        .values(status=status, answered_at=now)
        .returning(DeliveryOffer)
    )
    return list(rows)


async def note_expiry(
    session: AsyncSession, partner_id: uuid.UUID, offline_after: int, now: datetime
) -> bool:
    """Count an unanswered offer; the `offline_after`-th in a row sets the partner offline.
    Returns whether it did."""
    partner = await get_partner(session, partner_id, lock=True)
    partner.expiries_in_a_row += 1
    went_offline = partner.expiries_in_a_row >= offline_after
    if went_offline:
        partner.online, partner.expiries_in_a_row = False, 0
    partner.updated_at = now
    await session.flush()
    return went_offline


async def answered(session: AsyncSession, partner_id: uuid.UUID, now: datetime) -> None:
    await session.execute(
        update(Partner).where(Partner.user_id == partner_id).values(expiries_in_a_row=0, updated_at=now)
    )


# ---------------------------------------------------------------- deliveries


async def _record(
    session: AsyncSession,
    delivery: Delivery,
    previous: str | None,
    actor: str,
    actor_user_id: uuid.UUID | None,
    reason: str | None,
    now: datetime,
) -> None:
    await outbox.emit(
        session,
        f"delivery.{delivery.status}",
        delivery.order_id,
        {
            "delivery_id": str(delivery.id),
            "order_id": str(delivery.order_id),
            "partner_id": str(delivery.partner_id),
            "store_id": str(delivery.store_id),
            "from": previous,
            "status": delivery.status,
            "version": delivery.version,
        },
    )
    session.add(
        DeliveryEvent(
            delivery_id=delivery.id,
            from_status=previous,
            to_status=delivery.status,
            actor=actor,
            actor_user_id=actor_user_id,
            reason=reason,
            created_at=now,
        )
    )


async def advance(
    session: AsyncSession,
    delivery_id: uuid.UUID,
    body: StatusIn,
    *,
    actor: DeliveryActor,
    actor_user_id: uuid.UUID | None,
    now: datetime,
) -> tuple[Delivery, Order]:
    """Move a delivery and, through the order rules, its order: `picked_up` needs the order
    packed and makes it `out_for_delivery` (the stock leaves the shelf); `delivered` needs
    the customer's PIN (wrong: 422 `wrong_pin`, counted; the fifth locks it, 409 `pin_locked`)
    and, for cash on delivery, `cash_collected_paise` equal to the amount due (422
    `cash_mismatch`), which captures the payment and adds to the partner's cash in hand;
    `failed` (with a reason) makes the order `delivery_failed`, `returned` brings the stock
    back and refunds a paid order. A partner moves only their own deliveries (404 otherwise)."""
    delivery = await session.get(Delivery, delivery_id, with_for_update=True)
    if delivery is None or (actor == "partner" and delivery.partner_id != actor_user_id):
        raise DeliveryNotFound("No such delivery")
    if body.version is not None and body.version != delivery.version:
        raise Conflict(
            "The delivery changed since you read it",
            code="version_conflict",
            extra={"current_version": delivery.version, "current_status": delivery.status},
        )
    order = await orders.lock_order(session, delivery.order_id)
    assert order is not None
    target = D(body.to)
    check_delivery_transition(D(delivery.status), target, actor, order_status=orders.Status(order.status))
    if (target is D.failed or actor in ("ops", "admin")) and not body.reason:
        # A failure is explained; an override of the partner's flow is audited.
        raise Unprocessable("Give a reason for this move", code="reason_required")
    if target is D.delivered and actor == "partner":
        await _check_pin(session, delivery, body.pin)
    if target is D.delivered and order.payment_method == "cod":
        await _collect_cash(session, delivery, order, body.cash_collected_paise, now)
    previous = delivery.status
    delivery.status = target
    delivery.version += 1
    delivery.updated_at = now
    if target is D.picked_up:
        delivery.picked_up_at = now
    if target not in ACTIVE_DELIVERY:
        delivery.ended_at = now
    await _record(session, delivery, previous, actor, actor_user_id, body.reason, now)
    order_target = ORDER_STATUS_AFTER.get(target)
    if order_target is not None:
        await orders.change_status(
            session,
            order,
            order_target,
            actor="delivery",
            actor_user_id=actor_user_id,
            reason=body.reason,
            now=now,
        )
    await session.flush()
    return delivery, order


async def _check_pin(session: AsyncSession, delivery: Delivery, pin: str | None) -> None:
    if delivery.pin_attempts >= MAX_PIN_ATTEMPTS:
        raise PinLocked("Too many wrong PINs: ops must confirm this delivery")
    if pin is None or not secrets.compare_digest(pin, delivery.pin):
        delivery.pin_attempts += 1
        await session.flush()
        left = MAX_PIN_ATTEMPTS - delivery.pin_attempts
        error: AppError = (
            PinLocked("Too many wrong PINs: ops must confirm this delivery")
            if left == 0
            else WrongPin("That is not the customer's PIN", extra={"attempts_left": left})
        )
        raise error.with_kept_changes()


async def _collect_cash(
    session: AsyncSession, delivery: Delivery, order: Order, amount: int | None, now: datetime
) -> None:
    """Cash on delivery: exactly the amount due captures the payment, once."""
    payment = (
        await session.scalars(select(Payment).where(Payment.order_id == order.id).with_for_update())
    ).one()
    due = payment.amount_paise
    if amount != due:
        raise CashMismatch("Collect exactly the amount due", extra={"amount_due_paise": due})
    payment.status = PaymentStatus.captured
    payment.captured_paise = due
    payment.captured_at = now
    delivery.cash_collected_paise = due
    session.add(
        CashEntry(
            partner_id=delivery.partner_id,
            kind="collected",
            amount_paise=due,
            delivery_id=delivery.id,
            created_at=now,
        )
    )
    await session.execute(
        update(Partner)
        .where(Partner.user_id == delivery.partner_id)
        .values(cash_in_hand_paise=Partner.cash_in_hand_paise + due, updated_at=now)
    )


async def cancel_for_order(session: AsyncSession, order_id: uuid.UUID, now: datetime) -> Delivery | None:
    """The order was cancelled: its delivery, if still before pickup, is cancelled too (the
    partner is recalled). Idempotent: the outbox may deliver the event twice."""
    delivery = (
        await session.scalars(select(Delivery).where(Delivery.order_id == order_id, ACTIVE).with_for_update())
    ).one_or_none()
    if delivery is None or D(delivery.status) not in (D.assigned, D.at_store):
        return None
    previous, delivery.status = delivery.status, D.cancelled
    delivery.version += 1
    delivery.updated_at = delivery.ended_at = now
    await _record(session, delivery, previous, "system", None, "order cancelled", now)
    await session.flush()
    return delivery


def _delivery_rows() -> Select[Delivery, Order, Payment, str | None]:
    return (
        select(Delivery, Order, Payment, User.name)
        .join(Order, Order.id == Delivery.order_id)
        .join(Payment, Payment.order_id == Order.id)
        .join(User, User.id == Order.user_id)
    )


async def partner_trip(session: AsyncSession, partner_id: uuid.UUID) -> list[DeliveryOut]:
    """The partner's active deliveries in drop order, with what they need at each door."""
    rows = await session.execute(
        _delivery_rows()
        .where(Delivery.partner_id == partner_id, ACTIVE)
        .order_by(Delivery.created_at, Delivery.seq)
    )
    return [delivery_out(d, o, p, name) for d, o, p, name in rows.all()]


async def delivery_view(session: AsyncSession, delivery_id: uuid.UUID) -> DeliveryOut:
    d, o, p, name = (await session.execute(_delivery_rows().where(Delivery.id == delivery_id))).one()
    return delivery_out(d, o, p, name)


def delivery_out(d: Delivery, o: Order, p: Payment, customer_name: str | None) -> DeliveryOut:
    due = p.amount_paise if o.payment_method == "cod" and p.status == PaymentStatus.cod_pending else 0
    return DeliveryOut(
        id=d.id,
        order_id=d.order_id,
        partner_id=d.partner_id,
        seq=d.seq,
        status=D(d.status),
        version=d.version,
        order_status=orders.Status(o.status),
        payment_method=o.payment_method,
        amount_due_paise=due,
        drop=dict(o.delivery_address),
        customer_name=customer_name,
    )
