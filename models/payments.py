"""Payments: one payment per order (online through the gateway, or cash on delivery), the
refunds against it, and the gateway's webhook events.

Money invariants live in the table: `0 <= refunded <= refund_reserved <= captured`.
`refund_reserved` counts every refund not failed (pending or processed), so two concurrent
refunds can never together exceed what was captured: each reserves its amount with a
conditional UPDATE before it is sent to the gateway. `refunded` counts processed refunds.

How a gateway event changes an order is in `models.orders` (the order lifecycle owns its
transitions); this module holds the payment-side state only.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from models import outbox
from models.bodies import Strict
from models.db import Base, TimestampMixin, new_id
from models.errors import Conflict, Unprocessable


class PaymentStatus(enum.StrEnum):
    created = "created"  # online, awaiting the customer's payment
    failed = "failed"  # the last attempt failed; another may still succeed
    captured = "captured"
    partially_refunded = "partially_refunded"
    refunded = "refunded"
    cod_pending = "cod_pending"  # cash on delivery, collected by the partner


class Payment(TimestampMixin, Base):
    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint("method IN ('online', 'cod')", name="method"),
        CheckConstraint(
            "status IN ('created', 'failed', 'captured', 'partially_refunded', 'refunded', 'cod_pending')",
            name="status",
        ),
        CheckConstraint(
            "amount_paise > 0 AND captured_paise >= 0 AND refunded_paise >= 0"
            " AND refunded_paise <= refund_reserved_paise AND refund_reserved_paise <= captured_paise",
            name="money",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="RESTRICT"), unique=True)
    method: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(24))
    currency: Mapped[str] = mapped_column(String(3), server_default="INR")
    amount_paise: Mapped[int] = mapped_column(Integer)
    captured_paise: Mapped[int] = mapped_column(Integer, server_default="0")
    refund_reserved_paise: Mapped[int] = mapped_column(Integer, server_default="0")
    refunded_paise: Mapped[int] = mapped_column(Integer, server_default="0")
    razorpay_order_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    razorpay_payment_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    captured_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(String(200))


class Refund(Base):
    __tablename__ = "refunds"
    __table_args__ = (
        CheckConstraint("amount_paise > 0", name="amount"),
        CheckConstraint("status IN ('pending', 'processed', 'failed')", name="status"),
        UniqueConstraint("payment_id", "idempotency_key", name="uq_refunds_payment_key"),
        Index("ix_refunds_order", "order_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    payment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments.id", ondelete="RESTRICT"))
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="RESTRICT"))
    amount_paise: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    reason: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    requested_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    razorpay_refund_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    failure_reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    processed_at: Mapped[datetime | None]


class GatewayEvent(Base):
    """A webhook event, recorded once per gateway event id (the dedupe key)."""

    __tablename__ = "gateway_events"
    __table_args__ = (Index("ix_gateway_events_received", "received_at"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    received_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    processed_at: Mapped[datetime | None]


# ---------------------------------------------------------------- schemas


class PaymentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    method: str
    status: str
    currency: str
    amount_paise: int
    captured_paise: int
    refunded_paise: int
    razorpay_order_id: str | None = Field(description="Pass to the gateway's checkout SDK (online)")
    razorpay_payment_id: str | None


class RefundIn(Strict):
    order_id: uuid.UUID
    amount_paise: int | None = Field(
        default=None, strict=True, gt=0, description="Omit to refund everything not yet refunded"
    )
    reason: str = Field(min_length=1, max_length=200)


class RefundOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    order_id: uuid.UUID
    payment_id: uuid.UUID
    amount_paise: int
    status: str
    reason: str
    razorpay_refund_id: str | None
    created_at: datetime
    processed_at: datetime | None


# ---------------------------------------------------------------- operations


def open_payment(order_id: uuid.UUID, method: str, amount_paise: int) -> Payment:
    return Payment(
        order_id=order_id,
        method=method,
        status=PaymentStatus.created if method == "online" else PaymentStatus.cod_pending,
        amount_paise=amount_paise,
    )


async def payment_for_order(
    session: AsyncSession, order_id: uuid.UUID, *, lock: bool = False
) -> Payment | None:
    stmt = select(Payment).where(Payment.order_id == order_id)
    if lock:
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one_or_none()


class NotRefundable(Conflict):
    code = "not_refundable"


async def request_refund(
    session: AsyncSession,
    payment: Payment,
    *,
    amount_paise: int | None,
    reason: str,
    idempotency_key: str,
    requested_by: uuid.UUID | None,
) -> tuple[Refund, bool]:
    """Reserve and record a refund; the relay then submits it to the gateway. Returns the
    refund and whether it is new: the same key for the same payment returns the first refund
    (422 if the amount differs). The caller holds the payment row lock."""
    await session.flush()  # the conditional update below must see the caller's changes
    existing = (
        await session.scalars(
            select(Refund).where(Refund.payment_id == payment.id, Refund.idempotency_key == idempotency_key)
        )
    ).one_or_none()
    if existing is not None:
        if amount_paise is not None and amount_paise != existing.amount_paise:
            raise Unprocessable(
                "This Idempotency-Key was used for a different refund", code="idempotency_key_reused"
            )
        return existing, False
    if payment.captured_paise == 0:
        raise NotRefundable("Nothing was captured for this order, so nothing can be refunded")
    remaining = payment.captured_paise - payment.refund_reserved_paise
    amount = remaining if amount_paise is None else amount_paise
    if amount <= 0 or amount > remaining:
        raise Unprocessable(
            "The refund exceeds what remains of the captured amount",
            code="refund_exceeds_captured",
            extra={"refundable_paise": remaining},
        )
    reserved = (
        await session.execute(
            update(Payment)
            .where(Payment.id == payment.id, Payment.refund_reserved_paise + amount <= Payment.captured_paise)
            .values(refund_reserved_paise=Payment.refund_reserved_paise + amount)
            .returning(Payment.refund_reserved_paise)
        )
    ).scalar_one_or_none()
    if reserved is None:  # only without the row lock; the CHECK would refuse it anyway
        raise Conflict("A concurrent refund changed the refundable amount; retry", code="refund_conflict")
    payment.refund_reserved_paise = reserved
    refund = Refund(
        payment_id=payment.id,
        order_id=payment.order_id,
        amount_paise=amount,
        reason=reason,
        idempotency_key=idempotency_key,
        requested_by=requested_by,
    )
    session.add(refund)
    await session.flush()
    await outbox.emit(
        session,
        "refund.requested",
        payment.order_id,
        {"refund_id": str(refund.id), "order_id": str(payment.order_id), "amount_paise": amount},
    )
    return refund, True


async def settle_refund(
    session: AsyncSession,
    refund_id: uuid.UUID,
    *,
    processed: bool,
    razorpay_refund_id: str | None,
    failure_reason: str | None,
    now: datetime,
) -> Refund | None:
    """Move a pending refund to processed (the money is back with the customer) or failed
    (its reservation is released). Conditional on `pending`, so a webhook and the API reply
    reporting the same outcome apply it once; returns the refund only when this call moved it."""
    values: dict[str, Any] = {"status": "processed" if processed else "failed"}
    if processed:
        values["processed_at"] = now
    else:
        values["failure_reason"] = (failure_reason or "failed at the gateway")[:200]
    refund = (
        await session.scalars(
            update(Refund)
            .where(Refund.id == refund_id, Refund.status == "pending")
            .values(**values)
            .returning(Refund)
        )
    ).one_or_none()
    if refund is None:
        return None
    if razorpay_refund_id and refund.razorpay_refund_id is None:
        refund.razorpay_refund_id = razorpay_refund_id
    if processed:
        await session.execute(
            update(Payment)
            .where(Payment.id == refund.payment_id)
            .values(
                refunded_paise=Payment.refunded_paise + refund.amount_paise,
                status=text(
                    "CASE WHEN refunded_paise + :a >= captured_paise THEN 'refunded'"
                    " ELSE 'partially_refunded' END"
                ).bindparams(a=refund.amount_paise),
            )
        )
        await outbox.emit(
            session,
            "refund.processed",
            refund.order_id,
            {
                "refund_id": str(refund.id),
                "order_id": str(refund.order_id),
                "amount_paise": refund.amount_paise,
            },
        )
    else:
        await session.execute(
            update(Payment)
            .where(Payment.id == refund.payment_id)
            .values(refund_reserved_paise=Payment.refund_reserved_paise - refund.amount_paise)
        )
    return refund


async def record_gateway_event(
    session: AsyncSession, event_id: str, event: str, payload: dict[str, Any]
) -> bool:
    """Store a verified webhook event once per event id and hand it to the outbox; False for a
    duplicate delivery (already recorded: nothing to do)."""
    inserted = (
        await session.execute(
            insert(GatewayEvent)
            .values(event_id=event_id, event=event, payload=payload)
            .on_conflict_do_nothing()
            .returning(GatewayEvent.event_id)
        )
    ).first()
    if inserted is None:
        return False
    await outbox.emit(session, "gateway.event", None, {"event_id": event_id, "event": event})
    return True
