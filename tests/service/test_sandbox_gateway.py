"""The Razorpay adapter against the sandbox gateway over real HTTP, through Serve: orders,
payments, capture, idempotent refunds, Razorpay's errors, and signed webhooks delivered to a
real local receiver (duplicates, order, retries). And the sandbox is absent in production."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from config.settings import DEV_RAZORPAY_KEY_ID, DEV_RAZORPAY_KEY_SECRET, DEV_RAZORPAY_WEBHOOK_SECRET
from models.gateway import GatewayRejected, RazorpayClient, WebhookEvent, verify_webhook
from tests.conftest import Live, production_app

PREFIX = "/sandbox-gateway"


# ---------------------------------------------------------------- a webhook receiver


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return self.headers["x-razorpay-event-id"]

    @property
    def event(self) -> WebhookEvent:
        return WebhookEvent.model_validate_json(self.body)


@dataclass
class Receiver:
    """A real HTTP endpoint on loopback recording every webhook POST it receives."""

    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    # Answer 500 to this many requests first (to make the sender retry).
    fail_first: int = 0
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def wait_for(self, count: int, timeout: float = 15) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} webhooks arrived"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # and no more than that
        return list(self.deliveries)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.seen += 1
                fail = state.seen <= state.fail_first
                if not fail:
                    state.deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(500 if fail else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/razorpay"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def gateway(live: Live) -> AsyncIterator[RazorpayClient]:
    client = RazorpayClient(live.base_url + PREFIX, DEV_RAZORPAY_KEY_ID, DEV_RAZORPAY_KEY_SECRET)
    yield client
    await client.aclose()


@pytest.fixture
async def http(live: Live) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.base_url + PREFIX, timeout=30) as client:
        yield client


async def pay(http: httpx.AsyncClient, order_id: str, status: int = 200, **body: Any) -> dict[str, Any]:
    body.setdefault("webhooks", {"deliver": False})
    response = await http.post(f"/sandbox/orders/{order_id}/pay", json=body)
    assert response.status_code == status, response.text
    result: dict[str, Any] = response.json()
    return result


def rejected(exc: pytest.ExceptionInfo[GatewayRejected]) -> dict[str, Any]:
    assert exc.value.status_code == 502 and exc.value.code == "gateway_rejected"
    return exc.value.extra


# ---------------------------------------------------------------- the API


async def test_order_paid_through_checkout_shows_a_captured_payment(gateway, http):
    order = await gateway.create_order(25000, "INR", "rcpt-1", {"cart": "c1"})
    assert (order.status, order.amount, order.amount_due, order.attempts) == ("created", 25000, 25000, 0)
    assert order.id.startswith("order_") and order.notes == {"cart": "c1"}

    result = await pay(http, order.id)
    payments = await gateway.order_payments(order.id)
    assert [p.id for p in payments] == [result["payment"]["id"]]
    (payment,) = payments
    assert (payment.status, payment.captured, payment.amount, payment.order_id, payment.method) == (
        "captured",
        True,
        25000,
        order.id,
        "upi",
    )
    assert await gateway.fetch_payment(payment.id) == payment
    paid = await gateway.fetch_order(order.id)
    assert (paid.status, paid.amount_paid, paid.amount_due, paid.attempts) == ("paid", 25000, 0, 1)
    assert [e["event"] for e in result["events"]] == ["payment.authorized", "payment.captured", "order.paid"]
    assert result["webhooks_delivered"] is False


async def test_refund_with_the_same_idempotency_key_refunds_once(gateway, http):
    order = await gateway.create_order(10000, "INR", "rcpt-2", {})
    payment_id = (await pay(http, order.id))["payment"]["id"]

    first = await gateway.refund(payment_id, 3000, idempotency_key="refund-a", notes={"why": "late"})
    again = await gateway.refund(payment_id, 3000, idempotency_key="refund-a", notes={"why": "late"})
    assert first == again and first.status == "processed" and first.amount == 3000
    assert await gateway.fetch_refund(first.id) == first
    payment = await gateway.fetch_payment(payment_id)
    assert (payment.amount_refunded, payment.refund_status, payment.status) == (3000, "partial", "captured")

    # Concurrent retries with one key still make one refund.
    same = await asyncio.gather(
        *[gateway.refund(payment_id, 1000, idempotency_key="refund-b") for _ in range(8)]
    )
    assert len({r.id for r in same}) == 1
    assert (await gateway.fetch_payment(payment_id)).amount_refunded == 4000


async def test_partial_refunds_up_to_the_amount_then_no_more(gateway, http, live: Live):
    order = await gateway.create_order(10000, "INR", "rcpt-3", {})
    payment_id = (await pay(http, order.id))["payment"]["id"]
    await gateway.refund(payment_id, 4000, idempotency_key="p1")
    with pytest.raises(GatewayRejected) as over:
        await gateway.refund(payment_id, 6001, idempotency_key="p2")
    assert rejected(over)["gateway_description"] == (
        "The refund amount provided is greater than amount captured"
    )
    assert rejected(over)["gateway_field"] == "amount" and rejected(over)["gateway_status"] == 400
    await gateway.refund(payment_id, 6000, idempotency_key="p3")
    payment = await gateway.fetch_payment(payment_id)
    assert (payment.amount_refunded, payment.refund_status, payment.status) == (10000, "full", "refunded")
    with pytest.raises(GatewayRejected):
        await gateway.refund(payment_id, 1, idempotency_key="p4")

    response = await http.get(
        f"/v1/payments/{payment_id}/refunds", auth=(DEV_RAZORPAY_KEY_ID, DEV_RAZORPAY_KEY_SECRET)
    )
    body = response.json()
    assert body["entity"] == "collection" and body["count"] == 2
    assert sorted(r["amount"] for r in body["items"]) == [4000, 6000]


async def test_wrong_keys_are_rejected_with_razorpays_401(live: Live, gateway):
    order = await gateway.create_order(10000, "INR", "rcpt-4", {})
    intruder = RazorpayClient(live.base_url + PREFIX, DEV_RAZORPAY_KEY_ID, "not-the-secret")
    try:
        with pytest.raises(GatewayRejected) as exc:
            await intruder.fetch_order(order.id)
    finally:
        await intruder.aclose()
    extra = rejected(exc)
    assert (extra["gateway_status"], extra["gateway_code"], extra["gateway_description"]) == (
        401,
        "BAD_REQUEST_ERROR",
        "Authentication failed",
    )
    async with httpx.AsyncClient(base_url=live.base_url + PREFIX) as raw:
        response = await raw.get(f"/v1/orders/{order.id}")  # no credentials at all
    assert response.status_code == 401 and response.json()["error"]["description"] == "Authentication failed"


async def test_failed_attempt_then_success_on_one_order(gateway, http):
    order = await gateway.create_order(5000, "INR", "rcpt-5", {})
    failed = await pay(http, order.id, outcome="failure")
    assert [e["event"] for e in failed["events"]] == ["payment.failed"]
    payment = await gateway.fetch_payment(failed["payment"]["id"])
    assert (payment.status, payment.captured, payment.error_code, payment.error_reason) == (
        "failed",
        False,
        "BAD_REQUEST_ERROR",
        "payment_failed",
    )
    assert (await gateway.fetch_order(order.id)).status == "attempted"

    succeeded = await pay(http, order.id, method="card")
    payments = {p.id: p for p in await gateway.order_payments(order.id)}
    assert {p.status for p in payments.values()} == {"failed", "captured"}
    assert payments[succeeded["payment"]["id"]].method == "card"
    final = await gateway.fetch_order(order.id)
    assert (final.status, final.attempts, final.amount_paid) == ("paid", 2, 5000)

    again = await pay(http, order.id, status=400)
    assert again["error"]["code"] == "BAD_REQUEST_ERROR"
    assert len(await gateway.order_payments(order.id)) == 2


async def test_manual_capture_must_match_the_authorized_amount(gateway, http):
    order = await gateway.create_order(7000, "INR", "rcpt-6", {})
    result = await pay(http, order.id, auto_capture=False)
    payment_id = result["payment"]["id"]
    assert result["payment"]["status"] == "authorized"
    assert (await gateway.fetch_order(order.id)).status == "attempted"
    with pytest.raises(GatewayRejected) as wrong:
        await gateway.capture(payment_id, 6999, "INR")
    assert rejected(wrong)["gateway_field"] == "amount"
    with pytest.raises(GatewayRejected):  # refunds need a captured payment
        await gateway.refund(payment_id, 100, idempotency_key="too-early")
    captured = await gateway.capture(payment_id, 7000, "INR")
    assert (captured.status, captured.captured) == ("captured", True)
    assert (await gateway.fetch_order(order.id)).status == "paid"
    with pytest.raises(GatewayRejected) as twice:
        await gateway.capture(payment_id, 7000, "INR")
    assert "already been captured" in rejected(twice)["gateway_description"]


async def test_bad_input_and_unknown_ids_answer_in_razorpays_format(gateway, http):
    auth = (DEV_RAZORPAY_KEY_ID, DEV_RAZORPAY_KEY_SECRET)
    small = await http.post("/v1/orders", json={"amount": 99, "currency": "INR"}, auth=auth)
    assert small.status_code == 400
    assert small.json() == {
        "error": {
            "code": "BAD_REQUEST_ERROR",
            "description": "The amount must be atleast INR 1.00",
            "source": "business",
            "step": "payment_initiation",
            "reason": "input_validation_failed",
            "metadata": {},
            "field": "amount",
        }
    }
    missing = await http.post("/v1/orders", json={"currency": "INR"}, auth=auth)
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "amount"
    garbage = await http.post(
        "/v1/orders", content=b"{nope", headers={"content-type": "application/json"}, auth=auth
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "BAD_REQUEST_ERROR"
    unreadable = await http.post(  # not even UTF-8: FastAPI's own 400, still in Razorpay's format
        "/v1/orders", content=b"\xff\xfe", headers={"content-type": "application/json"}, auth=auth
    )
    assert unreadable.status_code == 400 and unreadable.json()["error"]["code"] == "BAD_REQUEST_ERROR"
    for fetch in (gateway.fetch_order, gateway.fetch_payment, gateway.fetch_refund):
        with pytest.raises(GatewayRejected) as unknown:
            await fetch("pay_00000000000000")
        assert rejected(unknown)["gateway_description"] == "The id provided does not exist"
    with pytest.raises(GatewayRejected):
        await gateway.fetch_order("../payments/x")  # quoted into one path segment


async def test_checkout_page_has_pay_and_fail_buttons(gateway, http):
    order = await gateway.create_order(12345, "INR", "rcpt-7", {})
    page = await http.get(f"/sandbox/checkout/{order.id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert order.id in page.text and "INR 123.45" in page.text
    assert ">Pay</button>" in page.text and ">Fail</button>" in page.text


# ---------------------------------------------------------------- webhooks


def assert_signed(delivery: Delivery) -> None:
    assert delivery.headers["content-type"] == "application/json"
    assert verify_webhook(
        DEV_RAZORPAY_WEBHOOK_SECRET, delivery.body, delivery.headers["x-razorpay-signature"]
    )


async def test_webhooks_are_signed_razorpay_events_in_order(gateway, http, receiver: Receiver):
    order = await gateway.create_order(20000, "INR", "rcpt-w1", {})
    result = await pay(http, order.id, webhooks={"url": receiver.url})
    assert result["webhooks_delivered"] is True
    deliveries = await receiver.wait_for(3)
    assert len(deliveries) == 3
    for delivery in deliveries:
        assert_signed(delivery)
    assert [(d.event_id, d.event.event) for d in deliveries] == [
        (e["id"], e["event"]) for e in result["events"]
    ]
    assert len({d.event_id for d in deliveries}) == 3
    captured = deliveries[1].event
    assert captured.entity == "event" and captured.account_id == "acc_sandbox"
    assert captured.contains == ["payment"] and captured.payload.payment is not None
    assert captured.payload.payment.entity.id == result["payment"]["id"]
    assert captured.payload.payment.entity.status == "captured"
    assert deliveries[0].event.payload.payment is not None
    assert deliveries[0].event.payload.payment.entity.status == "authorized"
    paid = deliveries[2].event
    assert paid.contains == ["payment", "order"] and paid.payload.order is not None
    assert paid.payload.order.entity.status == "paid"
    # The signature covers the exact bytes: the same JSON re-serialised does not verify.
    reserialised = json.dumps(json.loads(deliveries[0].body)).encode()
    assert not verify_webhook(
        DEV_RAZORPAY_WEBHOOK_SECRET, reserialised, deliveries[0].headers["x-razorpay-signature"]
    )


async def test_duplicates_are_identical_deliveries_with_one_event_id(gateway, http, receiver: Receiver):
    order = await gateway.create_order(20000, "INR", "rcpt-w2", {})
    result = await pay(http, order.id, outcome="failure", webhooks={"url": receiver.url, "duplicates": 3})
    deliveries = await receiver.wait_for(3)
    assert len(deliveries) == 3
    (event,) = result["events"]
    assert {d.event_id for d in deliveries} == {event["id"]}
    assert len({d.body for d in deliveries}) == 1
    assert len({d.headers["x-razorpay-signature"] for d in deliveries}) == 1
    assert deliveries[0].event.event == "payment.failed"
    for delivery in deliveries:
        assert_signed(delivery)


async def test_reverse_delivers_an_actions_events_out_of_order(gateway, http, receiver: Receiver):
    order = await gateway.create_order(20000, "INR", "rcpt-w3", {})
    result = await pay(http, order.id, webhooks={"url": receiver.url, "reverse": True})
    deliveries = await receiver.wait_for(3)
    assert [d.event.event for d in deliveries] == ["order.paid", "payment.captured", "payment.authorized"]
    assert [d.event_id for d in deliveries] == [e["id"] for e in reversed(result["events"])]


async def test_failed_delivery_is_retried_with_the_same_event_id(gateway, http, receiver: Receiver):
    receiver.fail_first = 2
    order = await gateway.create_order(20000, "INR", "rcpt-w4", {})
    result = await pay(http, order.id, outcome="failure", webhooks={"url": receiver.url})
    (delivery,) = await receiver.wait_for(1)
    assert receiver.seen == 3  # two 500s, then accepted
    assert delivery.event_id == result["events"][0]["id"]
    assert_signed(delivery)


async def test_dropped_webhooks_are_not_sent(gateway, http, receiver: Receiver):
    order = await gateway.create_order(20000, "INR", "rcpt-w5", {})
    result = await pay(http, order.id, webhooks={"url": receiver.url, "deliver": False})
    assert result["webhooks_delivered"] is False and len(result["events"]) == 3
    await asyncio.sleep(1)
    assert receiver.seen == 0


async def test_refunds_raise_refund_processed_to_the_payments_webhook_url(gateway, http, receiver: Receiver):
    order = await gateway.create_order(20000, "INR", "rcpt-w6", {})
    payment_id = (await pay(http, order.id, webhooks={"url": receiver.url}))["payment"]["id"]
    await receiver.wait_for(3)
    refund = await gateway.refund(payment_id, 5000, idempotency_key="w6")
    await gateway.refund(payment_id, 5000, idempotency_key="w6")  # a replay raises nothing new
    deliveries = await receiver.wait_for(4)
    assert len(deliveries) == 4
    event = deliveries[3].event
    assert event.event == "refund.processed" and event.contains == ["refund", "payment"]
    assert event.payload.refund is not None and event.payload.refund.entity.id == refund.id
    assert event.payload.payment is not None and event.payload.payment.entity.amount_refunded == 5000
    assert_signed(deliveries[3])


# ---------------------------------------------------------------- production


def test_sandbox_routes_are_404_in_production(live: Live):
    """The sandbox app started with production settings, under uvicorn, over HTTP."""
    with production_app(live, "deployments.sandbox_gateway:api") as base:
        auth = ("rzp_live_x", "live-secret")
        for method, path in [
            ("POST", "/v1/orders"),
            ("GET", "/v1/orders/order_00000000000000"),
            ("POST", "/v1/payments/pay_00000000000000/refund"),
            ("POST", "/sandbox/orders/order_00000000000000/pay"),
            ("GET", "/sandbox/checkout/order_00000000000000"),
        ]:
            response = httpx.request(method, base + path, json={"amount": 100, "currency": "INR"}, auth=auth)
            assert response.status_code == 404 and response.json()["code"] == "not_found", path
