"""Order flows: what spans several transactions or calls the payment gateway (checkout,
gateway events, refunds, reconciliation), and how payment events move an order. Each flow
takes a sessionmaker and commits its own phases; a gateway call never runs inside a
transaction (no row lock is held across the network). The single-session operations they
build on, and the rules, are in `models.orders`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config.settings import Settings
from models import idempotency
from models.carts import CartState
from models.db import utcnow
from models.gateway import (
    GatewayRefund,
    GatewayRejected,
    GatewayUnavailable,
    RazorpayClient,
    WebhookEvent,
)
from models.orders import CheckoutIn, Order, S, lock_order, lock_payment, order_out, place_order, transition
from models.payments import (
    GatewayEvent,
    Payment,
    PaymentStatus,
    Refund,
    payment_for_order,
    request_refund,
    settle_refund,
)

log = logging.getLogger("vurksha.orders")


# ---------------------------------------------------------------- payment effects on orders


@dataclass(frozen=True)
class Outcome:
    """What applying a gateway fact did (for logs, tests and the callers' metrics): `fact`
    names what was applied (payment.captured, payment.failed, refund.processed, refund.failed),
    empty when nothing was."""

    applied: bool
    detail: str
    fact: str = ""


async def _lock_gateway_order(session: AsyncSession, razorpay_order_id: str) -> tuple[Order, Payment] | None:
    """The order and payment a gateway order belongs to, locked in the global order."""
    order_id = await session.scalar(
        select(Payment.order_id).where(Payment.razorpay_order_id == razorpay_order_id)
    )
    if order_id is None:
        return None
    order = await lock_order(session, order_id)
    payment = await lock_payment(session, order_id)
    assert order is not None and payment is not None
    return order, payment


async def payment_captured(
    session: AsyncSession,
    *,
    razorpay_order_id: str,
    razorpay_payment_id: str,
    amount_paise: int,
    currency: str,
    now: datetime,
) -> Outcome:
    """The gateway captured money for one of our orders. Idempotent; never moves an order
    backwards: an order cancelled meanwhile (e.g. its reservation expired) gets the money
    refunded instead of being revived."""
    locked = await _lock_gateway_order(session, razorpay_order_id)
    if locked is None:
        return Outcome(False, "unknown gateway order")
    order, payment = locked
    if payment.captured_paise > 0:
        if payment.razorpay_payment_id == razorpay_payment_id:
            return Outcome(False, "already captured")
        # A second payment on one gateway order is not ours to keep; ops refund it by hand.
        return Outcome(False, "second capture on a paid order: refund it at the gateway by hand")
    if amount_paise != payment.amount_paise or currency != payment.currency:
        return Outcome(False, "amount or currency does not match the order")
    payment.status = PaymentStatus.captured
    payment.captured_paise = amount_paise
    payment.razorpay_payment_id = razorpay_payment_id
    payment.captured_at = now
    payment.failure_reason = None
    if order.status in (S.pending_payment, S.payment_failed):
        await transition(session, order, S.placed, actor="gateway", reason="payment captured", now=now)
        return Outcome(True, "order placed", "payment.captured")
    await request_refund(
        session,
        payment,
        amount_paise=None,
        reason=f"paid after the order was {order.status}",
        idempotency_key="late-capture",
        requested_by=None,
    )
    await session.flush()
    return Outcome(True, "late capture refunded", "payment.captured")


async def payment_failed(
    session: AsyncSession, *, razorpay_order_id: str, reason: str | None, now: datetime
) -> Outcome:
    """A payment attempt failed. Changes nothing once money was captured (a late failure
    event cannot undo a capture); otherwise the order shows the failure and keeps its stock
    until the reservation expires, since the customer may try again."""
    locked = await _lock_gateway_order(session, razorpay_order_id)
    if locked is None:
        return Outcome(False, "unknown gateway order")
    order, payment = locked
    if payment.status not in (PaymentStatus.created, PaymentStatus.failed):
        return Outcome(False, f"payment already {payment.status}")
    payment.status = PaymentStatus.failed
    payment.failure_reason = (reason or "payment failed")[:200]
    if order.status == S.pending_payment:
        await transition(
            session, order, S.payment_failed, actor="gateway", reason=payment.failure_reason, now=now
        )
        return Outcome(True, "order payment_failed", "payment.failed")
    await session.flush()
    return Outcome(True, "payment failed recorded", "payment.failed")


async def refund_settled(
    session: AsyncSession,
    refund_id: uuid.UUID,
    *,
    processed: bool,
    razorpay_refund_id: str | None,
    failure_reason: str | None,
    now: datetime,
) -> Outcome:
    """A refund finished at the gateway. The order's refunded amount follows, and a delivered
    order becomes partially_refunded or refunded."""
    order_id = await session.scalar(
        select(Payment.order_id).join(Refund, Refund.payment_id == Payment.id).where(Refund.id == refund_id)
    )
    if order_id is None:
        return Outcome(False, "unknown refund")
    order = await lock_order(session, order_id)
    await lock_payment(session, order_id)
    assert order is not None
    refund = await settle_refund(
        session,
        refund_id,
        processed=processed,
        razorpay_refund_id=razorpay_refund_id,
        failure_reason=failure_reason,
        now=now,
    )
    if refund is None:
        return Outcome(False, "refund already settled")
    if not processed:
        return Outcome(True, "refund failed", "refund.failed")
    order.refunded_paise += refund.amount_paise
    if order.status in (S.delivered, S.partially_refunded):
        target = S.refunded if order.refunded_paise >= order.total_paise else S.partially_refunded
        await transition(session, order, target, actor="system", reason=refund.reason, now=now)
    else:
        order.updated_at = now
        await session.flush()
    return Outcome(True, "refund processed", "refund.processed")


# ---------------------------------------------------------------- gateway workflows
#
# These span transactions: a gateway call never runs inside one (no row lock is held across
# the network). Each takes a sessionmaker and commits its own phases.


CHECKOUT_SCOPE = "orders.create"


async def checkout(
    sessions: async_sessionmaker[AsyncSession],
    gateway: RazorpayClient,
    *,
    user_id: uuid.UUID,
    key: str,
    body: CheckoutIn,
    settings: Settings,
    load_cart: Callable[[], Awaitable[CartState]],
    consume_cart: Callable[[CartState], Awaitable[None]],
) -> tuple[int, bytes, bool]:
    """POST /orders under an idempotency key, in atomic phases (see `models.idempotency`):
    claim the key; create the order with its stock and the recovery point in one
    transaction; for online payment create the gateway order outside any transaction and
    store it with the response. Returns (status, body bytes, replayed)."""
    ttl = timedelta(seconds=settings.idempotency_ttl_seconds)
    async with sessions() as s:
        claim = await idempotency.claim(
            s,
            user_id=user_id,
            scope=CHECKOUT_SCOPE,
            key=key,
            body_fingerprint=idempotency.fingerprint(body.model_dump_json().encode()),
            now=utcnow(),
            ttl=ttl,
        )
        await s.commit()
    if claim.replay_body is not None:
        return claim.replay_status or 201, claim.replay_body, True
    try:
        order_id = claim.resource_id
        if order_id is None:
            cart = await load_cart()
            async with sessions() as s:
                order = await place_order(
                    s, user_id=user_id, cart=cart, body=body, settings=settings, now=utcnow()
                )
                await idempotency.record(s, claim, order.id)
                response = None
                if order.payment_method == "cod":
                    response = (await order_out(s, order, settings)).model_dump_json().encode()
                    await idempotency.complete(s, claim, 201, response)
                await s.commit()
            claim = replace(claim, resource_id=order.id)
            # Only now that the order exists does the cart let go of what it bought.
            await consume_cart(cart)
            if response is not None:
                return 201, response, False
            order_id = order.id
        async with sessions() as s:
            order = await s.get_one(Order, order_id)
            payment = await payment_for_order(s, order_id)
        assert payment is not None
        gateway_order_id = payment.razorpay_order_id
        if gateway_order_id is None and order.status == S.pending_payment:
            created = await gateway.create_order(
                amount=payment.amount_paise,
                currency=payment.currency,
                receipt=str(order_id),
                notes={"order_id": str(order_id)},
            )
            gateway_order_id = created.id
        async with sessions() as s:
            if gateway_order_id is not None:
                await s.execute(
                    update(Payment)
                    .where(Payment.order_id == order_id, Payment.razorpay_order_id.is_(None))
                    .values(razorpay_order_id=gateway_order_id)
                )
            order = await s.get_one(Order, order_id)
            response = (await order_out(s, order, settings)).model_dump_json().encode()
            await idempotency.complete(s, claim, 201, response)
            await s.commit()
        return 201, response, False
    except Exception:
        async with sessions() as s:
            await idempotency.release(s, claim)
            await s.commit()
        raise


async def apply_gateway_event(session: AsyncSession, event_id: str, now: datetime) -> Outcome:
    """The payments subscriber's effect for one recorded webhook event: applied at most once
    (the event row is locked and marked processed in the same transaction as the effect)."""
    row = (
        await session.scalars(select(GatewayEvent).where(GatewayEvent.event_id == event_id).with_for_update())
    ).one_or_none()
    if row is None or row.processed_at is not None:
        return Outcome(False, "already processed")
    row.processed_at = now
    event = WebhookEvent.model_validate(row.payload)
    payment = event.payload.payment.entity if event.payload.payment else None
    refund = event.payload.refund.entity if event.payload.refund else None
    if event.event in ("payment.captured", "order.paid") and payment is not None and payment.order_id:
        return await payment_captured(
            session,
            razorpay_order_id=payment.order_id,
            razorpay_payment_id=payment.id,
            amount_paise=payment.amount,
            currency=payment.currency,
            now=now,
        )
    if event.event == "payment.failed" and payment is not None and payment.order_id:
        return await payment_failed(
            session,
            razorpay_order_id=payment.order_id,
            reason=payment.error_description or payment.error_reason,
            now=now,
        )
    if event.event in ("refund.processed", "refund.failed") and refund is not None:
        refund_id = await _our_refund_id(session, refund)
        if refund_id is None:
            return Outcome(False, "unknown refund")
        return await refund_settled(
            session,
            refund_id,
            processed=event.event == "refund.processed",
            razorpay_refund_id=refund.id,
            failure_reason="refund failed at the gateway",
            now=now,
        )
    await session.flush()
    return Outcome(False, f"{event.event} needs no action")


async def _our_refund_id(session: AsyncSession, refund: GatewayRefund) -> uuid.UUID | None:
    """Our refund for a gateway refund: by its gateway id, or by the id we put in its notes
    (a webhook can arrive before the API reply that told us the gateway id)."""
    found = await session.scalar(select(Refund.id).where(Refund.razorpay_refund_id == refund.id))
    if found is not None:
        return found
    try:
        return uuid.UUID(str((refund.notes or {}).get("refund_id", "")))
    except ValueError:
        return None


async def submit_refund(
    sessions: async_sessionmaker[AsyncSession], gateway: RazorpayClient, refund_id: uuid.UUID
) -> Outcome:
    """Send a requested refund to the gateway. Safe to repeat: the gateway dedupes on our
    refund id (`X-Refund-Idempotency`), and settling is conditional. A gateway that is down
    raises, so the relay retries later; a gateway that refuses fails the refund for good."""
    async with sessions() as s:
        row = (
            await s.execute(
                select(Refund, Payment.razorpay_payment_id)
                .join(Payment, Payment.id == Refund.payment_id)
                .where(Refund.id == refund_id)
            )
        ).one_or_none()
    if row is None or row[0].status != "pending" or row[1] is None:
        return Outcome(False, "nothing to submit")
    refund: Refund = row[0]
    try:
        result = await gateway.refund(
            row[1],
            refund.amount_paise,
            idempotency_key=str(refund.id),
            notes={"refund_id": str(refund.id), "order_id": str(refund.order_id)},
        )
    except GatewayRejected as exc:
        async with sessions() as s:
            outcome = await refund_settled(
                s,
                refund.id,
                processed=False,
                razorpay_refund_id=None,
                failure_reason=exc.message,
                now=utcnow(),
            )
            await s.commit()
        return outcome
    return await _settle_from_gateway(sessions, refund.id, result)


async def _settle_from_gateway(
    sessions: async_sessionmaker[AsyncSession], refund_id: uuid.UUID, result: GatewayRefund
) -> Outcome:
    async with sessions() as s:
        if result.status in ("processed", "failed"):
            outcome = await refund_settled(
                s,
                refund_id,
                processed=result.status == "processed",
                razorpay_refund_id=result.id,
                failure_reason="refund failed at the gateway",
                now=utcnow(),
            )
        else:
            await s.execute(
                update(Refund)
                .where(Refund.id == refund_id, Refund.razorpay_refund_id.is_(None))
                .values(razorpay_refund_id=result.id)
            )
            outcome = Outcome(True, "refund pending at the gateway")
        await s.commit()
    return outcome


async def reconcile(
    sessions: async_sessionmaker[AsyncSession],
    gateway: RazorpayClient,
    settings: Settings,
    *,
    limit: int = 100,
    applied_fact: Callable[[str], None] = lambda fact: None,
) -> int:
    """Ask the gateway about payments and refunds still pending after `reconcile_after_seconds`,
    so a dropped webhook cannot strand an order. Returns how many facts were applied, each
    also passed to `applied_fact`."""
    cutoff = utcnow() - timedelta(seconds=settings.reconcile_after_seconds)
    async with sessions() as s:
        pending_orders = (
            await s.scalars(
                select(Payment.razorpay_order_id)
                .join(Order, Order.id == Payment.order_id)
                .where(
                    Payment.status.in_([PaymentStatus.created, PaymentStatus.failed]),
                    Payment.razorpay_order_id.is_not(None),
                    Order.status.in_([S.pending_payment, S.payment_failed]),
                    Payment.created_at <= cutoff,
                )
                .limit(limit)
            )
        ).all()
        pending_refunds = (
            await s.execute(
                select(Refund.id, Refund.razorpay_refund_id).where(
                    Refund.status == "pending",
                    Refund.razorpay_refund_id.is_not(None),
                    Refund.created_at <= cutoff,
                )
            )
        ).all()
    applied = 0
    for gateway_order_id in pending_orders:
        assert gateway_order_id is not None
        try:
            attempts = await gateway.order_payments(gateway_order_id)
        except (GatewayUnavailable, GatewayRejected) as exc:
            # One payment the gateway cannot answer for must not stop the others.
            log.warning("reconcile: gateway order %s: %s", gateway_order_id, exc.code)
            continue
        captured = next((p for p in attempts if p.captured or p.status == "captured"), None)
        async with sessions() as s:
            if captured is not None:
                outcome = await payment_captured(
                    s,
                    razorpay_order_id=gateway_order_id,
                    razorpay_payment_id=captured.id,
                    amount_paise=captured.amount,
                    currency=captured.currency,
                    now=utcnow(),
                )
            elif attempts and all(p.status == "failed" for p in attempts):
                outcome = await payment_failed(
                    s, razorpay_order_id=gateway_order_id, reason=attempts[-1].error_description, now=utcnow()
                )
            else:
                outcome = Outcome(False, "still pending")
            await s.commit()
        applied += outcome.applied
        if outcome.fact:
            applied_fact(outcome.fact)
    for refund_id, gateway_refund_id in pending_refunds:
        assert gateway_refund_id is not None
        try:
            result = await gateway.fetch_refund(gateway_refund_id)
        except (GatewayUnavailable, GatewayRejected) as exc:
            log.warning("reconcile: gateway refund %s: %s", gateway_refund_id, exc.code)
            continue
        outcome = await _settle_from_gateway(sessions, refund_id, result)
        applied += outcome.applied
        if outcome.fact:
            applied_fact(outcome.fact)
    return applied
