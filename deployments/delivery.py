"""Delivery service (`/delivery`): partners (attach, suspend, shifts, cash), positions, offers,
trips and their status, live tracking and the store's live board.

Every route is one hop: authenticate, check who may do it (`models.delivery`), then call the
fleet shard holding the store (`actors.fleet`), which writes PostgreSQL and keeps the live view.
"""

from __future__ import annotations

import uuid

from fastapi import Depends

from actors import fleet
from actors.fleet import Board, IngestAck, PositionBatch, Tracking
from actors.outbox import relay
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
from models import delivery, orders, outbox
from models.db import utcnow
from models.delivery import DeliveryOut, OfferOut, PartnerIn, PartnerOut, ShiftIn, StatusIn
from models.delivery_rules import DeliveryActor
from models.users import Role, normalize_phone

api = create_api(
    "delivery",
    title="Vurksha delivery",
    description="Partner presence and positions, assignment, routing and live tracking.",
)

OPS = Depends(require_role(Role.admin, Role.ops))


# ---------------------------------------------------------------- partners (ops)


@api.post("/partners", status_code=201, response_model=PartnerOut, tags=["partners"], dependencies=[OPS])
async def attach_partner(body: PartnerIn, db: Db) -> PartnerOut:
    """Make a user (by phone; created if new: they log in by OTP) a delivery partner of a
    store with a vehicle, or move an idle partner to another store. Admins and ops only.
    404 `store_not_found`, 409 `role_conflict` for staff/ops/admins, 409 `partner_busy` for a
    partner moved while on a trip or holding an offer."""
    phone = normalize_phone(body.phone, resources().settings.phone_default_region)
    partner = await delivery.attach_partner(db, body, phone, utcnow())
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
    return delivery.partner_out(await delivery.partner_for(db, principal.user))


@api.post("/partners/me/shift", response_model=PartnerOut, tags=["partner app"])
async def shift(body: ShiftIn, principal: CurrentUser, db: Db) -> PartnerOut:
    """Go online (offers come once a fresh position is in) or offline (409 `active_delivery`
    while carrying orders; an open offer is recalled)."""
    partner = await delivery.partner_for(db, principal.user)
    await db.commit()
    out: PartnerOut = await fleet.on_fleet(partner.store_id, "shift", partner.user_id, body.online)
    return out


@api.post("/partners/me/positions", response_model=IngestAck, tags=["partner app"])
async def positions(body: delivery.PositionsIn, principal: CurrentUser, db: Db) -> IngestAck:
    """A batch of up to 100 timestamped points (what the app buffered while its socket was
    asleep). Filtered like the socket's: invalid, future, inaccurate, too close in time or
    impossibly fast points are dropped and counted by reason; points older than the live
    position go to the trail only."""
    partner = await delivery.partner_for(db, principal.user)
    await db.commit()
    batch = PositionBatch(store_id=partner.store_id, partner_id=partner.user_id, points=body.rows())
    return (await fleet.ingest([batch]))[0]


@api.get("/partners/me/offers", response_model=list[OfferOut], tags=["partner app"])
async def my_offers(principal: CurrentUser, db: Db) -> list[OfferOut]:
    """The partner's open offer, if any (at most one), with its expiry."""
    partner = await delivery.partner_for(db, principal.user)
    return [
        OfferOut.model_validate(o, from_attributes=True)
        for o in await delivery.open_offers(db, partner.user_id, utcnow())
    ]


async def _answer(offer_id: uuid.UUID, accept: bool, principal: Principal, db: Db) -> list[DeliveryOut]:
    partner = await delivery.partner_for(db, principal.user)
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
    partner = await delivery.partner_for(db, principal.user)
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
        partner = await delivery.partner_for(db, principal.user)
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
    if principal.role == Role.staff and orders.works_for(principal.user, store_id):
        return "staff"
    raise delivery.DeliveryNotFound("No such delivery")


# ---------------------------------------------------------------- customers and the store


@api.get("/orders/{order_id}/tracking", response_model=Tracking, tags=["tracking"])
async def tracking(order_id: uuid.UUID, principal: CurrentUser, db: Db) -> Tracking:
    """Where the order is: its status, the partner's first name and vehicle, their live
    position and the ETA, and the PIN once they have arrived. Only the order's customer
    (anyone else: 404, as for a missing order)."""
    order = await orders.get_visible(db, order_id, principal.user)
    if order.user_id != principal.id:
        raise orders.order_not_found()
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
    orders.user_store_scope(principal.user, store_id)
    await db.commit()
    snapshot: Board = await fleet.on_fleet(store_id, "board")
    return snapshot


@api.post("/stores/{store_id}/round", response_model=int, tags=["store"], dependencies=[OPS])
async def run_round(store_id: uuid.UUID) -> int:
    """Run the store's dispatch round now (it runs every few seconds anyway); returns the
    offers made. Admins and ops."""
    made: int = await fleet.on_fleet(store_id, "round_now")
    return made


# ---------------------------------------------------------------- outbox subscriber


class _Subscriber:
    """Order events from the outbox (at least once): a confirmed order joins its store's
    queue, any other move updates the live view (a cancelled one is recalled)."""

    def __init__(self) -> None:
        super().__init__()
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


app = serve_builder(api, "delivery", _Subscriber)
