"""Carts through the real backend: shard actors, Redis write-through, PostgreSQL stock and
coupons. Every test builds its own stores (at random remote points, so no other store is
nearer), products and coupons, and tolerates any other rows."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

import httpx
import pytest
import redis

from tests.conftest import Live, fake_ip
from tests.service.shop import (
    Shop,
    add,
    add_address,
    cart,
    customer,
    line,
    make_coupon,
    make_product,
    make_shop,
    quantities,
    set_stock,
)

pytestmark = pytest.mark.usefixtures("live")


@pytest.fixture(scope="module")
def shop(live: Live) -> Shop:
    return make_shop(live, "cart-test")


# ---------------------------------------------------------------- operations and pricing


def test_cart_operations_and_price_breakdown(live: Live, shop: Shop):
    user = customer(live, shop.store_a)
    empty = cart(user)
    assert empty["lines"] == [] and empty["breakdown"]["total_paise"] == 0
    assert empty["store"]["id"] == shop.store_a["id"]

    rice = make_product(live, shop, price=10000, mrp=12000, tax_bp=500)
    oil = make_product(live, shop, price=25000, tax_bp=1800)
    assert add(user, rice, 2).status_code == 200
    response = add(user, rice)  # adds to the line
    assert response.status_code == 200, response.text
    assert line(response.json(), rice)["quantity"] == 3
    view = add(user, oil).json()
    assert [item["product_id"] for item in view["lines"]] == [rice, oil]  # order of adding
    b = view["breakdown"]
    assert b["subtotal_paise"] == 3 * 10000 + 25000
    assert b["items_mrp_paise"] == 3 * 12000 + 25000 and b["mrp_savings_paise"] == 6000
    assert b["delivery_fee_paise"] == 0  # 550.00 >= the 499.00 free-delivery threshold
    assert b["small_cart_fee_paise"] == 0
    assert b["total_paise"] == 55000
    assert line(view, rice)["gst_paise"] == 1429  # 30000 * 5/105 = 1428.57
    assert line(view, oil)["gst_paise"] == 3814  # 25000 * 18/118 = 3813.56
    assert b["gst_paise"] == 1429 + 3814 and b["taxable_value_paise"] == 55000 - 1429 - 3814
    assert view["item_count"] == 4 and view["expires_at"] is not None

    response = user.request("PATCH", f"/carts/me/items/{rice}", json={"quantity": 1})
    assert response.status_code == 200, response.text
    b = response.json()["breakdown"]
    assert b["subtotal_paise"] == 35000 and b["delivery_fee_paise"] == 3000
    assert b["total_paise"] == 38000

    response = user.request("DELETE", f"/carts/me/items/{oil}")
    assert response.status_code == 200 and quantities(response.json()) == {rice: 1}
    response = user.request("DELETE", f"/carts/me/items/{oil}")
    assert response.status_code == 404 and response.json()["code"] == "item_not_in_cart"
    response = user.request("PATCH", f"/carts/me/items/{oil}", json={"quantity": 2})
    assert response.status_code == 404 and response.json()["code"] == "item_not_in_cart"

    # A small cart pays the small-cart fee as well as delivery.
    b = cart(user)["breakdown"]
    assert (b["subtotal_paise"], b["small_cart_fee_paise"], b["delivery_fee_paise"]) == (10000, 0, 3000)
    cheap = make_product(live, shop, price=2000)
    user.request("DELETE", f"/carts/me/items/{rice}")
    b = add(user, cheap, 2).json()["breakdown"]
    assert (b["small_cart_fee_paise"], b["delivery_fee_paise"], b["total_paise"]) == (1500, 3000, 8500)

    response = user.request("DELETE", "/carts/me")
    assert response.status_code == 200
    assert response.json()["lines"] == [] and cart(user)["lines"] == []


def test_item_validation(live: Live, shop: Shop):
    user = customer(live, shop.store_a)
    pid = make_product(live, shop, price=1000, stock_a=100)
    inactive = make_product(live, shop, price=1000, active=False)
    cases = [
        ({"product_id": pid, "quantity": 0}, 422, "validation_error"),
        ({"product_id": pid, "quantity": "2"}, 422, "validation_error"),  # a number, not a string
        ({"product_id": pid, "quantity": 1.5}, 422, "validation_error"),
        ({"product_id": pid, "quantity": 21}, 422, "quantity_limit"),
        ({"product_id": pid, "quantity": 1, "price_paise": 1}, 422, "validation_error"),
        ({"product_id": str(uuid.uuid4()), "quantity": 1}, 404, "product_not_found"),
        ({"product_id": inactive, "quantity": 1}, 409, "product_inactive"),
    ]
    for body, status, code in cases:
        response = user.request("POST", "/carts/me/items", json=body)
        assert (response.status_code, response.json()["code"]) == (status, code), body
    assert add(user, pid, 20).status_code == 200
    response = add(user, pid)  # 21 in total
    assert response.status_code == 422 and response.json()["max_quantity"] == 20
    response = user.request("PATCH", f"/carts/me/items/{pid}", json={"quantity": 0})
    assert response.status_code == 422
    assert quantities(cart(user)) == {pid: 20}
    # 3.0 is an integer, as the document's `integer` says (JSON Schema), and is kept as 3.
    response = user.request("PATCH", f"/carts/me/items/{pid}", json={"quantity": 3.0})
    assert response.status_code == 200 and quantities(response.json()) == {pid: 3}


def test_distinct_items_are_bounded(live: Live, shop: Shop):
    user = customer(live, shop.store_a)
    for _ in range(50):
        assert add(user, make_product(live, shop, price=100)).status_code == 200
    response = add(user, make_product(live, shop, price=100))
    assert response.status_code == 409 and response.json()["code"] == "cart_full"
    assert len(cart(user)["lines"]) == 50


def test_stock_is_validated_and_lost_stock_is_flagged(live: Live, shop: Shop):
    user = customer(live, shop.store_a)
    scarce = make_product(live, shop, price=5000, stock_a=5, reserved_a=2)  # 3 sellable
    fading = make_product(live, shop, price=60000, stock_a=4)
    unstocked = make_product(live, shop, price=5000, stock_a=None)

    response = add(user, scarce, 4)
    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "insufficient_stock" and body["available_quantity"] == 3
    assert add(user, scarce, 3).status_code == 200
    response = add(user, scarce)  # 4 in total
    assert response.status_code == 409 and response.json()["available_quantity"] == 3
    response = add(user, unstocked)
    assert response.status_code == 409 and response.json()["available_quantity"] == 0

    assert add(user, fading, 2).status_code == 200
    assert cart(user)["breakdown"]["subtotal_paise"] == 3 * 5000 + 2 * 60000

    set_stock(live, shop.store_a, fading, 0)
    set_stock(live, shop.store_a, scarce, 5, 3)  # only 2 sellable now, 3 in the cart
    view = cart(user)
    gone, short = line(view, fading), line(view, scarce)
    assert (gone["available"], gone["available_quantity"], gone["unavailable_reason"]) == (
        False,
        0,
        "out_of_stock",
    )
    assert (short["available"], short["available_quantity"], short["unavailable_reason"]) == (
        False,
        2,
        "insufficient_stock",
    )
    assert gone["quantity"] == 2 and short["quantity"] == 3  # kept, not dropped
    assert view["breakdown"]["subtotal_paise"] == 0 and view["item_count"] == 0

    live.sql("UPDATE products SET is_active = false WHERE id = :p", p=fading)
    set_stock(live, shop.store_a, fading, 10)
    assert line(cart(user), fading)["unavailable_reason"] == "product_inactive"
    response = user.request("PATCH", f"/carts/me/items/{scarce}", json={"quantity": 2})
    assert response.status_code == 200 and line(response.json(), scarce)["available"] is True


# ---------------------------------------------------------------- coupons


def test_coupons(live: Live, shop: Shop):
    user = customer(live, shop.store_a)
    pid = make_product(live, shop, price=20000, stock_a=100)
    assert add(user, pid, 3).status_code == 200  # 600.00

    def apply(code: str) -> httpx.Response:
        return user.request("POST", "/carts/me/coupon", json={"code": code})

    percent = make_coupon(live, kind="percent", value=1500, max_discount_paise=5000)
    response = apply(percent.lower())  # codes are case-insensitive
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["coupon"] == {
        "code": percent,
        "applied": True,
        "discount_paise": 5000,  # 15 % = 90.00, capped at 50.00
        "reason": None,
        "message": None,
    }
    assert view["breakdown"]["total_paise"] == 60000 - 5000
    assert view["breakdown"]["total_savings_paise"] == 5000

    minimum = make_coupon(live, value=10000, min_order_paise=50000)
    response = apply(minimum)
    assert response.status_code == 200 and response.json()["breakdown"]["coupon_discount_paise"] == 10000
    # Falling below the minimum keeps the coupon but stops it applying, and says why.
    view = user.request("PATCH", f"/carts/me/items/{pid}", json={"quantity": 2}).json()
    assert view["coupon"]["applied"] is False and view["coupon"]["reason"] == "coupon_min_order"
    assert (
        view["breakdown"]["coupon_discount_paise"] == 0 and view["breakdown"]["total_paise"] == 40000 + 3000
    )  # delivery below 499.00
    response = apply(minimum)
    assert response.status_code == 422
    assert response.json()["code"] == "coupon_min_order" and response.json()["shortfall_paise"] == 10000

    live.sql("UPDATE users SET first_order_at = now() WHERE id = :u", u=user.user_id)
    used = make_coupon(live, per_user_limit=1)
    live.sql(
        "INSERT INTO coupon_redemptions (id, coupon_code, user_id) VALUES (:id, :c, :u)",
        id=str(uuid.uuid4()),
        c=used,
        u=user.user_id,
    )
    cases = [
        ("NOSUCHCOUPON" + secrets.token_hex(3).upper(), 404, "coupon_not_found"),
        (make_coupon(live, is_active=False), 404, "coupon_not_found"),
        (make_coupon(live, from_days=-10, until_days=-1), 422, "coupon_expired"),
        (make_coupon(live, from_days=1, until_days=2), 422, "coupon_not_started"),
        (make_coupon(live, first_order_only=True), 422, "coupon_first_order_only"),
        (used, 422, "coupon_usage_limit"),
    ]
    for code, status, error in cases:
        response = apply(code)
        assert (response.status_code, response.json()["code"]) == (status, error), code
    assert cart(user)["coupon"]["code"] == minimum  # failed attempts changed nothing

    response = user.request("DELETE", "/carts/me/coupon")
    assert response.status_code == 200 and response.json()["coupon"] is None
    # A first-order coupon works for a user who has not ordered yet.
    newcomer = customer(live, shop.store_a)
    assert add(newcomer, pid).status_code == 200
    first = make_coupon(live, first_order_only=True, value=2500)
    response = newcomer.request("POST", "/carts/me/coupon", json={"code": first})
    assert response.status_code == 200 and response.json()["coupon"]["discount_paise"] == 2500


# ---------------------------------------------------------------- address and store


def test_address_change_rebinds_and_reprices(live: Live, shop: Shop):
    user = live.login()
    home = add_address(user, shop.store_a)
    work = add_address(user, shop.store_b)
    both = make_product(live, shop, price=10000, stock_a=10, stock_b=10)
    only_a = make_product(live, shop, price=30000, stock_a=10, stock_b=None)
    assert add(user, both, 2).status_code == 200
    view = add(user, only_a).json()
    assert view["store"]["id"] == shop.store_a["id"] and view["address_id"] == home
    assert view["breakdown"]["subtotal_paise"] == 50000

    response = user.request("PUT", "/carts/me/address", json={"address_id": work})
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["store"]["id"] == shop.store_b["id"] and view["address_id"] == work
    assert line(view, only_a)["available"] is False and line(view, only_a)["available_quantity"] == 0
    assert view["breakdown"]["subtotal_paise"] == 20000
    assert cart(user)["store"]["id"] == shop.store_b["id"]  # the choice sticks
    response = add(user, only_a)
    assert response.status_code == 409 and response.json()["available_quantity"] == 0

    # Another user's address is a 404, like a missing one; the binding is unchanged.
    stranger = customer(live, shop.store_a)
    theirs = stranger.request("GET", "/users/me/addresses").json()[0]["id"]
    for address_id in (theirs, str(uuid.uuid4())):
        response = user.request("PUT", "/carts/me/address", json={"address_id": address_id})
        assert response.status_code == 404 and response.json()["code"] == "address_not_found"
    assert cart(user)["address_id"] == work

    # An address no store serves cannot be chosen.
    far = add_address(user, {"lat": 10.0, "lng": -30.0})  # the middle of the Atlantic
    response = user.request("PUT", "/carts/me/address", json={"address_id": far})
    assert response.status_code == 422 and response.json()["code"] == "not_serviceable"


def test_cart_needs_an_address(live: Live, shop: Shop):
    user = live.login()
    view = cart(user)
    assert view["store"] is None and view["store_issue"] == "address_required"
    response = add(user, make_product(live, shop, price=1000))
    assert response.status_code == 409 and response.json()["code"] == "address_required"


# ---------------------------------------------------------------- concurrency and isolation


def test_concurrent_adds_to_one_cart_are_never_lost(live: Live, shop: Shop):
    user = customer(live, shop.store_a)
    products = [make_product(live, shop, price=1000, stock_a=100) for _ in range(4)]
    adds = [(products[i % 4], 1 + i % 3) for i in range(20)]

    async def run() -> list[int]:
        async with httpx.AsyncClient(
            base_url=live.base_url, headers={**user.auth, "X-Forwarded-For": fake_ip()}, timeout=60
        ) as client:
            responses = await asyncio.gather(
                *(client.post("/carts/me/items", json={"product_id": p, "quantity": q}) for p, q in adds)
            )
        return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * 20
    expected: dict[str, int] = {}
    for p, q in adds:
        expected[p] = expected.get(p, 0) + q
    assert quantities(cart(user)) == expected


def test_another_users_cart_is_unreachable(live: Live, shop: Shop):
    alice, bob = customer(live, shop.store_a), customer(live, shop.store_a)
    pid = make_product(live, shop, price=1000)
    assert add(alice, pid, 2).status_code == 200
    assert cart(bob)["lines"] == [] and cart(bob)["user_id"] == bob.user_id
    response = bob.request("PATCH", f"/carts/me/items/{pid}", json={"quantity": 5})
    assert response.status_code == 404
    assert bob.request("DELETE", f"/carts/me/items/{pid}").status_code == 404
    assert bob.request("DELETE", "/carts/me").status_code == 200
    assert quantities(cart(alice)) == {pid: 2}
    # Without a token there is no cart at all.
    with live.client() as anonymous:
        assert anonymous.get("/carts/me").status_code == 401


# ---------------------------------------------------------------- durability


def test_write_through_and_shard_kill_survival(live: Live, shop: Shop):
    import ray

    from actors import NAMESPACE
    from actors.carts import cart_key, shard_index, shard_name
    from config.settings import get_settings

    user = customer(live, shop.store_a)
    products = [make_product(live, shop, price=1500, stock_a=100) for _ in range(3)]
    for i, pid in enumerate(products):
        assert add(user, pid, i + 1).status_code == 200
    coupon = make_coupon(live, value=500)
    assert user.request("POST", "/carts/me/coupon", json={"code": coupon}).status_code == 200
    before = cart(user)

    # Every acknowledged change is already in Redis, with the idle TTL.
    kv = redis.Redis.from_url(live.redis_url, decode_responses=True)
    key = cart_key(uuid.UUID(user.user_id))
    stored = json.loads(kv.get(key) or "{}")
    assert {line["product_id"]: line["quantity"] for line in stored["lines"]} == quantities(before)
    assert stored["coupon_code"] == coupon
    ttl_days = get_settings().cart_ttl_days
    assert (ttl_days - 1) * 86400 < kv.ttl(key) <= ttl_days * 86400

    name = shard_name(shard_index(uuid.UUID(user.user_id), get_settings().cart_shards))
    actor = ray.get_actor(name, namespace=NAMESPACE)
    old = ray.get(actor.stats.remote())
    assert old.carts_in_memory >= 1
    ray.kill(actor, no_restart=False)
    # Wait for the new process (calls racing the kill may still reach the dying one, or fail).
    for _ in range(120):
        try:
            stats = ray.get(actor.stats.remote(), timeout=120)
            if stats.pid != old.pid:
                break
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.5)
    assert stats.pid != old.pid
    # A fresh process: nothing in memory until a cart is asked for.
    assert stats.carts_in_memory == 0

    after = cart(user)
    assert quantities(after) == quantities(before)
    assert after["coupon"] == before["coupon"] and after["breakdown"] == before["breakdown"]
    # And the restarted shard keeps working on top of what it reloaded.
    response = add(user, products[0], 4)
    assert response.status_code == 200 and line(response.json(), products[0])["quantity"] == 5
    kv.close()
