"""Orders service (`/orders`): checkout, the order lifecycle, history, cancellation.

Checkout is the one route that manages its own transactions (idempotency phases, and a
gateway call that must not run inside a transaction); see `models.order_flows.checkout`. The
orders replicas also make sure the background actors exist: the outbox relay and the
janitor (reservation expiry, payment reconciliation, purges)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated

from fastapi import Query, Response

from actors.carts import call_cart, get_shard
from actors.jobs import janitor
from actors.outbox import relay
from config import metrics
from deployments.common import CurrentUser, Db, IdempotencyKey, create_api, resources, serve_builder
from models import order_flows, orders
from models.carts import CartState
from models.db import utcnow
from models.errors import AppError
from models.orders import CancelIn, CheckoutIn, OrderOut, OrderPage, TransitionIn

log = logging.getLogger("vurksha.orders")

api = create_api(
    "orders",
    title="Vurksha orders",
    description="Checkout with idempotency keys and stock reservation, the order lifecycle, history.",
)


@api.post(
    "",
    status_code=201,
    response_model=OrderOut,
    tags=["orders"],
    responses={201: {"headers": {"Idempotent-Replayed": {"schema": {"type": "string"}}}}},
)
async def checkout(body: CheckoutIn, principal: CurrentUser, db: Db, key: IdempotencyKey) -> Response:
    """Turn the caller's cart into an order for delivery to `address_id` (one of the caller's
    addresses). Prices, tax, discount and fees are recomputed from the cart now; every line's
    stock is reserved at the serving store, or none is (409 `insufficient_stock`, with the
    lines). Online orders start `pending_payment` with `payment.razorpay_order_id` for the
    gateway's checkout and hold their stock until `reservation_expires_at`; cash on delivery
    is `placed` at once.

    Idempotency: the same key and body within 24 h replays the first response byte for byte
    (`Idempotent-Replayed: true`); the same key while the first is running is 409
    `idempotency_in_flight`; the same key with another body is 422 `idempotency_key_reused`.
    A failed attempt (4xx) can be retried with the same key. Other errors: 400
    `idempotency_key_required`, 409 `cart_empty`, `cart_already_ordered`, 404
    `address_not_found`, 422 `not_serviceable`, `tip_too_large`, coupon codes (422)."""
    # Give the connection authentication used back to the pool: the phases below take their
    # own, and a request holding one while waiting for another deadlocks the pool under load.
    await db.commit()
    res = resources()
    shard = await get_shard(principal.id)

    async def load_cart() -> CartState:
        state: CartState = await call_cart(shard.snapshot.remote(principal.id))
        return state

    async def consume_cart(cart: CartState) -> None:
        try:
            await call_cart(shard.consume.remote(principal.id, cart))
        except AppError:
            # The order stands; the cart keeps its lines (and cannot be ordered twice: its
            # version is taken). The customer sees them and clears them.
            log.warning("cart not emptied after checkout for user %s", principal.id)

    started = time.perf_counter()
    try:
        status, content, replayed = await order_flows.checkout(
            res.sessionmaker,
            res.gateway,
            user_id=principal.id,
            key=key,
            body=body,
            settings=res.settings,
            load_cart=load_cart,
            consume_cart=consume_cart,
        )
    except AppError as exc:
        _checkout_done(started, "rejected" if exc.status_code < 500 else "failed", exc.code)
        raise
    except Exception:
        _checkout_done(started, "failed", "internal")
        raise
    _checkout_done(started, "replayed" if replayed else "placed")
    return Response(
        content=content,
        status_code=status,
        media_type="application/json",
        headers={"Idempotent-Replayed": "true" if replayed else "false"},
    )


def _checkout_done(started: float, outcome: str, code: str = "") -> None:
    metrics.CHECKOUTS.inc(outcome=outcome, code=code)
    metrics.CHECKOUT_LATENCY.observe(time.perf_counter() - started, outcome=outcome)


@api.get("", response_model=OrderPage, tags=["orders"])
async def my_orders(
    principal: CurrentUser,
    db: Db,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=50)] = 20,
) -> OrderPage:
    """The caller's orders, newest first; pass `next_cursor` back as `cursor` for the next page."""
    return await orders.list_orders(db, user_id=principal.id, cursor=cursor, limit=limit)


@api.get("/stores/{store_id}", response_model=OrderPage, tags=["staff"])
async def store_orders(
    store_id: uuid.UUID,
    principal: CurrentUser,
    db: Db,
    status: Annotated[orders.Status | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> OrderPage:
    """A store's orders, newest first, optionally by status: staff of that store, ops and
    admins (403 `forbidden_role` otherwise)."""
    orders.user_store_scope(principal, store_id)
    return await orders.list_orders(db, store_id=store_id, status=status, cursor=cursor, limit=limit)


@api.get("/{order_id}", response_model=OrderOut, tags=["orders"])
async def get_order(order_id: uuid.UUID, principal: CurrentUser, db: Db) -> OrderOut:
    """One order with its lines, totals, payment and history. Someone else's order is a 404."""
    order = await orders.get_visible(db, order_id, principal)
    return await orders.order_out(db, order, resources().settings)


@api.post("/{order_id}/cancel", response_model=OrderOut, tags=["orders"])
async def cancel_order(order_id: uuid.UUID, body: CancelIn, principal: CurrentUser, db: Db) -> OrderOut:
    """Cancel your order before it is out for delivery: its stock is released, its coupon use
    given back, and anything paid refunded in full. 409 `invalid_transition` once it is out
    for delivery (or already cancelled), 409 `version_conflict` when `version` is stale."""
    order = await orders.get_visible(db, order_id, principal, to="own", lock=True)
    await orders.change_status(
        db,
        order,
        orders.Status.cancelled,
        actor="customer",
        actor_user_id=principal.id,
        reason=body.reason,
        expected_version=body.version,
        now=utcnow(),
    )
    return await orders.order_out(db, order, resources().settings)


@api.post("/{order_id}/transitions", response_model=OrderOut, tags=["staff"])
async def transition_order(
    order_id: uuid.UUID, body: TransitionIn, principal: CurrentUser, db: Db
) -> OrderOut:
    """Move an order along as the store: `confirmed`, `packed`, or `cancelled` (refunded if
    paid); staff of the order's store, ops and admins. The delivery service moves it on from
    the partner's progress (`out_for_delivery`: the stock leaves the shelf; `delivered`;
    `delivery_failed`; `returned`: back on the shelf, refunded if paid); ops and admins may
    set those by hand only with a `reason` (422 `reason_required`), recorded in the history.
    403 `forbidden_transition` for a move the caller may not make, 409 `invalid_transition`
    for one the lifecycle does not allow, 409 `version_conflict` when `version` is stale."""
    order = await orders.get_visible(db, order_id, principal, to="move", lock=True)
    await orders.change_status(
        db,
        order,
        orders.Status(body.to),
        actor=orders.actor_for_role(principal.role),
        actor_user_id=principal.id,
        reason=body.reason,
        expected_version=body.version,
        now=utcnow(),
    )
    return await orders.order_out(db, order, resources().settings)


class _Background:
    """Orders replicas make sure the relay and the janitor run (created once, detached)."""

    def __init__(self) -> None:
        super().__init__()
        relay()
        janitor()


app = serve_builder(api, "orders", _Background)
