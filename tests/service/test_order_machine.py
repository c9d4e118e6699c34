"""A Hypothesis state machine over the order lifecycle: random sequences of checkouts, payment
facts, cancellations, staff moves, reservation expiry and refunds, run through the real model
functions against the real PostgreSQL, one transaction per action as at the request boundary.

After every step the database must hold: stock that is never negative and matches the orders'
reservations, order histories that are valid paths through `TRANSITIONS`, reservations that
match statuses, payment and refund money that adds up, coupon uses within their limit. A
simple model predicts each action's outcome (including which AppError it must raise) and the
database must agree with it.

The gateway is out of scope: payments carry fake gateway ids, and the `refund.requested`
events our actions emit are marked delivered in the same transaction, so the running backend's
relay never submits them (the machine settles refunds itself). The janitor's reconciliation
sees our pending payments but the sandbox knows no payments for them, so it changes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from config.settings import get_settings
from models import order_flows, orders
from models.carts import CartLine, CartState
from models.db import make_engine, make_sessionmaker, utcnow
from models.errors import AppError
from models.orders import STAFF_TARGETS, TRANSITIONS, CheckoutIn, Status
from models.payments import payment_for_order, request_refund
from tests.conftest import Live, fake_phone

S = Status
CANCELLABLE = frozenset(s for s in Status if S.cancelled in TRANSITIONS[s])
EXPECTED_RESERVATION = {
    S.pending_payment: "held",
    S.payment_failed: "held",
    S.placed: "committed",
    S.confirmed: "committed",
    S.packed: "committed",
    S.out_for_delivery: "fulfilled",
    S.delivered: "fulfilled",
    S.delivery_failed: "fulfilled",
    S.returned: "returned",
    S.partially_refunded: "fulfilled",
    S.refunded: "fulfilled",
    S.cancelled: "released",
}
REFUND_KEYS = ["ops-1", "ops-2", "ops-3"]
STAFF_NEXT = {
    S.placed: S.confirmed,
    S.confirmed: S.packed,
    S.packed: S.out_for_delivery,
    S.out_for_delivery: S.delivered,
    S.delivery_failed: S.returned,
}


@dataclass
class MRefund:
    id: uuid.UUID
    amount: int
    status: str = "pending"


@dataclass
class MOrder:
    """What the model expects of one order and its payment."""

    id: uuid.UUID
    user: int
    lines: dict[uuid.UUID, int]
    method: str
    total: int
    coupon: str | None
    status: Status
    reservation: str
    version: int = 1
    gateway_order_id: str | None = None
    payment_status: str = "created"
    gateway_payment_id: str | None = None
    captured: int = 0
    refund_reserved: int = 0
    refunded: int = 0  # on the payment and on the order: both count processed refunds
    refunds: dict[str, MRefund] = field(default_factory=dict)  # by idempotency key


@dataclass
class Customer:
    id: uuid.UUID
    address_id: uuid.UUID


class OrderMachine(RuleBasedStateMachine):
    database_url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.engine: AsyncEngine = make_engine(self.database_url, pool_size=2, max_overflow=0)
        self.sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self.settings = get_settings()
        self.store_id = uuid.uuid4()
        self.products: list[uuid.UUID] = []
        self.prices: dict[uuid.UUID, int] = {}
        self.initial: dict[uuid.UUID, int] = {}
        self.customers: list[Customer] = []
        self.coupon: str | None = None
        self.coupon_total_limit = 0
        self.coupon_per_user_limit = 0
        self.orders: list[MOrder] = []
        self.refunds: list[tuple[MOrder, str]] = []  # (order, key) in the order they were made
        self.last_cart_version: datetime | None = None

    # ------------------------------------------------------------ plumbing

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def sql(self, query: str, **params: Any) -> list[Any]:
        async def go() -> list[Any]:
            async with self.sessions() as s:
                result = await s.execute(text(query), params)
                rows = list(result.all()) if result.returns_rows else []
                await s.commit()
                return rows

        return list(self.run(go()))

    def act(self, fn: Callable[[AsyncSession], Awaitable[Any]], order: MOrder | None = None) -> Any:
        """One action in its own transaction, committed unless it raises an AppError (then
        rolled back and returned). The refund requests it emitted never reach the relay."""

        async def go() -> Any:
            async with self.sessions() as s:
                try:
                    result = await fn(s)
                except AppError as exc:
                    await s.rollback()
                    return exc
                if order is not None:
                    await s.flush()  # the session does not autoflush: the outbox rows must exist
                    await s.execute(
                        text(
                            "UPDATE outbox SET status = 'delivered', pending = '{}', delivered_at = now()"
                            " WHERE aggregate_id = :id AND topic = 'refund.requested' AND status = 'pending'"
                        ),
                        {"id": order.id},
                    )
                await s.commit()
                return result

        return self.run(go())

    def teardown(self) -> None:
        try:
            # Retire the store so no later run's address is served by it.
            self.sql("UPDATE stores SET is_active = false WHERE id = :id", id=self.store_id)
            self.run(self.engine.dispose())
        finally:
            self.loop.close()

    @staticmethod
    def expect(outcome: Any, code: str | None, what: str) -> None:
        got = outcome.code if isinstance(outcome, AppError) else None
        assert got == code, f"{what}: expected {code or 'success'}, got {got or 'success'} ({outcome!r})"

    def pick(self, data: st.DataObject, items: list[Any], label: str, likely: list[Any] | None = None) -> Any:
        """One of `items`; mostly one of `likely` when there are any, so runs get past checkout
        (uniform picks mostly hit orders a cancellation or expiry already ended)."""
        if likely and data.draw(st.sampled_from([True, True, True, False]), label=f"likely {label}"):
            items = likely
        return items[data.draw(st.integers(0, len(items) - 1), label=label)]

    # ------------------------------------------------------------ setup

    @initialize(
        first=st.integers(1, 9),
        stocks=st.lists(st.integers(0, 9), min_size=1, max_size=2),
        customers=st.integers(1, 3),
        coupon=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 2))),
    )
    def setup(self, first: int, stocks: list[int], customers: int, coupon: tuple[int, int] | None) -> None:
        stocks = [first, *stocks]  # one product in stock, so checkouts mostly succeed
        # Not from Hypothesis's random: a derandomized run would put every store on one spot.
        rng = secrets.SystemRandom()
        lat, lng = round(rng.uniform(-45, -20), 5), round(rng.uniform(-150, -100), 5)
        code = "M" + secrets.token_hex(6).upper()
        self.sql(
            "INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)"
            " VALUES (:id, :code, :code, 'Testville', :lat, :lng, 2, '00:00', '00:00')",
            id=self.store_id,
            code=code,
            lat=lat,
            lng=lng,
        )
        category = uuid.uuid4()
        self.sql(
            "INSERT INTO categories (id, slug, name) VALUES (:id, :slug, 'machine')",
            id=category,
            slug=f"machine-{secrets.token_hex(6)}",
        )
        for i, on_hand in enumerate(stocks):
            pid = uuid.uuid4()
            price = 10000 + 5000 * i
            self.sql(
                "INSERT INTO products (id, sku, name, category_id, mrp_paise, price_paise, tax_rate_bp)"
                " VALUES (:id, :sku, :name, :cid, :price, :price, 500)",
                id=pid,
                sku="SM-" + secrets.token_hex(8),
                name=f"Machine product {i}",
                cid=category,
                price=price,
            )
            self.sql(
                "INSERT INTO inventory (store_id, product_id, on_hand) VALUES (:s, :p, :o)",
                s=self.store_id,
                p=pid,
                o=on_hand,
            )
            self.products.append(pid)
            self.prices[pid] = price
            self.initial[pid] = on_hand
        for _ in range(customers):
            uid, aid = uuid.uuid4(), uuid.uuid4()
            self.sql("INSERT INTO users (id, phone) VALUES (:id, :phone)", id=uid, phone=fake_phone())
            self.sql(
                "INSERT INTO addresses (id, user_id, label, line1, city, pincode, lat, lng, is_default)"
                " VALUES (:id, :uid, 'home', '1 Test Street', 'Testville', '560001', :lat, :lng, true)",
                id=aid,
                uid=uid,
                lat=lat + 0.001,
                lng=lng,
            )
            self.customers.append(Customer(uid, aid))
        if coupon is not None:
            self.coupon = "SM" + secrets.token_hex(5).upper()
            self.coupon_total_limit, self.coupon_per_user_limit = coupon
            self.sql(
                "INSERT INTO coupons (code, kind, value, per_user_limit, total_limit, valid_from, valid_until)"
                " VALUES (:code, 'flat', 5000, :per_user, :total, now() - interval '1 day',"
                " now() + interval '1 day')",
                code=self.coupon,
                per_user=self.coupon_per_user_limit,
                total=self.coupon_total_limit,
            )

    # ------------------------------------------------------------ model helpers

    def reserved(self, pid: uuid.UUID) -> int:
        return sum(o.lines.get(pid, 0) for o in self.orders if o.reservation in ("held", "committed"))

    def on_hand(self, pid: uuid.UUID) -> int:
        return self.initial[pid] - sum(
            o.lines.get(pid, 0) for o in self.orders if o.reservation == "fulfilled"
        )

    def redemptions(self, user: int | None = None) -> int:
        return sum(
            1
            for o in self.orders
            if o.coupon is not None and o.status != S.cancelled and (user is None or o.user == user)
        )

    def move(self, order: MOrder, target: Status) -> None:
        """The model's side of `orders.transition`."""
        assert target in TRANSITIONS[order.status]
        if target == S.cancelled and order.reservation in ("held", "committed"):
            order.reservation = "released"
        if target == S.out_for_delivery and order.reservation == "committed":
            order.reservation = "fulfilled"
        if target == S.returned and order.reservation == "fulfilled":
            order.reservation = "returned"
        if target == S.placed and order.reservation == "held":
            order.reservation = "committed"
        order.status = target
        order.version += 1
        event(f"an order became {target}")  # --hypothesis-show-statistics: how far runs get

    def new_refund(self, order: MOrder, key: str, amount: int, refund_id: uuid.UUID) -> None:
        order.refunds[key] = MRefund(refund_id, amount)
        order.refund_reserved += amount
        self.refunds.append((order, key))

    def end_in_model(self, order: MOrder, target: Status = S.cancelled) -> None:
        """Cancelled or returned: whatever was captured and not yet refunded is refunded."""
        self.move(order, target)
        key = f"order-{target}"
        if order.captured > order.refund_reserved:
            # Filled in from the database by the caller (the refund's id).
            order.refunds[key] = MRefund(uuid.UUID(int=0), order.captured - order.refund_reserved)
            order.refund_reserved = order.captured
            self.refunds.append((order, key))

    async def refund_id(self, s: AsyncSession, order: MOrder, key: str) -> uuid.UUID:
        return uuid.UUID(
            str(
                await s.scalar(
                    text("SELECT id FROM refunds WHERE order_id = :o AND idempotency_key = :k"),
                    {"o": order.id, "k": key},
                )
            )
        )

    def fill_refund_id(self, order: MOrder, key: str) -> None:
        async def go() -> uuid.UUID:
            async with self.sessions() as s:
                return await self.refund_id(s, order, key)

        order.refunds[key].id = self.run(go())

    # ------------------------------------------------------------ rules

    @rule(
        data=st.data(),
        method=st.sampled_from(["online", "cod"]),
        use_coupon=st.booleans(),
        tip=st.sampled_from([0, 0, 2000]),
    )
    def checkout(self, data: st.DataObject, method: str, use_coupon: bool, tip: int) -> None:
        user = data.draw(st.integers(0, len(self.customers) - 1), label="customer")
        quantities = data.draw(
            st.dictionaries(st.sampled_from(self.products), st.integers(1, 3), min_size=1, max_size=2),
            label="lines",
        )
        coupon = self.coupon if use_coupon else None
        cart_version = utcnow()
        if self.last_cart_version is not None and cart_version <= self.last_cart_version:
            cart_version = self.last_cart_version + timedelta(microseconds=1)
        self.last_cart_version = cart_version
        customer = self.customers[user]
        cart = CartState(
            user_id=customer.id,
            lines=[CartLine(product_id=p, quantity=q, added_at=cart_version) for p, q in quantities.items()],
            coupon_code=coupon,
            address_id=customer.address_id,
            updated_at=cart_version,
        )
        body = CheckoutIn(address_id=customer.address_id, payment_method=method, tip_paise=tip)  # type: ignore[arg-type]

        expected: str | None = None
        if any(q > self.on_hand(p) - self.reserved(p) for p, q in quantities.items()):
            expected = "insufficient_stock"
        elif coupon is not None and self.redemptions() >= self.coupon_total_limit:
            expected = "coupon_exhausted"
        elif coupon is not None and self.redemptions(user) >= self.coupon_per_user_limit:
            expected = "coupon_usage_limit"

        async def go(s: AsyncSession) -> tuple[uuid.UUID, int, str | None]:
            order = await orders.place_order(
                s, user_id=customer.id, cart=cart, body=body, settings=self.settings, now=utcnow()
            )
            return order.id, order.total_paise, order.coupon_code

        outcome = self.act(go)
        self.expect(outcome, expected, f"checkout {quantities} {method} coupon={coupon}")
        event(f"checkout: {expected or 'ordered'}")
        if isinstance(outcome, AppError):
            return
        order_id, total, used_coupon = outcome
        subtotal = sum(self.prices[p] * q for p, q in quantities.items())
        assert used_coupon == coupon
        assert total >= subtotal - (5000 if coupon else 0) + tip
        online = method == "online"
        order = MOrder(
            id=order_id,
            user=user,
            lines=dict(quantities),
            method=method,
            total=total,
            coupon=coupon,
            status=S.pending_payment if online else S.placed,
            reservation="held" if online else "committed",
            payment_status="created" if online else "cod_pending",
        )
        self.orders.append(order)
        if online:
            # What the checkout workflow's gateway step does after the order's transaction.
            order.gateway_order_id = "order_" + secrets.token_hex(7)
            self.sql(
                "UPDATE payments SET razorpay_order_id = :g WHERE order_id = :o AND razorpay_order_id IS NULL",
                g=order.gateway_order_id,
                o=order.id,
            )

    def online_orders(self) -> list[MOrder]:
        return [o for o in self.orders if o.gateway_order_id is not None]

    @precondition(lambda self: self.online_orders())
    @rule(data=st.data(), same_payment=st.booleans(), right_amount=st.booleans())
    def capture_payment(self, data: st.DataObject, same_payment: bool, right_amount: bool) -> None:
        unpaid = [o for o in self.online_orders() if o.status in (S.pending_payment, S.payment_failed)]
        order = self.pick(data, self.online_orders(), "order", unpaid)
        assert order.gateway_order_id is not None
        payment_id = order.gateway_payment_id if same_payment and order.gateway_payment_id else None
        payment_id = payment_id or "pay_" + secrets.token_hex(7)
        amount = order.total if right_amount else order.total + 100

        async def go(s: AsyncSession) -> order_flows.Outcome:
            assert order.gateway_order_id is not None
            return await order_flows.payment_captured(
                s,
                razorpay_order_id=order.gateway_order_id,
                razorpay_payment_id=payment_id,
                amount_paise=amount,
                currency="INR",
                now=utcnow(),
            )

        outcome = self.act(go, order)
        self.expect(outcome, None, "capture")
        applies = order.captured == 0 and right_amount
        assert outcome.applied == applies, outcome
        if not applies:
            return
        order.captured = amount
        order.payment_status = "captured"
        order.gateway_payment_id = payment_id
        if order.status in (S.pending_payment, S.payment_failed):
            self.move(order, S.placed)
        else:
            assert order.status == S.cancelled, order
            self.new_refund(order, "late-capture", amount, uuid.UUID(int=0))
            self.fill_refund_id(order, "late-capture")

    @precondition(lambda self: self.online_orders())
    @rule(data=st.data())
    def fail_payment(self, data: st.DataObject) -> None:
        order = self.pick(data, self.online_orders(), "order")

        async def go(s: AsyncSession) -> order_flows.Outcome:
            assert order.gateway_order_id is not None
            return await order_flows.payment_failed(
                s, razorpay_order_id=order.gateway_order_id, reason="card declined", now=utcnow()
            )

        outcome = self.act(go, order)
        self.expect(outcome, None, "payment failed")
        applies = order.payment_status in ("created", "failed")
        assert outcome.applied == applies, outcome
        if applies:
            order.payment_status = "failed"
            if order.status == S.pending_payment:
                self.move(order, S.payment_failed)

    def version_for(self, order: MOrder, choice: str) -> int | None:
        return {"none": None, "current": order.version, "stale": order.version + 1}[choice]

    @precondition(lambda self: self.orders)
    @rule(
        data=st.data(),
        actor=st.sampled_from(["customer", "staff"]),
        version=st.sampled_from(["none", "current", "stale"]),
    )
    def cancel(self, data: st.DataObject, actor: str, version: str) -> None:
        order = self.pick(data, self.orders, "order")
        expected_version = self.version_for(order, version)
        if version == "stale":
            expected = "version_conflict"
        elif order.status not in CANCELLABLE:
            expected = "invalid_transition"
        else:
            expected = None

        async def go(s: AsyncSession) -> None:
            locked = await orders.lock_order(s, order.id)
            assert locked is not None
            await orders.change_status(
                s,
                locked,
                S.cancelled,
                actor=actor,
                actor_user_id=self.customers[order.user].id if actor == "customer" else None,
                reason="changed my mind",
                expected_version=expected_version,
                now=utcnow(),
            )

        outcome = self.act(go, order)
        self.expect(outcome, expected, f"{actor} cancels a {order.status} order")
        if expected is None:
            self.end_in_model(order)
            if "order-cancelled" in order.refunds:
                self.fill_refund_id(order, "order-cancelled")

    @precondition(lambda self: self.orders)
    @rule(
        data=st.data(),
        to=st.sampled_from(
            ["next", "next", "next", S.confirmed, S.packed, S.out_for_delivery, S.delivered, S.delivery_failed, S.returned]
        ),
        version=st.sampled_from(["none", "none", "current", "stale"]),
        times=st.integers(1, 3),
    )
    def staff_moves(self, data: st.DataObject, to: Status | str, version: str, times: int) -> None:
        """The store's staff and the delivery service move an order along: mostly an order in
        the store's hands to its next status (up to `times` steps, one transaction each, so runs
        reach delivery, failed deliveries and refunds), sometimes anything anywhere (which the
        table must refuse). Staff confirm and pack; the delivery service does the rest."""
        order = self.pick(data, self.orders, "order", [o for o in self.orders if o.status in STAFF_NEXT])
        for _ in range(times if to == "next" else 1):
            target = Status(STAFF_NEXT.get(order.status, S.confirmed) if to == "next" else to)
            expected_version = self.version_for(order, version)
            if version == "stale":
                expected = "version_conflict"
            elif target not in TRANSITIONS[order.status]:
                expected = "invalid_transition"
            else:
                expected = None

            actor = "staff" if target in STAFF_TARGETS else "delivery"

            async def go(
                s: AsyncSession, target: Status = target, actor: str = actor, v: int | None = expected_version
            ) -> None:
                locked = await orders.lock_order(s, order.id)
                assert locked is not None
                await orders.change_status(
                    s, locked, target, actor=actor, actor_user_id=None, reason=None, expected_version=v, now=utcnow()
                )

            outcome = self.act(go, order)
            self.expect(outcome, expected, f"{actor} moves a {order.status} order to {target}")
            if expected is not None:
                return
            if target == S.returned:
                self.end_in_model(order, target)
                if "order-returned" in order.refunds:
                    self.fill_refund_id(order, "order-returned")
            else:
                self.move(order, target)

    @precondition(lambda self: self.orders)
    @rule(data=st.data(), run_out=st.booleans())
    def expire(self, data: st.DataObject, run_out: bool) -> None:
        order = self.pick(data, self.orders, "order")

        async def go(s: AsyncSession) -> bool:
            now = utcnow()
            if run_out:
                # The clock moves in the same transaction, so the janitor never sees it first.
                await s.execute(
                    text(
                        "UPDATE orders SET reservation_expires_at = :t WHERE id = :id AND reservation = 'held'"
                    ),
                    {"t": now - timedelta(seconds=1), "id": order.id},
                )
            return await orders.expire_reservation(s, order.id, now)

        outcome = self.act(go, order)
        self.expect(outcome, None, "expire")
        expires = run_out and order.reservation == "held"
        assert outcome is expires, (order, run_out)
        if expires:
            assert order.captured == 0
            self.end_in_model(order)

    @precondition(lambda self: self.orders)
    @rule(
        data=st.data(),
        key=st.sampled_from(REFUND_KEYS),
        share=st.one_of(st.none(), st.integers(1, 110)),
    )
    def request_refund(self, data: st.DataObject, key: str, share: int | None) -> None:
        """Ops refund part (`share` percent of the total, sometimes too much) or all of what is
        left of a payment, under an idempotency key."""
        order = self.pick(
            data, self.orders, "order", [o for o in self.orders if o.captured > o.refund_reserved]
        )
        amount = None if share is None else max(1, order.total * share // 100)
        remaining = order.captured - order.refund_reserved
        existing = order.refunds.get(key)
        expected: str | None
        if existing is not None:
            same = amount is None or amount == existing.amount
            expected = None if same else "idempotency_key_reused"
        elif order.captured == 0:
            expected = "not_refundable"
        elif (remaining if amount is None else amount) <= 0 or (amount or 0) > remaining:
            expected = "refund_exceeds_captured"
        else:
            expected = None

        async def go(s: AsyncSession) -> tuple[uuid.UUID, int, bool]:
            locked = await orders.lock_order(s, order.id)
            payment = await payment_for_order(s, order.id, lock=True)
            assert locked is not None and payment is not None
            refund, created = await request_refund(
                s, payment, amount_paise=amount, reason="ops refund", idempotency_key=key, requested_by=None
            )
            return refund.id, refund.amount_paise, created

        outcome = self.act(go, order)
        self.expect(outcome, expected, f"refund {amount} of {order} under {key}")
        if isinstance(outcome, AppError):
            return
        refund_id, refunded, created = outcome
        if existing is not None:
            assert not created and refund_id == existing.id and refunded == existing.amount
        else:
            assert created and refunded == (remaining if amount is None else amount)
            self.new_refund(order, key, refunded, refund_id)

    @precondition(lambda self: self.refunds)
    @rule(data=st.data(), processed=st.booleans())
    def settle_refund(self, data: st.DataObject, processed: bool) -> None:
        pending = [(o, k) for o, k in self.refunds if o.refunds[k].status == "pending"]
        order, key = self.pick(data, self.refunds, "refund", pending)
        refund = order.refunds[key]

        async def go(s: AsyncSession) -> order_flows.Outcome:
            return await order_flows.refund_settled(
                s,
                refund.id,
                processed=processed,
                razorpay_refund_id="rfnd_" + secrets.token_hex(7),
                failure_reason=None if processed else "bank rejected",
                now=utcnow(),
            )

        outcome = self.act(go, order)
        self.expect(outcome, None, "settle refund")
        applies = refund.status == "pending"
        assert outcome.applied == applies, outcome
        if not applies:
            return
        event(f"a refund {'processed' if processed else 'failed'}")
        if not processed:
            refund.status = "failed"
            order.refund_reserved -= refund.amount
            return
        refund.status = "processed"
        order.refunded += refund.amount
        order.payment_status = "refunded" if order.refunded >= order.captured else "partially_refunded"
        if order.status in (S.delivered, S.partially_refunded):
            self.move(order, S.refunded if order.refunded >= order.total else S.partially_refunded)

    # ------------------------------------------------------------ invariants

    @invariant()
    def database_holds(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        async with self.sessions() as s:
            # One snapshot for every read, or a commit between two of them looks like a bug.
            await s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            q = s.execute
            stock = (
                await q(
                    text("SELECT product_id, on_hand, reserved FROM inventory WHERE store_id = :s"),
                    {"s": self.store_id},
                )
            ).all()
            held = Counter[uuid.UUID]()
            gone = Counter[uuid.UUID]()
            for pid, quantity, reservation in (
                await q(
                    text(
                        "SELECT l.product_id, l.quantity, o.reservation FROM order_lines l"
                        " JOIN orders o ON o.id = l.order_id WHERE o.store_id = :s"
                    ),
                    {"s": self.store_id},
                )
            ).all():
                if reservation in ("held", "committed"):
                    held[pid] += quantity
                elif reservation == "fulfilled":
                    gone[pid] += quantity
            assert {r.product_id for r in stock} == set(self.products)
            for r in stock:
                assert 0 <= r.reserved <= r.on_hand, r
                assert r.reserved == held[r.product_id], (r, held)
                assert r.on_hand == self.initial[r.product_id] - gone[r.product_id], (r, gone)
                # ... and the model agrees.
                assert (r.on_hand, r.reserved) == (self.on_hand(r.product_id), self.reserved(r.product_id))

            rows = {
                r.id: r
                for r in (
                    await q(
                        text(
                            "SELECT o.id, o.status, o.version, o.reservation, o.reservation_expires_at,"
                            " o.total_paise, o.refunded_paise, o.coupon_code, p.method, p.status AS p_status,"
                            " p.amount_paise, p.captured_paise, p.refund_reserved_paise,"
                            " p.refunded_paise AS p_refunded"
                            " FROM orders o JOIN payments p ON p.order_id = o.id WHERE o.store_id = :s"
                        ),
                        {"s": self.store_id},
                    )
                ).all()
            }
            events: dict[uuid.UUID, list[Any]] = {oid: [] for oid in rows}
            for e in (
                await q(
                    text(
                        "SELECT e.order_id, e.from_status, e.to_status FROM order_events e"
                        " JOIN orders o ON o.id = e.order_id WHERE o.store_id = :s ORDER BY e.id"
                    ),
                    {"s": self.store_id},
                )
            ).all():
                events[e.order_id].append(e)
            refunds: dict[uuid.UUID, list[Any]] = {oid: [] for oid in rows}
            for f in (
                await q(
                    text(
                        "SELECT f.id, f.order_id, f.amount_paise, f.status, f.idempotency_key FROM refunds f"
                        " JOIN orders o ON o.id = f.order_id WHERE o.store_id = :s"
                    ),
                    {"s": self.store_id},
                )
            ).all():
                refunds[f.order_id].append(f)
            redemptions = (
                await q(
                    text(
                        "SELECT r.order_id, o.status FROM coupon_redemptions r"
                        " LEFT JOIN orders o ON o.id = r.order_id WHERE r.coupon_code = :c"
                    ),
                    {"c": self.coupon or ""},
                )
            ).all()

        assert set(rows) == {o.id for o in self.orders}
        for order in self.orders:
            r = rows[order.id]
            status = Status(r.status)
            # The history is a path through the table from where checkout starts.
            path = events[order.id]
            assert path, r
            assert path[0].from_status is None and path[0].to_status in (S.pending_payment, S.placed), path
            for prev, nxt in itertools.pairwise(path):
                assert nxt.from_status == prev.to_status, path
                assert Status(nxt.to_status) in TRANSITIONS[Status(nxt.from_status)], path
            assert path[-1].to_status == status and r.version == len(path), (r, path)
            assert r.reservation == EXPECTED_RESERVATION[status], r
            assert (r.reservation == "held") == (r.reservation_expires_at is not None), r
            # Money.
            assert 0 <= r.p_refunded <= r.refund_reserved_paise <= r.captured_paise, r
            assert r.captured_paise in (0, r.amount_paise) and r.amount_paise == r.total_paise, r
            processed = sum(f.amount_paise for f in refunds[order.id] if f.status == "processed")
            not_failed = sum(f.amount_paise for f in refunds[order.id] if f.status != "failed")
            assert r.refunded_paise == processed == r.p_refunded, (r, refunds[order.id])
            assert r.refund_reserved_paise == not_failed, (r, refunds[order.id])
            # The model predicted all of it.
            assert (status, r.version, r.reservation, r.p_status) == (
                order.status,
                order.version,
                order.reservation,
                order.payment_status,
            ), (r, order)
            assert (r.captured_paise, r.refund_reserved_paise, r.p_refunded) == (
                order.captured,
                order.refund_reserved,
                order.refunded,
            ), (r, order)
            assert {f.idempotency_key: (f.id, f.amount_paise, f.status) for f in refunds[order.id]} == {
                k: (m.id, m.amount, m.status) for k, m in order.refunds.items()
            }, (refunds[order.id], order)
        # Coupon uses: within the limit, one per order that still stands.
        if self.coupon is not None:
            assert len(redemptions) <= self.coupon_total_limit, redemptions
            assert all(r.status is not None and r.status != S.cancelled for r in redemptions), redemptions
            with_coupon = {o.id for o in self.orders if o.coupon and o.status != S.cancelled}
            assert sorted(r.order_id for r in redemptions) == sorted(with_coupon)


def test_random_order_lifecycles_keep_stock_money_and_history_consistent(live: Live) -> None:
    OrderMachine.database_url = live.database_url
    run_state_machine_as_test(
        OrderMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


pytestmark = pytest.mark.usefixtures("live")
