"""Delivery service (`/delivery`): partners (attach, suspend, shifts, cash), positions, offers,
trips and their status, live tracking and the store's live board.

Every route is one hop: authenticate, check who may do it (`models.delivery`), then call the
fleet shard holding the store (`actors.fleet`), which writes PostgreSQL and keeps the live view.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Query, WebSocket
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

from actors import call, fleet, routing
from actors.fleet import Board, IngestAck, Tracking
from actors.outbox import relay
from actors.routing import RouteOptimizer
from deployments.common import (
    CurrentUser,
    Db,
    IdempotencyKey,
    Principal,
    create_api,
    require_role,
    resources,
    serve_builder,
)
from deployments.live import (
    AnswerIn,
    ErrorMsg,
    Hub,
    OfferClosedMsg,
    OfferMsg,
    PartnerMessage,
    PositionMsg,
    ReadyOut,
    TrackingMsg,
    TripMsg,
)
from deployments.sockets import CLOSE, Closed, PingOut, guard, open_socket, serve_socket
from models import delivery, orders, outbox
from models.db import utcnow
from models.delivery import DeliveryOut, OfferOut, PartnerIn, PartnerOut, ShiftIn, StatusIn
from models.delivery_rules import DeliveryActor
from models.errors import AppError
from models.routing import RoutingProblem, RoutingSolution
from models.users import Role

log = logging.getLogger("vurksha.delivery")

# A route problem for ops: up to 2,000 stops and 500 vehicles of a few hundred bytes each.
MAX_PROBLEM_BYTES = 1024 * 1024

api = create_api(
    "delivery",
    title="Vurksha delivery",
    description="Partner presence and positions, assignment, routing and live tracking.",
    body_limits={"/routes/optimize": MAX_PROBLEM_BYTES},
)

OPS = Depends(require_role(Role.admin, Role.ops))
# Nothing more will move on the map: a tracking socket gets the snapshot and is closed (1000).
TRACKING_OVER = frozenset(
    {
        orders.Status.delivered,
        orders.Status.cancelled,
        orders.Status.returned,
        orders.Status.partially_refunded,
        orders.Status.refunded,
    }
)


# ---------------------------------------------------------------- partners (ops)


@api.post("/partners", status_code=201, response_model=PartnerOut, tags=["partners"], dependencies=[OPS])
async def attach_partner(body: PartnerIn, db: Db) -> PartnerOut:
    """Make a user (by phone; created if new: they log in by OTP) a delivery partner of a
    store with a vehicle, or move an idle partner to another store. Admins and ops only.
    404 `store_not_found`, 409 `role_conflict` for staff/ops/admins, 409 `partner_busy` for a
    partner moved while on a trip or holding an offer."""
    partner = await delivery.attach_partner(db, body, utcnow())
    await db.commit()
    await fleet.on_fleet(partner.store_id, "reinstated", partner.user_id)
    return delivery.partner_out(partner)


@api.get("/partners", response_model=list[PartnerOut], tags=["partners"], dependencies=[OPS])
async def list_partners(db: Db, store_id: uuid.UUID) -> list[PartnerOut]:
    """A store's partners. Admins and ops only."""
    return [delivery.partner_out(p) for p in await delivery.store_partners(db, store_id)]


async def _suspension(db: Db, partner_id: uuid.UUID, suspended: bool) -> PartnerOut:
    partner = await delivery.get_partner(db, partner_id, lock=True)
    await delivery.set_suspended(db, partner, suspended, utcnow())
    await db.commit()
    await fleet.on_fleet(partner.store_id, "suspended" if suspended else "reinstated", partner.user_id)
    return delivery.partner_out(partner)


@api.post("/partners/{partner_id}/suspend", response_model=PartnerOut, tags=["partners"], dependencies=[OPS])
async def suspend_partner(partner_id: uuid.UUID, db: Db) -> PartnerOut:
    """Suspend a partner: offline at once, their open offer recalled, their sockets closed
    (close code 4403). Their active deliveries stay theirs for ops to finish or override."""
    return await _suspension(db, partner_id, True)


@api.post(
    "/partners/{partner_id}/reinstate", response_model=PartnerOut, tags=["partners"], dependencies=[OPS]
)
async def reinstate_partner(partner_id: uuid.UUID, db: Db) -> PartnerOut:
    """Lift a suspension (the partner goes online again themselves)."""
    return await _suspension(db, partner_id, False)


@api.post("/partners/{partner_id}/deposits", response_model=PartnerOut, tags=["partners"])
async def record_deposit(
    partner_id: uuid.UUID,
    body: delivery.DepositIn,
    db: Db,
    key: IdempotencyKey,
    principal: Principal = OPS,
) -> PartnerOut:
    """Record cash a partner handed in: their cash in hand drops by it (409
    `deposit_exceeds_cash` beyond it). Idempotent per `Idempotency-Key`. Admins and ops."""
    partner = await delivery.record_deposit(db, partner_id, body.amount_paise, key, principal.id, utcnow())
    return delivery.partner_out(partner)


# ---------------------------------------------------------------- the partner's own


@api.get("/partners/me", response_model=PartnerOut, tags=["partner app"])
async def me(principal: CurrentUser, db: Db) -> PartnerOut:
    """The calling partner: store, vehicle, shift, cash in hand."""
    return delivery.partner_out(await delivery.partner_for(db, principal))


@api.post("/partners/me/shift", response_model=PartnerOut, tags=["partner app"])
async def shift(body: ShiftIn, principal: CurrentUser, db: Db) -> PartnerOut:
    """Go online (offers come once a fresh position is in) or offline (409 `active_delivery`
    while carrying orders; an open offer is recalled)."""
    partner = await delivery.partner_for(db, principal)
    await db.commit()
    out: PartnerOut = await fleet.on_fleet(partner.store_id, "shift", partner.user_id, body.online)
    return out


@api.post("/partners/me/positions", response_model=IngestAck, tags=["partner app"])
async def positions(body: delivery.PositionsIn, principal: CurrentUser, db: Db) -> IngestAck:
    """A batch of up to 100 timestamped points (what the app buffered while its socket was
    asleep). Filtered like the socket's: invalid, future, inaccurate, too close in time or
    impossibly fast points are dropped and counted by reason; points older than the live
    position go to the trail only."""
    partner = await delivery.partner_for(db, principal)
    await db.commit()
    batch = (str(partner.store_id), str(partner.user_id), body.rows())
    return IngestAck.of((await fleet.ingest([batch]))[0])


@api.get("/partners/me/offers", response_model=list[OfferOut], tags=["partner app"])
async def my_offers(principal: CurrentUser, db: Db) -> list[OfferOut]:
    """The partner's open offer, if any (at most one), with its expiry."""
    partner = await delivery.partner_for(db, principal)
    return [
        OfferOut.model_validate(o, from_attributes=True)
        for o in await delivery.open_offers(db, partner.user_id, utcnow())
    ]


async def _answer(offer_id: uuid.UUID, accept: bool, principal: Principal, db: Db) -> list[DeliveryOut]:
    partner = await delivery.partner_for(db, principal)
    await db.commit()
    await fleet.on_fleet(partner.store_id, "answer", partner.user_id, offer_id, accept)
    return await delivery.partner_trip(db, partner.user_id)


@api.post("/offers/{offer_id}/accept", response_model=list[DeliveryOut], tags=["partner app"])
async def accept_offer(offer_id: uuid.UUID, principal: CurrentUser, db: Db) -> list[DeliveryOut]:
    """Take the offered trip: one delivery per order, in drop order. 409 `offer_closed` once
    it expired or was recalled, 409 `order_taken` if an order went elsewhere; 404 for an
    offer that is not yours."""
    return await _answer(offer_id, True, principal, db)


@api.post("/offers/{offer_id}/decline", response_model=list[DeliveryOut], tags=["partner app"])
async def decline_offer(offer_id: uuid.UUID, principal: CurrentUser, db: Db) -> list[DeliveryOut]:
    """Say no: the orders go to someone else and are never offered to you again."""
    return await _answer(offer_id, False, principal, db)


@api.get("/partners/me/trip", response_model=list[DeliveryOut], tags=["partner app"])
async def my_trip(principal: CurrentUser, db: Db) -> list[DeliveryOut]:
    """The partner's active deliveries in drop order: address, customer, cash to collect."""
    partner = await delivery.partner_for(db, principal)
    return await delivery.partner_trip(db, partner.user_id)


@api.post("/deliveries/{delivery_id}/status", response_model=DeliveryOut, tags=["partner app"])
async def delivery_status(
    delivery_id: uuid.UUID, body: StatusIn, principal: CurrentUser, db: Db
) -> DeliveryOut:
    """Move a delivery along: `at_store`, `picked_up` (409 `order_not_packed` until packed;
    the order goes out for delivery), `arrived` (the customer's app shows the PIN),
    `delivered` (the customer's 4-digit `pin`: 422 `wrong_pin` with `attempts_left`, 409
    `pin_locked` after five; cash on delivery also needs `cash_collected_paise` equal to
    the amount due, 422 `cash_mismatch`), `failed` (with a `reason`). The store's staff
    confirm a failed delivery's bag is back (`returned`: stock on the shelf, paid orders
    refunded); ops and admins may set any status, with a reason. A partner moves only their
    own deliveries (404 otherwise)."""
    actor: DeliveryActor
    if principal.role == Role.partner:
        partner = await delivery.partner_for(db, principal)
        actor, store_id = "partner", partner.store_id
    else:
        store_id = await delivery.store_of_delivery(db, delivery_id)
        actor = _staff_actor(principal, store_id)
    await db.commit()
    out: DeliveryOut = await fleet.on_fleet(store_id, "advance", delivery_id, body, actor, principal.id)
    return out


def _staff_actor(principal: Principal, store_id: uuid.UUID) -> DeliveryActor:
    """Staff of the delivery's store, ops or admins; anyone else gets the same 404 as a
    missing delivery."""
    if principal.role in (Role.ops, Role.admin):
        return "ops" if principal.role == Role.ops else "admin"
    if principal.role == Role.staff and orders.works_for(principal, store_id):
        return "staff"
    raise delivery.DeliveryNotFound("No such delivery")


# ---------------------------------------------------------------- customers and the store


@api.get("/orders/{order_id}/tracking", response_model=Tracking, tags=["tracking"])
async def tracking(order_id: uuid.UUID, principal: CurrentUser, db: Db) -> Tracking:
    """Where the order is: its status, the partner's first name and vehicle, their live
    position and the ETA, and the PIN once they have arrived. Only the order's customer
    (anyone else: 404, as for a missing order)."""
    order = await orders.get_visible(db, order_id, principal, to="own")
    await db.commit()
    snapshot: Tracking = await fleet.on_fleet(order.store_id, "tracking", order.id, order.status)
    return snapshot


@api.get("/stores/{store_id}/board", response_model=Board, tags=["store"])
async def board(store_id: uuid.UUID, principal: CurrentUser, db: Db) -> Board:
    """The store's live board: partners (state, position, trail, orders) and the orders
    waiting, offered or on the road, with how long each has waited. Staff of the store,
    ops and admins."""
    if principal.role not in (Role.staff, Role.ops, Role.admin):
        raise orders.staff_only()
    orders.user_store_scope(principal, store_id)
    await db.commit()
    snapshot: Board = await fleet.on_fleet(store_id, "board")
    return snapshot


@api.post("/stores/{store_id}/round", response_model=int, tags=["store"], dependencies=[OPS])
async def run_round(store_id: uuid.UUID) -> int:
    """Run the store's dispatch round now (it runs every few seconds anyway); returns the
    offers made. Admins and ops."""
    made: int = await fleet.on_fleet(store_id, "round_now")
    return made


# ---------------------------------------------------------------- route optimization (ops)


TimeLimit = Annotated[
    float | None,
    Query(
        gt=0,
        le=25,
        description="Search time in seconds (default `VURKSHA_ROUTE_OPTIMIZER_TIME_LIMIT_SECONDS`, "
        "capped at `VURKSHA_ROUTE_OPTIMIZER_MAX_TIME_LIMIT_SECONDS`). The best solution found "
        "when it runs out is returned, with `stats.time_limit_reached`.",
    ),
]


async def _optimize(problem: RoutingProblem, time_limit_s: float | None) -> RoutingSolution:
    handle = await routing.optimizer()
    solution: RoutingSolution = await call(
        handle.solve.remote(problem, time_limit_s),
        unavailable="The route optimizer is briefly unavailable; please retry",
        code="route_optimizer_unavailable",
    )
    return solution


@api.post("/routes/optimize", response_model=RoutingSolution, tags=["routes"], dependencies=[OPS])
async def optimize_routes(problem: RoutingProblem, time_limit_s: TimeLimit = None) -> RoutingSolution:
    """Plan vehicle routes with time windows (OR-Tools; the route optimizer deployment).
    Times are whole seconds from `origin`, capacities and demands items; travel times are the
    delivery ETA model's (haversine distance x road factor / the vehicle type's speed). Late
    service costs `lateness_cost_per_s` per second; a stop no vehicle can serve is left out
    and listed in `dropped` with its reason. Admins and ops."""
    return await _optimize(problem, time_limit_s)


@api.post(
    "/stores/{store_id}/routes/plan", response_model=RoutingSolution, tags=["routes"], dependencies=[OPS]
)
async def plan_store_queue(store_id: uuid.UUID, time_limit_s: TimeLimit = None) -> RoutingSolution:
    """A what-if, not applied: the optimizer's multi-vehicle plan for the store's queue now
    (orders not yet offered) over its online partners, each riding from where they are to
    the store and on to the drops (pickup-before-drop pairs; stop ids `pickup:<order id>` and
    `<order id>`). Times are seconds from now. Admins and ops."""
    problem: RoutingProblem = await fleet.on_fleet(store_id, "queue_problem")
    return await _optimize(problem, time_limit_s)


# ---------------------------------------------------------------- the dispatcher's map

MAP_PAGE = (Path(__file__).parent / "static" / "dispatch.html").read_text()
# The page's one inline script, allowed by its hash: nothing else may run or load.
_SCRIPT = re.search(r"<script>(.*?)</script>", MAP_PAGE, re.S)
assert _SCRIPT is not None
MAP_POLICY = (
    "default-src 'none'; connect-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_SCRIPT.group(1).encode()).digest()).decode()}'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@api.get("/map", response_class=HTMLResponse, tags=["store"])
async def dispatch_map() -> HTMLResponse:
    """The dispatcher's live map: one self-contained page (no external scripts, tiles or
    fonts) drawing a store's partners, their trails, queued orders and trips from the board
    socket. It asks for an access token and a store (or reads `#token=…&store=…`, which the
    browser never sends to a server)."""
    return HTMLResponse(
        MAP_PAGE, headers={"Content-Security-Policy": MAP_POLICY, "Cache-Control": "no-store"}
    )


# ---------------------------------------------------------------- WebSockets

_hub: Hub | None = None


def hub() -> Hub:
    """This replica's hub, started with its first socket."""
    global _hub
    if _hub is None:
        settings = resources().settings
        assert settings.redis_url
        _hub = Hub(settings.redis_url, settings.delivery_ws_heartbeat_seconds, _partner_event)
    _hub.start()
    return _hub


@api.websocket("/ws/partner")
async def partner_socket(ws: WebSocket) -> None:
    """The partner app's socket (messages in `websockets.schema.json`): positions in (batched
    before they reach the fleet), offers, recalls and the trip out, accept/decline in."""

    async def run() -> None:
        socket, principal = await open_socket(ws)
        live = hub()
        async with resources().sessionmaker() as db:
            try:
                partner = await delivery.partner_for(db, principal)
            except AppError:
                raise Closed("forbidden") from None
            # Listening before reading: an offer made meanwhile is in the read or in an event.
            live.partners[partner.user_id].add(socket)
            socket.post(
                "ready",
                ReadyOut(
                    partner=delivery.partner_out(partner),
                    offers=[
                        OfferOut.model_validate(o, from_attributes=True)
                        for o in await delivery.open_offers(db, partner.user_id, utcnow())
                    ],
                    trip=await delivery.partner_trip(db, partner.user_id),
                ),
            )
        parse = TypeAdapter(PartnerMessage).validate_python

        async def handle(body: dict[str, Any]) -> None:
            try:
                message = parse(body)
            except ValidationError:
                raise Closed("malformed") from None
            if isinstance(message, PositionMsg):
                live.position(partner.store_id, partner.user_id, message.row())
            elif isinstance(message, AnswerIn):
                try:
                    await fleet.on_fleet(
                        partner.store_id,
                        "answer",
                        partner.user_id,
                        message.offer_id,
                        message.type == "accept",
                    )
                except AppError as exc:
                    socket.post("error", ErrorMsg(code=exc.code, detail=exc.message))
            elif message.type == "ping":
                socket.post("pong", PingOut(type="pong"))

        await serve_socket(socket, handle, lambda: live.forget(live.partners, partner.user_id, socket))

    await guard(ws, run)


async def _partner_event(event: dict[str, Any]) -> None:
    """A fleet event for a partner with a socket on this replica."""
    partner_id = uuid.UUID(event["partner_id"])
    sockets = list(hub().partners.get(partner_id, ()))
    kind = event["type"]
    if kind == "offer":
        message: BaseModel = OfferMsg(
            offer=OfferOut.model_validate(event["offer"]), pickup_eta_s=event["pickup_eta_s"]
        )
    elif kind == "offer_closed":
        message = OfferClosedMsg(offer_id=event["offer_id"], status=event["status"], offline=event["offline"])
    elif kind == "trip":
        async with resources().sessionmaker() as db:
            message = TripMsg(deliveries=await delivery.partner_trip(db, partner_id))
    elif kind == "kick":
        for socket in sockets:
            socket.post(
                "error",
                ErrorMsg(code="partner_suspended", detail="Suspended by ops"),
                then_close=CLOSE["forbidden"],
            )
        return
    else:
        return
    for socket in sockets:
        socket.post(kind, message)


@api.websocket("/ws/orders/{order_id}")
async def order_socket(ws: WebSocket, order_id: uuid.UUID) -> None:
    """A customer watching their order: a snapshot on connect, then each change (only the
    latest if they fall behind), closed with 1000 once delivered or cancelled. Someone
    else's order closes with 4404, as a missing one does."""

    async def run() -> None:
        socket, principal = await open_socket(ws)
        try:
            async with resources().sessionmaker() as db:
                order = await orders.get_visible(db, order_id, principal, to="own")
        except AppError:
            raise Closed("not_found") from None
        live = hub()
        live.orders[order.id].add(socket)  # before the snapshot: no change can fall between
        snapshot: Tracking = await fleet.on_fleet(order.store_id, "tracking", order.id, order.status)
        if not socket.holds("tracking"):
            over = orders.Status(order.status) in TRACKING_OVER
            socket.post(
                "tracking", TrackingMsg(tracking=snapshot), then_close=CLOSE["finished"] if over else None
            )

        await serve_socket(socket, socket.answer_pings, lambda: live.forget(live.orders, order.id, socket))

    await guard(ws, run)


@api.websocket("/ws/stores/{store_id}/board")
async def board_socket(ws: WebSocket, store_id: uuid.UUID) -> None:
    """A store's live board, at most once a second while anything changes. Staff of the
    store, ops and admins (others: 4403)."""

    async def run() -> None:
        socket, principal = await open_socket(ws)
        if principal.role not in (Role.staff, Role.ops, Role.admin) or not orders.works_for(
            principal, store_id
        ):
            raise Closed("forbidden")
        live = hub()
        live.watch_board(store_id, socket)

        await serve_socket(socket, socket.answer_pings, lambda: live.forget(live.boards, store_id, socket))

    await guard(ws, run)


# ---------------------------------------------------------------- outbox subscriber


class _Subscriber:
    """Order events from the outbox (at least once): a confirmed order joins its store's
    queue, any other move updates the live view (a cancelled one is recalled)."""

    def __init__(self, *bound: Any) -> None:
        super().__init__(*bound)
        relay()
        fleet.fleet_shards()

    async def consume(self, event: outbox.Event) -> str:
        if not event.topic.startswith("order."):
            raise ValueError(f"delivery does not subscribe to {event.topic}")
        store_id = uuid.UUID(str(event.payload["store_id"]))
        order_id = uuid.UUID(str(event.payload["order_id"]))
        status = str(event.payload["status"])
        if status == orders.Status.confirmed:
            queued = await fleet.on_fleet(store_id, "enqueue", order_id)
            return "queued" if queued else "already queued or no longer dispatchable"
        await fleet.on_fleet(store_id, "order_changed", order_id, status)
        return f"live view: {status}"


# Every open WebSocket is an ongoing request for its whole life: a replica holds thousands of
# mostly idle sockets (partners and watching customers), not 200 busy requests.
app = serve_builder(api, "delivery", _Subscriber, bind=[RouteOptimizer], max_ongoing_requests=10_000)
