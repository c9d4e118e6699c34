"""The delivery replica's live side: the WebSocket message schemas (also written to
`websockets.schema.json`, since OpenAPI does not cover sockets), the per-replica hub that
subscribes once to the fleet's Redis channel and fans changes out to the sockets this replica
holds (latest state only per socket; tracking messages arrive serialized and are forwarded as
they are), the batcher that turns many partners' position messages into one fleet call per
shard (one call in flight; what arrives meanwhile goes in the next), and one heartbeat for all
its sockets.

Close codes (application range): 4400 malformed message, 4401 not authenticated (bad or
expired token, or no auth message within `delivery_ws_auth_timeout_seconds`), 4403 not
allowed (not a partner, suspended), 4404 no such order (also someone else's), 4413 message
too large, 4429 too many messages (a flood is closed, not queued), 1000 tracking finished,
1011 a fault on the server, 1013 briefly unavailable (both: reconnect).
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
from actors.fleet import Board, PositionBatch, Tracking, read_tracking
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

CLOSE = {
    "malformed": 4400,
    "unauthenticated": 4401,
    "forbidden": 4403,
    "not_found": 4404,
    "too_large": 4413,
    "flood": 4429,
    "finished": 1000,
    "internal": 1011,
    "unavailable": 1013,
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


PING = PingOut(type="ping")

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
    """One accepted socket: bounded reads (size, rate) and a latest-only outbox. Messages are
    models, or text already serialized (tracking events, as the fleet published them)."""

    def __init__(self, ws: WebSocket, max_bytes: int, per_second: float) -> None:
        self.ws = ws
        self.max_bytes = max_bytes
        self.per_second = per_second
        self._allowance = per_second * 2  # a short burst (a reconnect flushing its buffer)
        self._checked = time.monotonic()
        # Keyed by what the message replaces: a slow consumer gets the latest of each.
        self._pending: dict[str, BaseModel | str] = {}
        self._wake = asyncio.Event()
        self._close_after: int | None = None
        self.last_sent = time.monotonic()

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

    def post(self, key: str, message: BaseModel | str, *, then_close: int | None = None) -> None:
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
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            for message in pending.values():
                await self.ws.send_text(message if isinstance(message, str) else message.model_dump_json())
            self.last_sent = time.monotonic()
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
    or a bad message calls for. A sender that ends (it closed the socket, or the socket
    broke) ends the reading too."""
    reader = asyncio.current_task()
    assert reader is not None
    reading = True

    def sender_ended(_: asyncio.Task[None]) -> None:
        if reading:
            reader.cancel()

    sender = asyncio.create_task(socket.sender())
    sender.add_done_callback(sender_ended)
    try:
        while True:
            await handle(await socket.receive())
    except Closed as exc:
        await socket.close(exc.code)
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        pass
    except asyncio.CancelledError:
        if not sender.done():
            raise  # cancelled from outside (the replica stopping), not by the sender
        reader.uncancel()
        if not sender.cancelled():
            sender.exception()  # retrieved: what broke the socket needs no "never retrieved" log
    finally:
        reading = False
        sender.cancel()
        on_close()


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
        from redis.asyncio import Redis

        while True:
            redis = Redis.from_url(self.redis_url, decode_responses=True)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(fleet.EVENTS)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis restarting: resubscribe; clients keep their snapshots
                log.warning("fleet event subscription lost; resubscribing", exc_info=True)
                await asyncio.sleep(1)
            finally:
                await redis.aclose()

    async def _dispatch(self, data: str) -> None:
        if data.startswith("tracking "):  # the hot path: forwarded as published
            order_id, store_id, final, message = read_tracking(data)
            self._board_dirty.add(store_id)
            for socket in list(self.orders.get(order_id, ())):
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
            quiet = time.monotonic() - self.heartbeat_s
            for registry in (self.partners, self.orders, self.boards):
                for sockets in list(registry.values()):
                    for socket in sockets:
                        if socket.last_sent < quiet and not socket.holds("ping"):
                            socket.post("ping", PING)

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
