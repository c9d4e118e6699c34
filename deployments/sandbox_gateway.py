"""Sandbox gateway (`/sandbox-gateway`): stand-ins of third parties outside production, for
Razorpay and, at `/fcm`, Firebase Cloud Messaging (`deployments/sandbox_fcm.py`).

It serves Razorpay's API (`/v1/...`, basic auth with the configured key id and secret, errors
in Razorpay's format) and signs and sends Razorpay-style webhooks, so the payments service
runs against it unchanged. The `/sandbox/...` controls do what a customer's checkout would:
pay or fail an order. The rules are in `models/sandbox_gateway.py`. In production only
`/healthz` exists: the routes are not registered.
"""

from __future__ import annotations

import html
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from config.settings import get_settings
from deployments import sandbox_fcm
from deployments.common import create_api, http_error, resources, serve_builder
from models.gateway import GatewayOrder, GatewayPayment, GatewayRefund
from models.sandbox_gateway import (
    RazorpayError,
    RazorpayErrorBody,
    SandboxCapture,
    SandboxCreateOrder,
    SandboxEvent,
    SandboxGateway,
    SandboxPay,
    SandboxPayResult,
    SandboxRefund,
    WebhookSender,
    check_auth,
    validation_error,
)

api = create_api(
    "sandbox_gateway",
    title="Vurksha sandbox gateway",
    description="Stand-ins of third parties for development and tests: Razorpay's API and signed "
    "webhooks, and FCM HTTP v1 (`/fcm`).",
    # Its callers are our own services (all from one address): a third party would not
    # count them against our per-IP limits.
    rate_limited=False,
)


async def _razorpay_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RazorpayError)
    return JSONResponse(exc.body(), status_code=exc.status_code)


async def _bad_input(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return await _razorpay_error(request, validation_error(exc.errors()))


async def _unreadable_body(request: Request, exc: Exception) -> Response:
    """A body that cannot be parsed at all (FastAPI's own 400) in Razorpay's format too; the
    other HTTP errors (405 with its Allow header, 413) as everywhere else."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        return await _razorpay_error(request, RazorpayError("The request body is not valid JSON"))
    return await http_error(request, exc)


# The sandbox answers like Razorpay, not with our problem documents.
api.add_exception_handler(RazorpayError, _razorpay_error)
api.add_exception_handler(RequestValidationError, _bad_input)
api.add_exception_handler(StarletteHTTPException, _unreadable_body)

_sender: WebhookSender | None = None


def sender() -> WebhookSender:
    """The replica's webhook sender (one HTTP client, the background deliveries)."""
    global _sender
    if _sender is None:
        settings = get_settings()
        _sender = WebhookSender(
            secret=settings.razorpay_webhook_secret.get_secret_value(),
            default_url=settings.gateway_webhook_url,
        )
    return _sender


def gateway() -> SandboxGateway:
    return SandboxGateway(resources().redis)


async def authenticate(request: Request) -> None:
    """Razorpay's API keys, as HTTP basic auth."""
    settings = get_settings()
    check_auth(
        request.headers.get("authorization"),
        settings.razorpay_key_id,
        settings.razorpay_key_secret.get_secret_value(),
    )


def _collection(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"entity": "collection", "count": len(items), "items": items}


def _doc(model: type) -> dict[str, Any]:
    # The routes return the entities as raw JSON (Razorpay's quirks kept); this documents them.
    return {
        "response_model": None,
        "responses": {200: {"model": model, "description": "The entity, as Razorpay returns it"}},
    }


def _collection_doc() -> dict[str, Any]:
    return {
        "response_model": None,
        "responses": {
            200: {"description": 'A collection: {"entity": "collection", "count": n, "items": [...]}'}
        },
    }


RAZORPAY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": RazorpayErrorBody, "description": "Bad input, or an unknown id (Razorpay's format)"},
    401: {"model": RazorpayErrorBody, "description": "Authentication failed (Razorpay's format)"},
}


ERROR_BODY_SCHEMA = f"#/components/schemas/{RazorpayErrorBody.__name__}"


if get_settings().dev_endpoints:
    # Registered only outside production, so in production these paths are plain 404s.
    v1 = APIRouter(
        prefix="/v1", tags=["razorpay"], dependencies=[Depends(authenticate)], responses=RAZORPAY_ERRORS
    )
    controls = APIRouter(prefix="/sandbox", tags=["sandbox"], responses={400: RAZORPAY_ERRORS[400]})

    @v1.post("/orders", **_doc(GatewayOrder))
    async def create_order(body: SandboxCreateOrder) -> dict[str, Any]:
        """Create an order (Razorpay: amount in paise, at least 100; currency INR)."""
        return await gateway().create_order(body)

    @v1.get("/orders/{order_id}", **_doc(GatewayOrder))
    async def fetch_order(order_id: str) -> dict[str, Any]:
        """An order by id."""
        return await gateway().order(order_id)

    @v1.get("/orders/{order_id}/payments", **_collection_doc())
    async def order_payments(order_id: str) -> dict[str, Any]:
        """Every payment attempted on an order."""
        return _collection(await gateway().order_payments(order_id))

    @v1.get("/payments/{payment_id}", **_doc(GatewayPayment))
    async def fetch_payment(payment_id: str) -> dict[str, Any]:
        """A payment by id."""
        return await gateway().payment(payment_id)

    @v1.post("/payments/{payment_id}/capture", **_doc(GatewayPayment))
    async def capture(payment_id: str, body: SandboxCapture) -> dict[str, Any]:
        """Capture an authorized payment for exactly its amount."""
        payment, events = await gateway().capture(payment_id, body)
        sender().dispatch(events, await gateway().webhook_options(payment_id))
        return payment

    @v1.post("/payments/{payment_id}/refund", **_doc(GatewayRefund))
    async def refund(
        payment_id: str,
        body: Annotated[SandboxRefund | None, Body()] = None,
        x_refund_idempotency: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Refund (part of) a captured payment; the amount defaults to the unrefunded rest. The
        same `X-Refund-Idempotency` key on the same payment returns the first refund."""
        refund, events = await gateway().refund(payment_id, body or SandboxRefund(), x_refund_idempotency)
        sender().dispatch(events, await gateway().webhook_options(payment_id))
        return refund

    @v1.get("/payments/{payment_id}/refunds", **_collection_doc())
    async def payment_refunds(payment_id: str) -> dict[str, Any]:
        """Every refund of a payment."""
        return _collection(await gateway().payment_refunds(payment_id))

    @v1.get("/refunds/{refund_id}", **_doc(GatewayRefund))
    async def fetch_refund(refund_id: str) -> dict[str, Any]:
        """A refund by id."""
        return await gateway().refund_entity(refund_id)

    @controls.post("/orders/{order_id}/pay", response_model=SandboxPayResult)
    async def pay(order_id: str, body: Annotated[SandboxPay | None, Body()] = None) -> SandboxPayResult:
        """What the customer's checkout does: a payment attempt on the order that succeeds
        (authorized, then auto-captured; the order is paid) or fails. Responds at once; the
        webhooks go out in the background, shaped by the `webhooks` switches."""
        request = body or SandboxPay()
        payment, events = await gateway().pay(order_id, request)
        delivered = sender().dispatch(events, request.webhooks)
        return SandboxPayResult(
            payment=payment,
            events=[SandboxEvent(id=e.id, event=e.name) for e in events],
            webhooks_delivered=delivered,
        )

    @controls.get(
        "/checkout/{order_id}",
        response_class=HTMLResponse,
        # The page is HTML; its errors are Razorpay's JSON (FastAPI would document them as HTML).
        responses={
            400: {
                "description": RAZORPAY_ERRORS[400]["description"],
                "content": {"application/json": {"schema": {"$ref": ERROR_BODY_SCHEMA}}},
            }
        },
    )
    async def checkout(order_id: str) -> HTMLResponse:
        """A minimal checkout page for demos: Pay and Fail buttons for the order."""
        order = await gateway().order(order_id)
        rupees = f"{order['amount'] / 100:.2f}"  # display only; money stays integer paise
        oid = html.escape(order["id"])
        page = CHECKOUT_PAGE.format(
            order_id=oid,
            amount=html.escape(rupees),
            currency=html.escape(order["currency"]),
            status=html.escape(order["status"]),
            # Inside <script>: JSON, not HTML escaping (the id is [A-Za-z0-9_] anyway).
            pay_url=json.dumps(f"../orders/{order['id']}/pay"),
        )
        return HTMLResponse(page)

    api.include_router(v1)
    api.include_router(controls)
    api.include_router(sandbox_fcm.router)


CHECKOUT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sandbox checkout {order_id}</title></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 3rem auto">
<h1>Sandbox checkout</h1>
<p>Order <code>{order_id}</code>: {currency} {amount} (status {status})</p>
<form data-outcome="success"><button type="submit">Pay</button></form>
<form data-outcome="failure"><button type="submit">Fail</button></form>
<pre id="result"></pre>
<script>
const payUrl = {pay_url};
for (const form of document.querySelectorAll("form")) {{
  form.addEventListener("submit", async (event) => {{
    event.preventDefault();
    const response = await fetch(payUrl, {{
      method: "POST",
      headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{outcome: form.dataset.outcome}}),
    }});
    document.getElementById("result").textContent = JSON.stringify(await response.json(), null, 2);
  }});
}}
</script>
</body></html>
"""

app = serve_builder(api, "sandbox_gateway")
