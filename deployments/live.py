"""The delivery replica's live side: the WebSocket message schemas (also written to
`websockets.schema.json`, since OpenAPI does not cover sockets), the per-replica hub that
subscribes once to the fleet's Redis channel and fans changes out to the sockets this replica
holds (latest state only per socket), and the coalescer that turns many partners' position
messages into one fleet call per shard every `partner_position_coalesce_ms`.

Close codes (application range): 4400 malformed message, 4401 not authenticated (bad or
expired token, or no auth message within `delivery_ws_auth_timeout_seconds`), 4403 not
allowed (not a partner, suspended), 4404 no such order (also someone else's), 4413 message
too large, 4429 too many messages (a flood is closed, not queued), 1000 tracking finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from actors import fleet
from actors.fleet import Board, PositionBatch, Tracking
from models.delivery import DeliveryOut, OfferOut, PartnerOut, PositionIn

log = logging.getLogger("vurksha.live")

CLOSE = {
    "malformed": 4400,
    "unauthenticated": 4401,
    "forbidden": 4403,
    "not_found": 4404,
    "too_large": 4413,
    "flood": 4429,
    "finished": 1000,
}

# ---------------------------------------------------------------- messages


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthIn(Message):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=4096)


class PositionMsg(PositionIn):
    type: Literal["position"]


class AnswerIn(Message):
    type: Literal["accept", "decline"]
    offer_id: uuid.UUID


class PingIn(Message):
    type: Literal["ping", "pong"]


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


class PingOut(Message):
    type: Literal["ping", "pong"]


class TrackingMsg(Message):
    type: Literal["tracking"] = "tracking"
    tracking: Tracking


class BoardMsg(Message):
    type: Literal["board"] = "board"
    board: Board


PartnerOutMsg = ReadyOut | OfferMsg | OfferClosedMsg | TripMsg | ErrorMsg | PingOut
CustomerOutMsg = TrackingMsg | PingOut
BoardOutMsg = BoardMsg | PingOut

SOCKETS: dict[str, tuple[str, Any, Any]] = {
    "/delivery/ws/partner": (
        "The partner app: positions in, offers out.",
        AuthIn | PartnerMessage,
        PartnerOutMsg,
    ),
    "/delivery/ws/orders/{order_id}": ("A customer watching an order.", AuthIn | CustomerIn, CustomerOutMsg),
    "/delivery/ws/stores/{store_id}/board": (
        "A store's live board (staff, ops).",
        AuthIn | PingIn,
        BoardOutMsg,
    ),
}


def schema_document() -> dict[str, Any]:
    """Every socket's messages both ways as JSON Schemas, with the close codes."""
    return {
        "title": "Vurksha delivery WebSockets",
        "description": (
            "The first message on every socket must be `auth` (within the auth timeout). "
            "Heartbeats: the server sends `ping` every few seconds; answer `pong`."
        ),
        "close_codes": CLOSE,
        "sockets": {
            path: {
                "description": description,
                "client_to_server": TypeAdapter(incoming).json_schema(),
                "server_to_client": TypeAdapter(outgoing).json_schema(),
            }
            for path, (description, incoming, outgoing) in SOCKETS.items()
        },
    }


# ---------------------------------------------------------------- a socket with bounds


class Closed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.code = CLOSE[reason]


class Socket:
    """One accepted socket: bounded reads (size, rate), a latest-only outbox, heartbeats."""

    def __init__(self, ws: WebSocket, max_bytes: int, per_second: float, heartbeat_s: float) -> None:
        self.ws = ws
        self.heartbeat_s = heartbeat_s
        self.max_bytes = max_bytes
        self.per_second = per_second
        self._allowance = per_second * 2  # a short burst (a reconnect flushing its buffer)
        self._checked = time.monotonic()
        # Keyed by what the message replaces: a slow consumer gets the latest of each.
        self._pending: dict[str, BaseModel] = {}
        self._wake = asyncio.Event()
        self._close_after: int | None = None

    async def receive(self, wait_s: float | None = None) -> dict[str, Any]:
        message = await asyncio.wait_for(self.ws.receive(), wait_s)
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        raw = message.get("text") if message.get("text") is not None else message.get("bytes")
        if raw is None or len(raw) > self.max_bytes:
            raise Closed("too_large")
        now = time.monotonic()
        self._allowance = min(self.per_second * 2, self._allowance + (now - self._checked) * self.per_second)
        self._checked = now
        if self._allowance < 1:
            raise Closed("flood")
        self._allowance -= 1
        try:
            body = json.loads(raw)
        except ValueError:
            raise Closed("malformed") from None
        if not isinstance(body, dict):
            raise Closed("malformed")
        return body

    def post(self, key: str, message: BaseModel, *, then_close: int | None = None) -> None:
        """Queue for sending; replaces an unsent message with the same key. `then_close`:
        close the socket with this code once it is sent."""
        self._pending[key] = message
        if then_close is not None:
            self._close_after = then_close
        self._wake.set()

    def holds(self, key: str) -> bool:
        return key in self._pending

    async def sender(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
            self._wake.clear()
            pending, self._pending = self._pending, {}
            if not pending:
                pending = {"ping": PingOut(type="ping")}
            for message in pending.values():
                await self.ws.send_text(message.model_dump_json())
            if self._close_after is not None:
                await self.close(self._close_after)
                return

    async def answer_pings(self, body: dict[str, Any]) -> None:
        """What a watching socket may send: heartbeats (a `ping` is answered)."""
        try:
            message = PingIn.model_validate(body)
        except ValidationError:
            raise Closed("malformed") from None
        if message.type == "ping":
            self.post("pong", PingOut(type="pong"))

    async def close(self, code: int) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)


async def serve_socket(
    socket: Socket,
    handle: Callable[[dict[str, Any]], Awaitable[None]],
    on_close: Callable[[], None],
) -> None:
    """Read messages into `handle` while a sender task writes; close with the code a bound
    or a bad message calls for."""
    sender = asyncio.create_task(socket.sender())
    try:
        while True:
            receiving = asyncio.ensure_future(socket.receive())
            done, _ = await asyncio.wait({receiving, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                receiving.cancel()
                sender.result()  # raises what ended it (a closed socket)
                return
            await handle(receiving.result())
    except Closed as exc:
        await socket.close(exc.code)
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        pass
    finally:
        sender.cancel()
        on_close()


# ---------------------------------------------------------------- the replica's hub


class Hub:
    """One per replica: the Redis subscription, the sockets by what they watch, and the
    position coalescer."""

    def __init__(
        self,
        redis_url: str,
        coalesce_ms: int,
        on_partner_event: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.redis_url = redis_url
        # A fleet event for a partner with a socket here (the service renders it).
        self.on_partner_event = on_partner_event
        self.coalesce_s = coalesce_ms / 1000
        self.partners: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self.orders: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self.boards: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self._board_dirty: set[uuid.UUID] = set()
        self._positions: dict[uuid.UUID, PositionBatch] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen()),
                asyncio.create_task(self._flush_positions()),
                asyncio.create_task(self._boards()),
            ]

    async def _listen(self) -> None:
        from redis.asyncio import Redis

        while True:
            redis = Redis.from_url(self.redis_url, decode_responses=True)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(fleet.EVENTS)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await self._dispatch(json.loads(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis restarting: resubscribe; clients keep their snapshots
                log.warning("fleet event subscription lost; resubscribing", exc_info=True)
                await asyncio.sleep(1)
            finally:
                await redis.aclose()

    async def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if "store_id" in event:
            self._board_dirty.add(uuid.UUID(event["store_id"]))
        if kind == "tracking":
            message = TrackingMsg(tracking=Tracking.model_validate(event["snapshot"]))
            for socket in list(self.orders.get(uuid.UUID(event["order_id"]), ())):
                socket.post("tracking", message, then_close=CLOSE["finished"] if event.get("final") else None)
        elif "partner_id" in event and uuid.UUID(event["partner_id"]) in self.partners:
            await self.on_partner_event(event)

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

    def position(self, store_id: uuid.UUID, partner_id: uuid.UUID, point: PositionIn) -> None:
        batch = self._positions.get(partner_id)
        if batch is None:
            batch = self._positions[partner_id] = PositionBatch(
                store_id=store_id, partner_id=partner_id, points=[]
            )
        batch.points.append(point.row())

    async def _flush_positions(self) -> None:
        while True:
            await asyncio.sleep(self.coalesce_s)
            if not self._positions:
                continue
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
