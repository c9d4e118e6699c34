"""Payments service (`/payments`): the gateway's signed webhooks, refunds, a payment's state,
and the outbox subscriber that applies gateway events and submits refunds.

A webhook is verified (HMAC-SHA256 of the raw body, constant-time), recorded once per
gateway event id together with an outbox event, and answered at once; the effect runs when
the relay delivers that event to `consume` below. So a slow effect never makes the gateway
time out and retry, and a crash between the two loses nothing."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from actors.jobs import janitor
from actors.outbox import relay
from config import metrics
from deployments.common import (
    CurrentUser,
    Db,
    IdempotencyKey,
    create_api,
    require_role,
    resources,
    serve_builder,
)
from models import order_flows, orders, outbox, payments
from models.db import utcnow
from models.errors import BadRequest, Unauthorized
from models.gateway import WebhookEvent, verify_webhook
from models.payments import PaymentOut, Refund, RefundIn, RefundOut
from models.users import Role

log = logging.getLogger("vurksha.payments")

MAX_WEBHOOK_BYTES = 256 * 1024

webhooks = APIRouter()


class Ack(BaseModel):
    status: str
    duplicate: bool


@webhooks.post("/webhooks/razorpay", response_model=Ack, tags=["webhooks"])
async def razorpay_webhook(
    request: Request,
    db: Db,
    signature: Annotated[str | None, Header(alias="X-Razorpay-Signature")] = None,
    event_id: Annotated[str | None, Header(alias="X-Razorpay-Event-Id", max_length=64)] = None,
) -> Ack:
    """Razorpay's webhook receiver. 401 `invalid_signature` unless `X-Razorpay-Signature` is
    the HMAC-SHA256 of the exact body with the webhook secret; 400 without an event id or
    with a body that is not a gateway event. Each event id takes effect once, however often
    it is delivered (`duplicate: true` on repeats)."""
    raw = await request.body()  # at most MAX_WEBHOOK_BYTES (413 before)
    secret = resources().settings.razorpay_webhook_secret.get_secret_value()
    if not signature or not verify_webhook(secret, raw, signature):
        metrics.WEBHOOK_FAILURES.inc(provider="razorpay")
        raise Unauthorized("The webhook signature does not match", code="invalid_signature", headers={})
    if not event_id:
        raise BadRequest("X-Razorpay-Event-Id is required", code="event_id_required")
    try:
        event = WebhookEvent.model_validate_json(raw)
    except ValidationError as exc:
        raise BadRequest("The body is not a gateway event", code="invalid_event") from exc
    recorded = await payments.record_gateway_event(db, event_id, event.event, event.model_dump(mode="json"))
    return Ack(status="ok", duplicate=not recorded)


api = create_api(
    "payments",
    title="Vurksha payments",
    description="Payment gateway integration, signed webhooks, refunds and reconciliation.",
    unlimited=webhooks,
    body_limits={"/webhooks/razorpay": MAX_WEBHOOK_BYTES},
)


class PaymentDetail(BaseModel):
    payment: PaymentOut
    refunds: list[RefundOut]


@api.post(
    "/refunds",
    status_code=201,
    response_model=RefundOut,
    tags=["refunds"],
    dependencies=[Depends(require_role(Role.admin, Role.ops))],
)
async def create_refund(body: RefundIn, principal: CurrentUser, db: Db, key: IdempotencyKey) -> JSONResponse:
    """Refund all (omit `amount_paise`) or part of what was captured for an order; several
    partial refunds may follow each other up to the captured amount (422
    `refund_exceeds_captured` beyond it, with `refundable_paise`). Admins and ops only. The same
    `Idempotency-Key` returns the first refund (200) instead of refunding twice. The refund is
    `pending` until the gateway processes it; a delivered order then becomes
    `partially_refunded` or `refunded`."""
    order = await orders.get_visible(db, body.order_id, principal, lock=True)
    payment = await payments.payment_for_order(db, order.id, lock=True)
    if payment is None:
        raise payments.NotRefundable("This order has no payment")
    refund, created = await payments.request_refund(
        db,
        payment,
        amount_paise=body.amount_paise,
        reason=body.reason,
        idempotency_key=key,
        requested_by=principal.id,
    )
    return JSONResponse(
        RefundOut.model_validate(refund).model_dump(mode="json"), status_code=201 if created else 200
    )


@api.get("/orders/{order_id}", response_model=PaymentDetail, tags=["payments"])
async def order_payment(order_id: uuid.UUID, principal: CurrentUser, db: Db) -> PaymentDetail:
    """An order's payment and its refunds (the order's customer, its store's staff, ops, admins)."""
    order = await orders.get_visible(db, order_id, principal)
    payment = await payments.payment_for_order(db, order.id)
    if payment is None:
        raise orders.order_not_found()
    refunds = (
        await db.scalars(select(Refund).where(Refund.order_id == order.id).order_by(Refund.created_at))
    ).all()
    return PaymentDetail(
        payment=PaymentOut.model_validate(payment), refunds=[RefundOut.model_validate(r) for r in refunds]
    )


class JobResult(BaseModel):
    job: str
    changed: int


@api.post(
    "/reconcile",
    response_model=JobResult,
    tags=["ops"],
    dependencies=[Depends(require_role(Role.admin, Role.ops))],
)
async def reconcile_now() -> JobResult:
    """Ask the gateway now about every payment and refund still pending (it also runs
    periodically). Admins and ops only."""
    changed: int = await janitor().run.remote("reconcile")
    return JobResult(job="reconcile", changed=changed)


class _Subscriber:
    """The outbox subscriber: the relay calls `consume` through a handle, at least once per
    event. Each effect is idempotent (see `models.order_flows.apply_gateway_event`,
    `models.order_flows.submit_refund`)."""

    def __init__(self) -> None:
        super().__init__()
        relay()
        janitor()

    async def consume(self, event: outbox.Event) -> str:
        res = resources()
        if event.topic == "gateway.event":
            async with res.sessionmaker() as session:
                event_id = str(event.payload["event_id"])
                outcome = await order_flows.apply_gateway_event(session, event_id, utcnow())
                await session.commit()
        elif event.topic == "refund.requested":
            outcome = await order_flows.submit_refund(
                res.sessionmaker, res.gateway, uuid.UUID(str(event.payload["refund_id"]))
            )
        else:
            raise ValueError(f"payments does not subscribe to {event.topic}")
        if outcome.fact:
            metrics.record_fact(outcome.fact)
        return outcome.detail


app = serve_builder(api, "payments", _Subscriber)
