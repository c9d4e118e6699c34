"""The delivery replica's live side: its sockets' message schemas (registered for
`websockets.schema.json`; the shared socket machinery is `deployments.sockets`), the per-replica hub that
subscribes once to the fleet's Redis channel and fans changes out to the sockets this replica
holds (latest state only per socket; tracking messages arrive serialized and are forwarded as
they are), the batcher that turns many partners' position messages into one fleet call per
shard (one call in flight; what arrives meanwhile goes in the next), and one heartbeat for all
its sockets.

Close codes (`deployments.sockets.CLOSE`) as the delivery sockets use them: 4403 not a
partner or suspended, 4404 no such order (also someone else's), 1000 tracking finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import Field

from actors import fleet
from actors.fleet import Board, PositionBatch, Tracking, read_tracking
from config import metrics
from deployments.sockets import (
    CLOSE,
    SOCKETS,
    AuthIn,
    Message,
    PingIn,
    PingOut,
    Socket,
    ping_quiet,
    subscribe,
)
from models.delivery import DeliveryOut, OfferOut, PartnerOut, PositionIn, PositionRow

log = logging.getLogger("vurksha.live")


def _without_compression() -> None:
    """Serve starts each replica's uvicorn itself, with no way to pass WebSocket options, and
    uvicorn negotiates permessage-deflate by default. Our messages are a few hundred bytes of
    JSON: compressing them costs CPU on both ends and a zlib context per socket, for little.
    So this replica's uvicorn declines the extension (clients fall back to plain frames)."""
    import uvicorn

    init = uvicorn.Config.__init__
    if getattr(init, "vurksha", False):
        return

    def config(self: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("ws_per_message_deflate", False)
        init(self, *args, **kwargs)

    config.vurksha = True  # type: ignore[attr-defined]
    uvicorn.Config.__init__ = config  # type: ignore[method-assign]


_without_compression()


class PositionMsg(PositionIn):
    type: Literal["position"]


class AnswerIn(Message):
    type: Literal["accept", "decline"]
    offer_id: uuid.UUID


PartnerMessage = Annotated[PositionMsg | AnswerIn | PingIn, Field(discriminator="type")]
CustomerIn = PingIn


class ReadyOut(Message):
    type: Literal["ready"] = "ready"
    partner: PartnerOut
    offers: list[OfferOut]
    trip: list[DeliveryOut]


class OfferMsg(Message):
    type: Literal["offer"] = "offer"
    offer: OfferOut
    pickup_eta_s: int


class OfferClosedMsg(Message):
    type: Literal["offer_closed"] = "offer_closed"
    offer_id: uuid.UUID
    status: Literal["expired", "recalled"]
    offline: bool  # the partner was set offline (too many expiries)


class TripMsg(Message):
    type: Literal["trip"] = "trip"
    deliveries: list[DeliveryOut]


class ErrorMsg(Message):
    type: Literal["error"] = "error"
    code: str
    detail: str


class TrackingMsg(Message):
    type: Literal["tracking"] = "tracking"
    tracking: Tracking


class BoardMsg(Message):
    type: Literal["board"] = "board"
    board: Board


PartnerOutMsg = ReadyOut | OfferMsg | OfferClosedMsg | TripMsg | ErrorMsg | PingOut
CustomerOutMsg = TrackingMsg | PingOut
BoardOutMsg = BoardMsg | PingOut

SOCKETS.update(
    {
        "/delivery/ws/partner": (
            "The partner app: positions in, offers out.",
            AuthIn | PartnerMessage,
            PartnerOutMsg,
        ),
        "/delivery/ws/orders/{order_id}": (
            "A customer watching an order.",
            AuthIn | CustomerIn,
            CustomerOutMsg,
        ),
        "/delivery/ws/stores/{store_id}/board": (
            "A store's live board (staff, ops).",
            AuthIn | PingIn,
            BoardOutMsg,
        ),
    }
)


# ---------------------------------------------------------------- the replica's hub


class Hub:
    """One per replica: the Redis subscription, the sockets by what they watch, and the
    position batcher."""

    def __init__(
        self,
        redis_url: str,
        heartbeat_s: float,
        on_partner_event: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.redis_url = redis_url
        # A fleet event for a partner with a socket here (the service renders it).
        self.on_partner_event = on_partner_event
        self.heartbeat_s = heartbeat_s
        self.partners: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self.orders: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self.boards: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self._board_dirty: set[uuid.UUID] = set()
        self._positions: dict[uuid.UUID, PositionBatch] = {}  # by partner
        self._has_positions = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen()),
                asyncio.create_task(self._flush_positions()),
                asyncio.create_task(self._boards()),
                asyncio.create_task(self._heartbeats()),
            ]

    async def _listen(self) -> None:
        await subscribe(self.redis_url, fleet.EVENTS, self._dispatch, "fleet event")

    async def _dispatch(self, data: str) -> None:
        if data.startswith("tracking "):  # the hot path: forwarded as published
            order_id, store_id, final, made_s, message = read_tracking(data)
            self._board_dirty.add(store_id)
            watchers = self.orders.get(order_id)
            if watchers:
                metrics.TRACKING_LATENCY.observe(max(0.0, time.time() - made_s))
            for socket in list(watchers or ()):
                socket.post("tracking", message, then_close=CLOSE["finished"] if final else None)
            return
        event = json.loads(data)
        self._board_dirty.add(uuid.UUID(event["store_id"]))
        if "partner_id" in event and uuid.UUID(event["partner_id"]) in self.partners:
            await self.on_partner_event(event)

    async def _heartbeats(self) -> None:
        """One timer for every socket here: a `ping` to each that sent nothing for a while."""
        while True:
            await asyncio.sleep(self.heartbeat_s / 3)
            for registry in (self.partners, self.orders, self.boards):
                for sockets in list(registry.values()):
                    ping_quiet(sockets, self.heartbeat_s)

    def watch_board(self, store_id: uuid.UUID, socket: Socket) -> None:
        self.boards[store_id].add(socket)
        self._board_dirty.add(store_id)

    async def _boards(self) -> None:
        """A store's board is fetched once a second at most, for all its sockets together."""
        while True:
            await asyncio.sleep(1)
            dirty, self._board_dirty = self._board_dirty, set()
            for store_id in dirty:
                sockets = self.boards.get(store_id)
                if not sockets:
                    continue
                try:
                    board = await fleet.on_fleet(store_id, "board")
                except Exception:
                    log.warning("board of store %s unavailable", store_id, exc_info=True)
                    continue
                for socket in list(sockets):
                    socket.post("board", BoardMsg(board=board))

    def position(self, store_id: uuid.UUID, partner_id: uuid.UUID, point: PositionRow) -> None:
        batch = self._positions.get(partner_id)
        if batch is None:
            batch = self._positions[partner_id] = (str(store_id), str(partner_id), [])
        batch[2].append(point)
        self._has_positions.set()

    async def _flush_positions(self) -> None:
        """Positions go to their shards as soon as they arrive while no call is in flight;
        those arriving during a call go together in the next. So the batch grows with the
        load (and the calls do not), and an idle replica adds no waiting."""
        while True:
            await self._has_positions.wait()
            self._has_positions.clear()
            batches, self._positions = list(self._positions.values()), {}
            try:
                await fleet.ingest(batches)
            except Exception:
                log.warning(
                    "positions of %d partners not delivered to the fleet", len(batches), exc_info=True
                )

    def forget(self, registry: dict[uuid.UUID, set[Socket]], key: uuid.UUID, socket: Socket) -> None:
        sockets = registry.get(key)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del registry[key]
