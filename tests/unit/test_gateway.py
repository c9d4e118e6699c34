"""The gateway adapter's pure parts: Razorpay's webhook signature and its entity shapes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import pickle
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from models.gateway import (
    GatewayPayment,
    GatewayRejected,
    GatewayUnavailable,
    RazorpayClient,
    WebhookEvent,
    sign_webhook,
    verify_webhook,
)

SECRET = "whsec-test-123"

# A payment.captured webhook in the shape Razorpay documents, every field kept.
SAMPLE = b"""{
  "entity": "event",
  "account_id": "acc_BFQ7uQEaa7j2z7",
  "event": "payment.captured",
  "contains": ["payment"],
  "payload": {
    "payment": {
      "entity": {
        "id": "pay_DESlfW9H8K9uqM",
        "entity": "payment",
        "amount": 100,
        "currency": "INR",
        "base_amount": 100,
        "status": "captured",
        "order_id": "order_DESlLckIVRkHWj",
        "invoice_id": null,
        "international": false,
        "method": "netbanking",
        "amount_refunded": 0,
        "amount_transferred": 0,
        "refund_status": null,
        "captured": true,
        "description": null,
        "card_id": null,
        "bank": "HDFC",
        "wallet": null,
        "vpa": null,
        "email": "gaurav.kumar@example.com",
        "contact": "+919876543210",
        "notes": [],
        "fee": 2,
        "tax": 0,
        "error_code": null,
        "error_description": null,
        "error_source": null,
        "error_step": null,
        "error_reason": null,
        "acquirer_data": {"bank_transaction_id": "0125836177"},
        "created_at": 1567674599
      }
    }
  },
  "created_at": 1567674606
}"""


def test_signature_is_hex_hmac_sha256_of_the_raw_body():
    expected = hmac.new(SECRET.encode(), SAMPLE, hashlib.sha256).hexdigest()
    assert sign_webhook(SECRET, SAMPLE) == expected
    # Known answer, independent of this module and of hmac's object API.
    assert (
        sign_webhook("key", b"The quick brown fox jumps over the lazy dog")
        == "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )


def test_verify_accepts_the_right_signature_only():
    signature = sign_webhook(SECRET, SAMPLE)
    assert verify_webhook(SECRET, SAMPLE, signature)
    assert verify_webhook(SECRET, SAMPLE, signature.upper()) is False
    assert not verify_webhook(SECRET, SAMPLE.replace(b'"amount": 100', b'"amount": 900', 1), signature)
    assert not verify_webhook(SECRET, SAMPLE, signature[:-1] + ("0" if signature[-1] != "0" else "1"))
    assert not verify_webhook("another-secret", SAMPLE, signature)
    # A re-serialisation of the same JSON is different bytes: verification is over raw bytes.
    assert not verify_webhook(SECRET, json.dumps(json.loads(SAMPLE)).encode(), signature)


@pytest.mark.parametrize("garbage", ["", "   ", "not-hex", "é" * 64, "0" * 64])
def test_verify_rejects_empty_and_garbage(garbage):
    assert verify_webhook(SECRET, SAMPLE, garbage) is False


def test_verify_refuses_an_empty_secret():
    assert verify_webhook("", SAMPLE, sign_webhook("", SAMPLE)) is False


def test_webhook_event_parses_razorpays_documented_payload():
    event = WebhookEvent.model_validate_json(SAMPLE)
    assert event.event == "payment.captured" and event.contains == ["payment"]
    assert event.payload.payment is not None and event.payload.refund is None
    payment = event.payload.payment.entity
    assert isinstance(payment, GatewayPayment)
    assert (payment.id, payment.amount, payment.status, payment.captured) == (
        "pay_DESlfW9H8K9uqM",
        100,
        "captured",
        True,
    )
    assert payment.order_id == "order_DESlLckIVRkHWj" and payment.refund_status is None
    assert payment.notes == {}  # Razorpay sends empty notes as []
    # Fields we do not model are kept, not dropped.
    assert payment.model_extra is not None and payment.model_extra["bank"] == "HDFC"


def test_refund_event_carries_refund_and_payment():
    body = {
        "entity": "event",
        "account_id": "acc_x",
        "event": "refund.processed",
        "contains": ["refund", "payment"],
        "payload": {
            "refund": {
                "entity": {
                    "id": "rfnd_FP8QHiV938haTz",
                    "entity": "refund",
                    "amount": 500,
                    "currency": "INR",
                    "payment_id": "pay_FP8PmSkmKHbGvo",
                    "notes": {"reason": "damaged"},
                    "receipt": None,
                    "acquirer_data": {"arn": None},
                    "created_at": 1597078866,
                    "batch_id": None,
                    "status": "processed",
                    "speed_processed": "normal",
                    "speed_requested": "normal",
                }
            },
            "payment": json.loads(SAMPLE)["payload"]["payment"],
        },
        "created_at": 1597078870,
    }
    event = WebhookEvent.model_validate(body)
    assert event.payload.refund is not None and event.payload.refund.entity.amount == 500
    assert event.payload.refund.entity.notes == {"reason": "damaged"}
    assert event.payload.payment is not None


def test_gateway_errors_pickle_with_their_details():
    err = GatewayRejected("refused", extra={"gateway_code": "BAD_REQUEST_ERROR"})
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.status_code, copy.code, copy.extra, copy.retryable) == (
        502,
        "gateway_rejected",
        {"gateway_code": "BAD_REQUEST_ERROR"},
        False,
    )
    unavailable = pickle.loads(pickle.dumps(GatewayUnavailable("down")))
    assert (unavailable.status_code, unavailable.code, unavailable.retryable) == (
        503,
        "gateway_unavailable",
        True,
    )


# ---------------------------------------------------------------- error mapping over real HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A local server answering every request as `behaviour` says (status, body, delay)."""
    behaviour: dict[str, Any] = {"status": 200, "body": {}, "delay": 0.0}

    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(behaviour["delay"])
        return web.json_response(behaviour["body"], status=behaviour["status"])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", behaviour
    await runner.cleanup()


async def test_5xx_timeouts_and_refused_connections_are_unavailable(flaky):
    base, behaviour = flaky
    client = RazorpayClient(base, "rzp_test_x", "secret", timeout=0.3)
    try:
        behaviour.update(status=502, body={"error": {"code": "SERVER_ERROR"}})
        with pytest.raises(GatewayUnavailable):
            await client.fetch_payment("pay_x")
        behaviour.update(status=200, body={"id": "pay_x"}, delay=1.0)
        with pytest.raises(GatewayUnavailable):
            await client.fetch_payment("pay_x")
        behaviour.update(status=200, body={"unexpected": True}, delay=0)
        with pytest.raises(GatewayUnavailable):  # a 2xx we cannot read is not a success
            await client.fetch_payment("pay_x")
    finally:
        await client.aclose()
    closed = RazorpayClient(f"http://127.0.0.1:{free_port()}", "rzp_test_x", "secret")
    with pytest.raises(GatewayUnavailable) as exc:
        await closed.create_order(100, "INR", "r", {})
    await closed.aclose()
    assert exc.value.status_code == 503 and exc.value.retryable


async def test_4xx_is_rejected_with_the_gateways_error(flaky):
    base, behaviour = flaky
    behaviour.update(
        status=400,
        body={
            "error": {
                "code": "BAD_REQUEST_ERROR",
                "description": "The amount must be atleast INR 1.00",
                "source": "business",
                "step": "payment_initiation",
                "reason": "input_validation_failed",
                "metadata": {},
                "field": "amount",
            }
        },
    )
    client = RazorpayClient(base, "rzp_test_x", "secret")
    with pytest.raises(GatewayRejected) as exc:
        await client.create_order(1, "INR", "r", {})
    await client.aclose()
    assert not exc.value.retryable
    assert exc.value.extra == {
        "operation": "create_order",
        "gateway_status": 400,
        "gateway_code": "BAD_REQUEST_ERROR",
        "gateway_description": "The amount must be atleast INR 1.00",
        "gateway_reason": "input_validation_failed",
        "gateway_field": "amount",
    }
