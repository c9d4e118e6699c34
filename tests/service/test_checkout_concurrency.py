"""Checkout under concurrency, through the real backend: no oversell, all-or-nothing
multi-item reservations without deadlocks, coupon limits, and idempotency keys."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import Live, Session
from tests.service.shop import Shop, add, add_address, make_coupon, make_product, make_shop

pytestmark = pytest.mark.usefixtures("live")

CUSTOMERS = 200


@pytest.fixture(scope="module")
def shop(live: Live) -> Shop:
    return make_shop(live, "checkout-race")


@pytest.fixture(scope="module")
def crowd(live: Live, shop: Shop) -> list[tuple[Session, str]]:
    """200 customers (real OTP logins, each from its own address), each with a delivery
    address at store A."""

    def one(_: int) -> tuple[Session, str]:
        user = live.login()
        return user, add_address(user, shop.store_a, default=True)

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(CUSTOMERS)))


def fill_carts(crowd: list[tuple[Session, str]], carts: list[dict[str, int]]) -> None:
    def one(args: tuple[tuple[Session, str], dict[str, int]]) -> None:
        (user, _), items = args
        assert user.request("DELETE", "/carts/me").status_code == 200
        for pid, quantity in items.items():
            response = add(user, pid, quantity)
            assert response.status_code == 200, response.text

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, zip(crowd, carts, strict=False)))


async def _checkouts(live: Live, requests: list[tuple[Session, dict[str, Any], str]]) -> list[httpx.Response]:
    """Fire every checkout at once (one connection each)."""
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=live.base_url, timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(
                        "/orders",
                        json=body,
                        headers={
                            **user.auth,
                            "Idempotency-Key": key,
                            "X-Forwarded-For": user.client.headers["X-Forwarded-For"],
                        },
                    )
                    for user, body, key in requests
                )
            )
        )


def checkout_all(live: Live, crowd: list[tuple[Session, str]], method: str = "cod") -> list[httpx.Response]:
    return asyncio.run(
        _checkouts(
            live,
            [
                (user, {"address_id": address, "payment_method": method}, uuid.uuid4().hex)
                for user, address in crowd
            ],
        )
    )


def inventory(live: Live, shop: Shop, pids: list[str]) -> dict[str, tuple[int, int]]:
    rows = live.sql(
        "SELECT product_id::text AS p, on_hand, reserved FROM inventory WHERE store_id = :s AND product_id = ANY(:ids)",
        s=shop.store_a["id"],
        ids=[uuid.UUID(p) for p in pids],
    )
    return {r.p: (r.on_hand, r.reserved) for r in rows}


def ordered(live: Live, pids: list[str]) -> dict[str, int]:
    rows = live.sql(
        "SELECT product_id::text AS p, sum(quantity) AS q FROM order_lines WHERE product_id = ANY(:ids) GROUP BY 1",
        ids=[uuid.UUID(p) for p in pids],
    )
    return {r.p: int(r.q) for r in rows}


class RowLock:
    """Holds a row lock in its own connection (a thread with its own event loop) until the
    block ends, to freeze a request mid-transaction."""

    def __init__(self, live: Live, query: str, *args: Any) -> None:
        self.dsn = live.database_url.replace("postgresql+asyncpg://", "postgresql://")
        self.query, self.args = query, args
        self.locked, self.release = threading.Event(), threading.Event()
        self.waiters = 0

    async def _hold(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                await conn.execute(self.query, *self.args)
                self.locked.set()
                while not self.release.is_set():
                    self.waiters = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                    )
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def wait_for_waiter(self, timeout: float = 10) -> None:
        for _ in range(int(timeout / 0.05)):
            if self.waiters:
                return
            threading.Event().wait(0.05)
        raise AssertionError("nobody queued behind the lock")

    def __enter__(self) -> RowLock:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._hold()))
        self.thread.start()
        assert self.locked.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(10)


def test_200_concurrent_checkouts_for_20_units_sell_exactly_20(live: Live, shop: Shop, crowd):
    hot = make_product(live, shop, price=9900, stock_a=20)
    fill_carts(crowd, [{hot: 1}] * CUSTOMERS)
    responses = checkout_all(live, crowd)
    codes = [r.status_code for r in responses]
    assert all(code < 500 for code in codes), [r.text for r in responses if r.status_code >= 500][:3]
    assert codes.count(201) == 20
    failures = [r.json() for r in responses if r.status_code != 201]
    assert len(failures) == 180 and {(f["status"], f["code"]) for f in failures} == {
        (409, "insufficient_stock")
    }
    assert inventory(live, shop, [hot]) == {hot: (20, 20)}
    assert ordered(live, [hot]) == {hot: 20}
    # Losers keep their carts; winners' carts were emptied.
    winners = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(winners) == 20


def test_random_stock_multi_item_carts_reserve_all_or_nothing(live: Live, shop: Shop, crowd):
    rng = random.Random(4)
    products = [make_product(live, shop, price=5000, stock_a=rng.randint(5, 40)) for _ in range(4)]
    before = inventory(live, shop, products)
    carts = [
        {pid: rng.randint(1, 3) for pid in rng.sample(products, rng.randint(1, len(products)))}
        for _ in range(120)
    ]
    fill_carts(crowd, carts)
    responses = checkout_all(live, crowd[:120])
    assert all(r.status_code in (201, 409) for r in responses), {r.status_code for r in responses}
    assert {r.json()["code"] for r in responses if r.status_code == 409} <= {"insufficient_stock"}
    won = [cart for cart, r in zip(carts, responses, strict=True) if r.status_code == 201]
    expected = {pid: sum(cart.get(pid, 0) for cart in won) for pid in products}
    after = inventory(live, shop, products)
    for pid in products:
        on_hand, reserved = after[pid]
        assert on_hand == before[pid][0] and reserved == expected[pid] <= on_hand
    # Every order holds exactly its cart: all lines or none.
    rows = live.sql(
        "SELECT o.id::text AS id, count(l.*) AS n FROM orders o JOIN order_lines l ON l.order_id = o.id"
        " WHERE o.id = ANY(:ids) GROUP BY 1",
        ids=[uuid.UUID(r.json()["id"]) for r in responses if r.status_code == 201],
    )
    by_id = {r.json()["id"]: cart for cart, r in zip(carts, responses, strict=True) if r.status_code == 201}
    assert {row.id: row.n for row in rows} == {oid: len(cart) for oid, cart in by_id.items()}
    # Somebody lost (the stock cannot cover 120 carts), so the race was real.
    assert 0 < len(won) < 120


def test_single_use_coupon_under_50_concurrent_checkouts(live: Live, shop: Shop, crowd):
    item = make_product(live, shop, price=20000, stock_a=1000)
    code = make_coupon(live, value=3000, total_limit=1)
    fifty = crowd[:50]
    fill_carts(fifty, [{item: 1}] * 50)
    for user, _ in fifty:
        response = user.request("POST", "/carts/me/coupon", json={"code": code})
        assert response.status_code == 200, response.text
    responses = checkout_all(live, fifty)
    assert [r.status_code for r in responses].count(201) == 1
    winner = next(r.json() for r in responses if r.status_code == 201)
    assert winner["coupon_code"] == code and winner["totals"]["coupon_discount_paise"] == 3000
    assert {(r.status_code, r.json()["code"]) for r in responses if r.status_code != 201} == {
        (422, "coupon_exhausted")
    }
    assert live.sql("SELECT count(*) AS n FROM coupon_redemptions WHERE coupon_code = :c", c=code)[0].n == 1
    assert inventory(live, shop, [item])[item] == (1000, 1)


# ---------------------------------------------------------------- idempotency


def test_ten_concurrent_identical_requests_make_one_order(live: Live, shop: Shop, crowd):
    item = make_product(live, shop, price=20000, stock_a=100)
    user, address = crowd[0]
    fill_carts([crowd[0]], [{item: 2}])
    key = uuid.uuid4().hex
    body = {"address_id": address, "payment_method": "online"}
    count = "SELECT count(*) AS n FROM orders WHERE user_id = :u"
    before = live.sql(count, u=user.user_id)[0].n
    responses = asyncio.run(_checkouts(live, [(user, body, key)] * 10))
    created = [r for r in responses if r.status_code == 201]
    assert created and all(r.status_code in (201, 409) for r in responses)
    assert {r.json()["code"] for r in responses if r.status_code == 409} <= {"idempotency_in_flight"}
    assert len({r.content for r in created}) == 1  # replays are the first response, byte for byte
    order_id = created[0].json()["id"]
    assert live.sql(count, u=user.user_id)[0].n == before + 1
    assert inventory(live, shop, [item])[item] == (100, 2)

    replay = user.request("POST", "/orders", json=body, headers={"Idempotency-Key": key})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == created[0].content and replay.json()["id"] == order_id
    # The gateway order was created once.
    assert created[0].json()["payment"]["razorpay_order_id"] == replay.json()["payment"]["razorpay_order_id"]

    other_body = {"address_id": address, "payment_method": "cod"}
    response = user.request("POST", "/orders", json=other_body, headers={"Idempotency-Key": key})
    assert response.status_code == 422 and response.json()["code"] == "idempotency_key_reused"
    # A key is the caller's own: another customer using it starts their own request.
    other, other_address = crowd[1]
    fill_carts([crowd[1]], [{}])
    response = other.request(
        "POST", "/orders", json=body | {"address_id": other_address}, headers={"Idempotency-Key": key}
    )
    assert response.status_code == 409 and response.json()["code"] == "cart_empty"


def test_same_key_while_the_first_is_running_is_409(live: Live, shop: Shop, crowd):
    item = make_product(live, shop, price=20000, stock_a=100)
    user, address = crowd[2]
    fill_carts([crowd[2]], [{item: 1}])
    key = uuid.uuid4().hex
    body = {"address_id": address, "payment_method": "cod"}
    # Hold the customer's row lock from outside, so the first checkout blocks mid-transaction.
    with RowLock(live, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(user.user_id)) as lock:
        first: dict[str, httpx.Response] = {}

        def run_first() -> None:
            first["response"] = user.request("POST", "/orders", json=body, headers={"Idempotency-Key": key})

        thread = threading.Thread(target=run_first)
        thread.start()
        lock.wait_for_waiter()
        second = user.request("POST", "/orders", json=body, headers={"Idempotency-Key": key})
        assert second.status_code == 409 and second.json()["code"] == "idempotency_in_flight"
        assert second.headers["Retry-After"] == "1"
    thread.join(30)
    assert first["response"].status_code == 201, first["response"].text
    replay = user.request("POST", "/orders", json=body, headers={"Idempotency-Key": key})
    assert replay.status_code == 201 and replay.content == first["response"].content


def test_a_failed_attempt_releases_its_key(live: Live, shop: Shop, crowd):
    item = make_product(live, shop, price=20000, stock_a=2)
    user, address = crowd[3]
    fill_carts([crowd[3]], [{item: 2}])
    live.sql("UPDATE inventory SET on_hand = 1 WHERE product_id = :p", p=item)
    key = uuid.uuid4().hex
    body = {"address_id": address, "payment_method": "cod"}
    response = user.request("POST", "/orders", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 409 and response.json()["code"] == "insufficient_stock"
    # Nothing was reserved, so the same key may try again once the cart is fixed.
    assert user.request("PATCH", f"/carts/me/items/{item}", json={"quantity": 1}).status_code == 200
    response = user.request("POST", "/orders", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 201 and response.headers["Idempotent-Replayed"] == "false"
