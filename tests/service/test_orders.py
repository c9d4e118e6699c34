"""Checkout and the order lifecycle through the real backend: Serve, the cart shards, the
sandbox gateway over HTTP, signed webhooks, the outbox relay and the janitor actors,
PostgreSQL and Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import ray

from deployments.cli import main
from tests.conftest import Live, Session
from tests.service.shop import Shop, add, add_address, cart, make_coupon, make_product, make_shop

pytestmark = pytest.mark.usefixtures("live")


@pytest.fixture(scope="module")
def shop(live: Live) -> Shop:
    return make_shop(live, "orders-test")


# ---------------------------------------------------------------- helpers


def checkout(
    user: Session, address_id: str, method: str = "cod", *, key: str | None = None, tip: int = 0
) -> httpx.Response:
    return user.request(
        "POST",
        "/orders",
        json={"address_id": address_id, "payment_method": method, "tip_paise": tip},
        headers={"Idempotency-Key": key or uuid.uuid4().hex},
    )


def buyer(live: Live, shop: Shop, items: dict[str, int]) -> tuple[Session, str]:
    """A fresh customer with an address at store A and these items in the cart."""
    user = live.login()
    address = add_address(user, shop.store_a, default=True)
    for pid, quantity in items.items():
        response = add(user, pid, quantity)
        assert response.status_code == 200, response.text
    return user, address


def stock(live: Live, shop: Shop, pid: str) -> tuple[int, int]:
    row = live.sql(
        "SELECT on_hand, reserved FROM inventory WHERE store_id = :s AND product_id = :p",
        s=shop.store_a["id"],
        p=pid,
    )[0]
    return int(row.on_hand), int(row.reserved)


def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def order(user: Session, order_id: str) -> dict[str, Any]:
    response = user.request("GET", f"/orders/{order_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def db_order(live: Live, order_id: str) -> Any:
    return live.sql(
        "SELECT o.status, p.status AS payment_status FROM orders o JOIN payments p ON p.order_id = o.id"
        " WHERE o.id = :id",
        id=order_id,
    )[0]


def status_becomes(
    live: Live, user: Session, order_id: str, status: str, timeout: float = 20
) -> dict[str, Any]:
    """Wait (watching the database, not the rate-limited API) for the order to reach a status."""
    wait_for(lambda: db_order(live, order_id).status == status, timeout, status)
    return order(user, order_id)


def refund_completes(live: Live, user: Session, order_id: str) -> dict[str, Any]:
    wait_for(lambda: db_order(live, order_id).payment_status == "refunded", what="the refund")
    return order(user, order_id)


def pay(live: Live, gateway_order_id: str, outcome: str = "success", **webhooks: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{live.base_url}/sandbox-gateway/sandbox/orders/{gateway_order_id}/pay",
        json={"outcome": outcome, "webhooks": webhooks},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def staff_of(live: Live, store: dict[str, Any], role: str = "staff") -> Session:
    session = live.login()
    live.sql(
        "UPDATE users SET role = :role, store_id = :s WHERE id = :id",
        role=role,
        s=store["id"] if role == "staff" else None,
        id=session.user_id,
    )
    return session


def move(user: Session, order_id: str, to: str, **extra: Any) -> httpx.Response:
    return user.request("POST", f"/orders/{order_id}/transitions", json={"to": to, **extra})


def janitor(job: str) -> int:
    actor = ray.get_actor("janitor", namespace="vurksha")
    return int(ray.get(actor.run.remote(job)))


# ---------------------------------------------------------------- checkout


def test_cod_checkout_prices_on_the_server_reserves_stock_and_empties_the_cart(live: Live, shop: Shop):
    rice = make_product(live, shop, price=10000, mrp=12000, tax_bp=500, stock_a=10)
    oil = make_product(live, shop, price=25000, tax_bp=1800, stock_a=5)
    user, address = buyer(live, shop, {rice: 3, oil: 1})
    priced = cart(user)["breakdown"]

    response = checkout(user, address, "cod", tip=2000)
    assert response.status_code == 201, response.text
    assert response.headers["Idempotent-Replayed"] == "false"
    placed = response.json()
    assert placed["status"] == "placed" and placed["payment_method"] == "cod" and placed["version"] == 1
    totals = placed["totals"]
    assert totals["subtotal_paise"] == priced["subtotal_paise"] == 55000
    assert totals["gst_paise"] == priced["gst_paise"] and totals["tip_paise"] == 2000
    assert totals["total_paise"] == priced["total_paise"] + 2000
    assert [(line["product_id"], line["quantity"]) for line in placed["lines"]] == [(rice, 3), (oil, 1)]
    assert placed["payment"]["status"] == "cod_pending" and placed["razorpay_key_id"] is None
    assert placed["reservation_expires_at"] is None
    assert [(e["from_status"], e["to_status"], e["actor"]) for e in placed["events"]] == [
        (None, "placed", "customer")
    ]
    assert stock(live, shop, rice) == (10, 3) and stock(live, shop, oil) == (5, 1)
    assert cart(user)["lines"] == []
    # The same cart cannot be ordered twice, and an empty one not at all.
    response = checkout(user, address, "cod")
    assert response.status_code == 409 and response.json()["code"] == "cart_empty"
    events = live.sql("SELECT topic FROM outbox WHERE aggregate_id = :id", id=placed["id"])
    assert [e.topic for e in events] == ["order.placed"]
    assert live.sql("SELECT first_order_at IS NOT NULL AS set FROM users WHERE id = :id", id=user.user_id)[
        0
    ].set


def test_checkout_input_errors(live: Live, shop: Shop):
    rice = make_product(live, shop, price=10000, stock_a=10)
    user, address = buyer(live, shop, {rice: 1})
    response = user.request("POST", "/orders", json={"address_id": address, "payment_method": "cod"})
    assert response.status_code == 400 and response.json()["code"] == "idempotency_key_required"
    response = checkout(user, address, key="bad key with spaces")
    assert response.status_code == 400 and response.json()["code"] == "invalid_idempotency_key"
    response = checkout(user, address, "bitcoin")
    assert response.status_code == 422
    response = checkout(user, address, tip=10_000_000)
    assert response.status_code == 422 and response.json()["code"] == "tip_too_large"
    _, other_address = buyer(live, shop, {})
    response = checkout(user, other_address)  # someone else's address
    assert response.status_code == 404 and response.json()["code"] == "address_not_found"
    response = user.request(
        "POST",
        "/orders",
        json={"address_id": address, "payment_method": "cod", "total_paise": 1},
        headers={"Idempotency-Key": "k1"},
    )
    assert response.status_code == 422  # the client never sends a price
    assert stock(live, shop, rice) == (10, 0)
    assert cart(user)["lines"] != []


def test_insufficient_stock_reserves_nothing(live: Live, shop: Shop):
    plenty = make_product(live, shop, price=5000, stock_a=50)
    scarce = make_product(live, shop, price=5000, stock_a=3)
    user, address = buyer(live, shop, {plenty: 5, scarce: 3})
    live.sql(
        "UPDATE inventory SET on_hand = 2 WHERE store_id = :s AND product_id = :p",
        s=shop.store_a["id"],
        p=scarce,
    )
    response = checkout(user, address)
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["code"] == "insufficient_stock"
    assert body["lines"] == [
        {"product_id": scarce, "requested": 3, "available_quantity": 2, "reason": "insufficient_stock"}
    ]
    assert stock(live, shop, plenty) == (50, 0) and stock(live, shop, scarce) == (2, 0)
    assert live.sql("SELECT count(*) AS n FROM orders WHERE user_id = :u", u=user.user_id)[0].n == 0


# ---------------------------------------------------------------- online payment


def test_online_checkout_pays_through_the_gateway_and_webhook(live: Live, shop: Shop):
    rice = make_product(live, shop, price=30000, stock_a=10)
    user, address = buyer(live, shop, {rice: 2})
    response = checkout(user, address, "online")
    assert response.status_code == 201, response.text
    pending = response.json()
    assert pending["status"] == "pending_payment"
    assert pending["payment"]["razorpay_order_id"].startswith("order_")
    assert pending["razorpay_key_id"] and pending["reservation_expires_at"] is not None
    assert stock(live, shop, rice) == (10, 2)

    pay(live, pending["payment"]["razorpay_order_id"])
    placed = status_becomes(live, user, pending["id"], "placed")
    assert placed["payment"]["status"] == "captured"
    assert placed["payment"]["captured_paise"] == placed["totals"]["total_paise"]
    assert placed["payment"]["razorpay_payment_id"].startswith("pay_")
    assert placed["reservation_expires_at"] is None and placed["version"] == 2
    assert [(e["to_status"], e["actor"]) for e in placed["events"]] == [
        ("pending_payment", "customer"),
        ("placed", "gateway"),
    ]
    assert stock(live, shop, rice) == (10, 2)


def test_failed_payment_then_success(live: Live, shop: Shop):
    rice = make_product(live, shop, price=30000, stock_a=10)
    user, address = buyer(live, shop, {rice: 1})
    pending = checkout(user, address, "online").json()
    gateway_order = pending["payment"]["razorpay_order_id"]
    pay(live, gateway_order, "failure")
    failed = status_becomes(live, user, pending["id"], "payment_failed")
    assert failed["payment"]["status"] == "failed"
    assert stock(live, shop, rice) == (10, 1)  # held until the reservation expires
    pay(live, gateway_order, "success")
    status_becomes(live, user, pending["id"], "placed")


def test_reservation_expiry_releases_stock(live: Live, shop: Shop):
    rice = make_product(live, shop, price=30000, stock_a=4)
    user, address = buyer(live, shop, {rice: 3})
    pending = checkout(user, address, "online").json()
    assert stock(live, shop, rice) == (4, 3)
    live.sql(
        "UPDATE orders SET reservation_expires_at = now() - interval '1 second' WHERE id = :id",
        id=pending["id"],
    )
    janitor("expire")  # (or its own sweep, every 15 s, got there first: either way it is expired)
    cancelled = order(user, pending["id"])
    assert cancelled["status"] == "cancelled" and cancelled["cancel_reason"] == "payment not received in time"
    assert stock(live, shop, rice) == (4, 0)
    # Paying afterwards does not revive it: the money goes back.
    pay(live, pending["payment"]["razorpay_order_id"])
    refunded = refund_completes(live, user, pending["id"])
    assert (
        refunded["status"] == "cancelled"
        and refunded["totals"]["refunded_paise"] == refunded["totals"]["total_paise"]
    )
    assert stock(live, shop, rice) == (4, 0)


def test_dropped_webhook_is_reconciled(live: Live, shop: Shop):
    rice = make_product(live, shop, price=30000, stock_a=4)
    user, address = buyer(live, shop, {rice: 1})
    pending = checkout(user, address, "online").json()
    pay(live, pending["payment"]["razorpay_order_id"], deliver=False)
    time.sleep(1.5)  # older than reconcile_after_seconds (1 s in tests)
    assert order(user, pending["id"])["status"] == "pending_payment"
    assert janitor("reconcile") >= 1
    assert order(user, pending["id"])["status"] == "placed"


# ---------------------------------------------------------------- lifecycle


def test_lifecycle_staff_transitions_and_history(live: Live, shop: Shop):
    rice = make_product(live, shop, price=10000, stock_a=10)
    user, address = buyer(live, shop, {rice: 2})
    placed = checkout(user, address).json()
    staff = staff_of(live, shop.store_a)
    elsewhere = staff_of(live, shop.store_b)

    response = move(user, placed["id"], "confirmed")
    assert response.status_code == 403 and response.json()["code"] == "forbidden_role"
    response = move(elsewhere, placed["id"], "confirmed")
    assert response.status_code == 404  # another store's staff cannot even see it
    response = move(staff, placed["id"], "packed")
    assert response.status_code == 409 and response.json()["code"] == "invalid_transition"
    response = move(staff, placed["id"], "confirmed", version=7)
    assert response.status_code == 409 and response.json()["code"] == "version_conflict"
    assert move(staff, placed["id"], "confirmed", version=1).status_code == 200
    assert move(staff, placed["id"], "packed").status_code == 200
    queue = staff.request("GET", f"/orders/stores/{shop.store_a['id']}", params={"status": "packed"})
    assert queue.status_code == 200 and placed["id"] in [o["id"] for o in queue.json()["items"]]
    assert elsewhere.request("GET", f"/orders/stores/{shop.store_a['id']}").status_code == 403
    # The delivery service drives the rest; the store cannot, ops only with a reason.
    response = move(staff, placed["id"], "out_for_delivery")
    assert response.status_code == 403 and response.json()["code"] == "forbidden_transition"
    ops = staff_of(live, shop.store_a, role="ops")
    response = move(ops, placed["id"], "out_for_delivery")
    assert response.status_code == 422 and response.json()["code"] == "reason_required"
    assert move(ops, placed["id"], "out_for_delivery", reason="handed over at the counter").status_code == 200
    assert stock(live, shop, rice) == (8, 0)  # off the shelf
    response = user.request("POST", f"/orders/{placed['id']}/cancel", json={})
    assert response.status_code == 409 and response.json()["code"] == "invalid_transition"
    delivered = move(ops, placed["id"], "delivered", reason="customer confirmed by phone").json()
    assert delivered["status"] == "delivered" and delivered["version"] == 5
    assert [e["to_status"] for e in delivered["events"]] == [
        "placed",
        "confirmed",
        "packed",
        "out_for_delivery",
        "delivered",
    ]
    with pytest.raises(Exception, match="append-only"):
        live.sql("UPDATE order_events SET reason = 'rewritten' WHERE order_id = :id", id=placed["id"])
    assert stock(live, shop, rice) == (8, 0)


def test_customer_cancel_releases_stock_and_coupon_and_refunds(live: Live, shop: Shop):
    rice = make_product(live, shop, price=30000, stock_a=10)
    code = make_coupon(live, value=5000, total_limit=1)
    user, address = buyer(live, shop, {rice: 2})
    assert user.request("POST", "/carts/me/coupon", json={"code": code}).status_code == 200
    pending = checkout(user, address, "online").json()
    assert pending["totals"]["coupon_discount_paise"] == 5000
    pay(live, pending["payment"]["razorpay_order_id"])
    placed = status_becomes(live, user, pending["id"], "placed")

    other = live.login()
    assert other.request("POST", f"/orders/{placed['id']}/cancel", json={}).status_code == 404
    assert other.request("GET", f"/orders/{placed['id']}").status_code == 404

    response = user.request(
        "POST", f"/orders/{placed['id']}/cancel", json={"reason": "changed my mind", "version": 2}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert stock(live, shop, rice) == (10, 0)
    assert live.sql("SELECT count(*) AS n FROM coupon_redemptions WHERE coupon_code = :c", c=code)[0].n == 0
    refunded = refund_completes(live, user, placed["id"])
    assert refunded["totals"]["refunded_paise"] == refunded["totals"]["total_paise"]
    detail = user.request("GET", f"/orders/{placed['id']}".replace("/orders/", "/payments/orders/")).json()
    assert [(r["amount_paise"], r["status"]) for r in detail["refunds"]] == [
        (refunded["totals"]["total_paise"], "processed")
    ]
    response = user.request("POST", f"/orders/{placed['id']}/cancel", json={})
    assert response.status_code == 409 and response.json()["code"] == "invalid_transition"


def test_history_pages_newest_first(live: Live, shop: Shop):
    rice = make_product(live, shop, price=10000, stock_a=50)
    user, address = buyer(live, shop, {})
    ids = []
    for _ in range(5):
        assert add(user, rice).status_code == 200
        response = checkout(user, address)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = user.request("GET", "/orders", params=params).json()
        seen += [o["id"] for o in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    response = user.request("GET", "/orders", params={"cursor": "garbage!"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_cursor"


# ---------------------------------------------------------------- refunds


def refund(
    user: Session, order_id: str, amount: int | None, key: str, reason: str = "damaged item"
) -> httpx.Response:
    body: dict[str, Any] = {"order_id": order_id, "reason": reason}
    if amount is not None:
        body["amount_paise"] = amount
    return user.request("POST", "/payments/refunds", json=body, headers={"Idempotency-Key": key})


def paid_and_delivered(live: Live, shop: Shop) -> tuple[Session, dict[str, Any]]:
    rice = make_product(live, shop, price=30000, stock_a=10)
    user, address = buyer(live, shop, {rice: 2})
    pending = checkout(user, address, "online").json()
    pay(live, pending["payment"]["razorpay_order_id"])
    status_becomes(live, user, pending["id"], "placed")
    staff = staff_of(live, shop.store_a)
    ops = staff_of(live, shop.store_a, role="ops")
    for to in ("confirmed", "packed"):
        assert move(staff, pending["id"], to).status_code == 200
    for to in ("out_for_delivery", "delivered"):
        assert move(ops, pending["id"], to, reason="test: no partner in this shop").status_code == 200
    return user, order(user, pending["id"])


def test_partial_refunds_up_to_the_captured_amount(live: Live, shop: Shop):
    user, delivered = paid_and_delivered(live, shop)
    total = delivered["totals"]["total_paise"]
    ops = staff_of(live, shop.store_a, role="ops")
    staff = staff_of(live, shop.store_a)
    assert refund(user, delivered["id"], 100, "k0").status_code == 403
    assert refund(staff, delivered["id"], 100, "k0").status_code == 403
    response = ops.request("POST", "/payments/refunds", json={"order_id": delivered["id"], "reason": "x"})
    assert response.status_code == 400 and response.json()["code"] == "idempotency_key_required"

    first = refund(ops, delivered["id"], 10000, "k1")
    assert first.status_code == 201 and first.json()["status"] == "pending", first.text
    again = refund(ops, delivered["id"], 10000, "k1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    response = refund(ops, delivered["id"], 999, "k1")
    assert response.status_code == 422 and response.json()["code"] == "idempotency_key_reused"
    partial = status_becomes(live, user, delivered["id"], "partially_refunded")
    assert (
        partial["totals"]["refunded_paise"] == 10000 and partial["payment"]["status"] == "partially_refunded"
    )

    response = refund(ops, delivered["id"], total, "k2")
    assert response.status_code == 422 and response.json()["code"] == "refund_exceeds_captured"
    assert response.json()["refundable_paise"] == total - 10000
    rest = refund(ops, delivered["id"], None, "k3")  # everything not yet refunded
    assert rest.status_code == 201 and rest.json()["amount_paise"] == total - 10000
    done = status_becomes(live, user, delivered["id"], "refunded")
    assert done["totals"]["refunded_paise"] == total and done["payment"]["status"] == "refunded"
    response = refund(ops, delivered["id"], 1, "k4")
    assert response.status_code == 422 and response.json()["code"] == "refund_exceeds_captured"
    detail = user.request("GET", f"/payments/orders/{delivered['id']}").json()
    assert sorted((r["amount_paise"], r["status"]) for r in detail["refunds"]) == sorted(
        [(10000, "processed"), (total - 10000, "processed")]
    )
    assert all(r["razorpay_refund_id"].startswith("rfnd_") for r in detail["refunds"])
    # The gateway agrees: what it refunded is what we recorded.
    gateway = httpx.get(
        f"{live.base_url}/sandbox-gateway/v1/payments/{done['payment']['razorpay_payment_id']}",
        auth=("rzp_test_vurkshadev", "dev-only-razorpay-key-secret"),
    ).json()
    assert gateway["amount_refunded"] == total and gateway["status"] == "refunded"


def test_concurrent_refunds_never_exceed_the_capture(live: Live, shop: Shop):
    _, delivered = paid_and_delivered(live, shop)
    total = delivered["totals"]["total_paise"]
    ops = staff_of(live, shop.store_a, role="ops")
    share = total * 3 // 10
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda i: refund(ops, delivered["id"], share, f"c{i}"), range(10)))
    assert [r.status_code for r in responses].count(201) == 3
    assert {r.json()["code"] for r in responses if r.status_code != 201} == {"refund_exceeds_captured"}
    row = live.sql(
        "SELECT captured_paise, refund_reserved_paise FROM payments WHERE order_id = :o", o=delivered["id"]
    )[0]
    assert (row.captured_paise, row.refund_reserved_paise) == (total, 3 * share)


def test_cash_on_delivery_cannot_be_refunded_before_it_is_collected(live: Live, shop: Shop):
    rice = make_product(live, shop, price=30000, stock_a=10)
    user, address = buyer(live, shop, {rice: 1})
    placed = checkout(user, address).json()
    admin = staff_of(live, shop.store_a, role="admin")
    response = refund(admin, placed["id"], None, "cod1")
    assert response.status_code == 409 and response.json()["code"] == "not_refundable"


# ---------------------------------------------------------------- the outbox's dead letters


def test_an_event_its_subscriber_keeps_failing_is_dead_lettered(live: Live):
    # A malformed event (no event id) fails in the payments subscriber on every attempt.
    [row] = live.sql(
        "INSERT INTO outbox (topic, payload, status, pending) VALUES ('gateway.event', '{}', 'pending', ARRAY['payments'])"
        " RETURNING id"
    )
    live.sql("NOTIFY vurksha_outbox")
    dead = wait_for(
        lambda: (
            (
                r := live.sql("SELECT status, attempts, last_error FROM outbox WHERE id = :i", i=row.id)[0]
            ).status
            == "dead"
            and r
        ),
        timeout=60,
        what="dead letter",
    )
    assert dead.attempts == 5 and "KeyError" in dead.last_error
    # Ops fix the cause (here: the payload) and requeue it from the command line.
    live.sql("""UPDATE outbox SET payload = '{"event_id": "evt_missing"}' WHERE id = :i""", i=row.id)
    main(["outbox", "--requeue", str(row.id)])
    wait_for(
        lambda: live.sql("SELECT status FROM outbox WHERE id = :i", i=row.id)[0].status == "delivered",
        what="redelivery",
    )
