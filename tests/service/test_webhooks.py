"""Razorpay webhooks and the outbox relay through the real backend: signature checks on the
raw body, exactly one effect per event id however often and in whatever order events come,
and no event lost or applied twice when the relay actor is killed."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
import uuid
from typing import Any

import httpx
import pytest
import ray

from config.settings import DEV_RAZORPAY_WEBHOOK_SECRET
from models.gateway import sign_webhook
from tests.conftest import Live, fake_ip
from tests.service.shop import Shop, make_shop

pytestmark = pytest.mark.usefixtures("live")

WEBHOOK = "/payments/webhooks/razorpay"
AMOUNT = 25_000


@pytest.fixture(scope="module")
def shop(live: Live) -> Shop:
    return make_shop(live, "webhooks")


@pytest.fixture(scope="module")
def owner(live: Live) -> str:
    return live.login().user_id


def pending_orders(live: Live, shop: Shop, user_id: str, n: int) -> list[tuple[str, str]]:
    """n unpaid online orders with their gateway order ids, written directly (the checkout
    path has its own tests; these exercise what payment events do to such orders)."""
    tag = secrets.token_hex(4)
    rows = live.sql(
        """
        WITH o AS (
            INSERT INTO orders (id, user_id, store_id, delivery_address, status, payment_method,
                items_mrp_paise, subtotal_paise, coupon_discount_paise, taxable_value_paise, gst_paise,
                delivery_fee_paise, small_cart_fee_paise, tip_paise, total_paise, reservation,
                reservation_expires_at, cart_version, created_at, updated_at)
            SELECT gen_random_uuid(), :u, :s, '{}'::jsonb, 'pending_payment', 'online', :a, :a, 0, :a, 0,
                0, 0, 0, :a, 'held', now() + interval '1 hour', now() + make_interval(secs => i), now(), now()
            FROM generate_series(1, :n) AS i
            RETURNING id
        ), p AS (
            INSERT INTO payments (id, order_id, method, status, amount_paise, razorpay_order_id)
            SELECT gen_random_uuid(), id, 'online', 'created', :a, 'order_' || :tag || replace(id::text, '-', '')
            FROM o RETURNING order_id, razorpay_order_id
        ), e AS (
            INSERT INTO order_events (order_id, to_status, actor, created_at)
            SELECT id, 'pending_payment', 'customer', now() FROM o
        )
        SELECT order_id::text AS order_id, razorpay_order_id FROM p
        """,
        u=user_id,
        s=shop.store_a["id"],
        a=AMOUNT,
        n=n,
        tag=tag[:4],
    )
    return [(r.order_id, r.razorpay_order_id) for r in rows]


def payment_event(kind: str, gateway_order_id: str, payment_id: str | None = None) -> dict[str, Any]:
    """A webhook body in Razorpay's format (payment.captured / payment.failed)."""
    now = int(time.time())
    captured = kind == "payment.captured"
    return {
        "entity": "event",
        "account_id": "acc_test",
        "event": kind,
        "contains": ["payment"],
        "payload": {
            "payment": {
                "entity": {
                    "id": payment_id or "pay_" + secrets.token_hex(7),
                    "entity": "payment",
                    "amount": AMOUNT,
                    "currency": "INR",
                    "status": "captured" if captured else "failed",
                    "order_id": gateway_order_id,
                    "method": "upi",
                    "captured": captured,
                    "amount_refunded": 0,
                    "refund_status": None,
                    "error_code": None if captured else "BAD_REQUEST_ERROR",
                    "error_description": None if captured else "Payment failed",
                    "notes": [],
                    "created_at": now,
                }
            }
        },
        "created_at": now,
    }


def signed(body: dict[str, Any], event_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, {
        "Content-Type": "application/json",
        "X-Razorpay-Signature": sign_webhook(DEV_RAZORPAY_WEBHOOK_SECRET, raw),
        "X-Razorpay-Event-Id": event_id or "evt_" + secrets.token_hex(7),
    }


def post(live: Live, raw: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(live.base_url + WEBHOOK, content=raw, headers={**headers, "X-Forwarded-For": fake_ip()})


async def post_all(
    live: Live, deliveries: list[tuple[bytes, dict[str, str]]], concurrency: int = 32
) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:

        async def one(raw: bytes, headers: dict[str, str]) -> int:
            async with gate:
                return (await client.post(WEBHOOK, content=raw, headers=headers)).status_code

        return list(await asyncio.gather(*(one(raw, headers) for raw, headers in deliveries)))


def statuses(live: Live, order_ids: list[str]) -> dict[str, int]:
    rows = live.sql(
        "SELECT status, count(*) AS n FROM orders WHERE id = ANY(:ids) GROUP BY status",
        ids=[uuid.UUID(i) for i in order_ids],
    )
    return {r.status: r.n for r in rows}


def wait_all_placed(live: Live, order_ids: list[str], timeout: float = 120) -> None:
    wait_all(live, order_ids, "placed", timeout)


def wait_all(live: Live, order_ids: list[str], status: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while statuses(live, order_ids).get(status, 0) < len(order_ids):
        assert time.monotonic() < deadline, statuses(live, order_ids)
        time.sleep(0.5)


def effects(live: Live, order_ids: list[str]) -> tuple[int, int]:
    """(placed transitions in the history, order.placed events in the outbox) for these orders."""
    ids = [uuid.UUID(i) for i in order_ids]
    history = live.sql(
        "SELECT count(*) AS n FROM order_events WHERE order_id = ANY(:ids) AND to_status = 'placed'", ids=ids
    )[0].n
    events = live.sql(
        "SELECT count(*) AS n FROM outbox WHERE aggregate_id = ANY(:ids) AND topic = 'order.placed'", ids=ids
    )[0].n
    return history, events


def relay() -> Any:
    return ray.get_actor("outbox-relay", namespace="vurksha")


# ---------------------------------------------------------------- signatures


def test_tampered_body_or_signature_is_401_with_no_effect(live: Live, shop: Shop, owner: str):
    [(order_id, gateway_order)] = pending_orders(live, shop, owner, 1)
    raw, headers = signed(payment_event("payment.captured", gateway_order))

    tampered = raw.replace(str(AMOUNT).encode(), b"1")
    assert post(live, tampered, headers).status_code == 401
    forged = {**headers, "X-Razorpay-Signature": sign_webhook("not-the-secret", raw)}
    response = post(live, raw, forged)
    assert response.status_code == 401 and response.json()["code"] == "invalid_signature"
    missing = {k: v for k, v in headers.items() if k != "X-Razorpay-Signature"}
    assert post(live, raw, missing).status_code == 401
    # Re-serialised JSON (same data, other bytes) is not what was signed.
    reformatted = json.dumps(json.loads(raw), indent=1).encode()
    assert post(live, reformatted, headers).status_code == 401
    time.sleep(1)
    assert (
        live.sql(
            "SELECT count(*) AS n FROM gateway_events WHERE event_id = :e", e=headers["X-Razorpay-Event-Id"]
        )[0].n
        == 0
    )
    assert statuses(live, [order_id]) == {"pending_payment": 1}

    no_id = {k: v for k, v in headers.items() if k != "X-Razorpay-Event-Id"}
    response = post(live, raw, no_id)
    assert response.status_code == 400 and response.json()["code"] == "event_id_required"
    garbage, garbage_headers = signed({"hello": "world"})
    response = post(live, garbage, garbage_headers)
    assert response.status_code == 400 and response.json()["code"] == "invalid_event"

    response = post(live, raw, headers)
    assert response.status_code == 200 and response.json() == {"status": "ok", "duplicate": False}
    wait_all_placed(live, [order_id])


# ---------------------------------------------------------------- duplicates and order


def test_same_event_three_times_has_one_effect(live: Live, shop: Shop, owner: str):
    [(order_id, gateway_order)] = pending_orders(live, shop, owner, 1)
    raw, headers = signed(payment_event("payment.captured", gateway_order))
    answers = [post(live, raw, headers).json()["duplicate"] for _ in range(3)]
    assert answers == [False, True, True]
    wait_all_placed(live, [order_id])
    time.sleep(1)
    assert effects(live, [order_id]) == (1, 1)


def test_events_out_of_order_end_in_the_right_state(live: Live, shop: Shop, owner: str):
    (first, first_gw), (second, second_gw) = pending_orders(live, shop, owner, 2)
    # A failed attempt's event arrives after the capture: the capture stands.
    captured = signed(payment_event("payment.captured", first_gw))
    failed = signed(payment_event("payment.failed", first_gw))
    assert post(live, *captured).status_code == 200
    wait_all_placed(live, [first])
    assert post(live, *failed).status_code == 200
    # The other order: failure first, then the retry's capture. (Waiting for the failure to
    # take effect: the relay delivers a batch of events concurrently, so two posted back to
    # back may be applied in either order, and then the capture would make the failure late.)
    assert post(live, *signed(payment_event("payment.failed", second_gw))).status_code == 200
    wait_all(live, [second], "payment_failed")
    assert post(live, *signed(payment_event("payment.captured", second_gw))).status_code == 200
    wait_all_placed(live, [second])
    time.sleep(1.5)  # let the late failure be processed
    rows = live.sql(
        "SELECT o.id::text AS id, o.status, p.status AS payment FROM orders o JOIN payments p ON p.order_id = o.id"
        " WHERE o.id IN (:a, :b)",
        a=first,
        b=second,
    )
    assert {(r.id, r.status, r.payment) for r in rows} == {
        (first, "placed", "captured"),
        (second, "placed", "captured"),
    }
    history = live.sql("SELECT to_status FROM order_events WHERE order_id = :o ORDER BY id", o=second)
    assert [h.to_status for h in history] == ["pending_payment", "payment_failed", "placed"]


def test_sandbox_duplicates_and_reverse_order(live: Live, shop: Shop, owner: str):
    """Through the sandbox gateway's own delivery: every event three times, in reverse."""
    [(order_id, _)] = pending_orders(live, shop, owner, 1)
    client = httpx.Client(base_url=live.base_url + "/sandbox-gateway", timeout=30)
    gateway_order = client.post(
        "/v1/orders",
        json={"amount": AMOUNT, "currency": "INR", "receipt": order_id[:40]},
        auth=("rzp_test_vurkshadev", "dev-only-razorpay-key-secret"),
    )
    assert gateway_order.status_code == 200, gateway_order.text
    live.sql(
        "UPDATE payments SET razorpay_order_id = :g WHERE order_id = :o",
        g=gateway_order.json()["id"],
        o=order_id,
    )
    response = client.post(
        f"/sandbox/orders/{gateway_order.json()['id']}/pay",
        json={"outcome": "success", "webhooks": {"duplicates": 3, "reverse": True}},
    )
    assert response.status_code == 200, response.text
    wait_all_placed(live, [order_id])
    time.sleep(2)
    assert effects(live, [order_id]) == (1, 1)


def test_1000_events_each_delivered_3_times_have_exactly_1000_effects(live: Live, shop: Shop, owner: str):
    orders = pending_orders(live, shop, owner, 1000)
    deliveries = [signed(payment_event("payment.captured", gw)) for _, gw in orders] * 3
    random.Random(7).shuffle(deliveries)
    codes = asyncio.run(post_all(live, deliveries))
    assert codes == [200] * 3000
    order_ids = [o for o, _ in orders]
    wait_all_placed(live, order_ids)
    time.sleep(1)
    assert effects(live, order_ids) == (1000, 1000)
    recorded = live.sql(
        "SELECT count(*) AS n FROM gateway_events WHERE payload->'payload'->'payment'->'entity'->>'order_id' = ANY(:g)",
        g=[gw for _, gw in orders],
    )[0].n
    assert recorded == 1000


# ---------------------------------------------------------------- crash safety


def test_relay_killed_with_events_pending_delivers_all_once(live: Live, shop: Shop, owner: str):
    orders = pending_orders(live, shop, owner, 100)
    order_ids = [o for o, _ in orders]
    ray.get(relay().pause.remote())
    codes = asyncio.run(post_all(live, [signed(payment_event("payment.captured", gw)) for _, gw in orders]))
    assert codes == [200] * 100
    time.sleep(1)
    assert statuses(live, order_ids) == {"pending_payment": 100}
    pid = ray.get(relay().stats.remote()).pid
    ray.kill(relay(), no_restart=False)
    wait_all_placed(live, order_ids)
    assert ray.get(relay().stats.remote()).pid != pid
    assert effects(live, order_ids) == (100, 100)


def test_relay_killed_mid_delivery_redelivers_without_double_effects(live: Live, shop: Shop, owner: str):
    orders = pending_orders(live, shop, owner, 300)
    order_ids = [o for o, _ in orders]
    deliveries = [signed(payment_event("payment.captured", gw)) for _, gw in orders]
    codes = asyncio.run(post_all(live, deliveries))
    ray.kill(relay(), no_restart=False)  # while it is working through them
    assert codes == [200] * 300
    wait_all_placed(live, order_ids)
    time.sleep(1)
    assert effects(live, order_ids) == (300, 300)
    undelivered = live.sql(
        "SELECT count(*) AS n FROM outbox WHERE topic = 'gateway.event' AND status <> 'delivered'"
        " AND payload->>'event_id' = ANY(:ids)",
        ids=[headers["X-Razorpay-Event-Id"] for _, headers in deliveries],
    )[0].n
    deadline = time.monotonic() + 30
    while undelivered and time.monotonic() < deadline:
        time.sleep(0.5)
        undelivered = live.sql(
            "SELECT count(*) AS n FROM outbox WHERE topic = 'gateway.event' AND status <> 'delivered'"
            " AND payload->>'event_id' = ANY(:ids)",
            ids=[headers["X-Razorpay-Event-Id"] for _, headers in deliveries],
        )[0].n
    assert undelivered == 0
