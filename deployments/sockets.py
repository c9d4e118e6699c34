"""What every WebSocket of ours shares: authentication in the first message, bounded reads
(size, rate: a flood is closed, not queued), a latest-only outbox per socket, heartbeats,
the application close codes, and the JSON Schemas of each socket's messages (written to
`websockets.schema.json`, since OpenAPI does not cover sockets).

Close codes (application range): 4400 malformed message, 4401 not authenticated (bad or
expired token, or no auth message within the auth timeout), 4403 not allowed, 4404 no such
thing (also someone else's), 4413 message too large, 4429 too many messages, 1000 finished,
1011 a fault on the server, 1013 briefly unavailable (both: reconnect).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from config import metrics
from deployments.common import Principal, authenticate, resources
from models.errors import ServiceUnavailable, Unauthorized

log = logging.getLogger("vurksha.sockets")

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


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthIn(Message):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=4096)


class PingIn(Message):
    type: Literal["ping", "pong"]


class PingOut(Message):
    type: Literal["ping", "pong"]


PING = PingOut(type="ping")

# path -> (description, client-to-server messages, server-to-client messages), filled by the
# modules that serve sockets.
SOCKETS: dict[str, tuple[str, Any, Any]] = {}


def schema_document() -> dict[str, Any]:
    """Every socket's messages both ways as JSON Schemas, with the close codes."""
    return {
        "title": "Vurksha WebSockets",
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
            for path, (description, incoming, outgoing) in sorted(SOCKETS.items())
        },
    }


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


def ping_quiet(sockets: Any, heartbeat_s: float) -> None:
    """A `ping` to each of `sockets` that sent nothing for a heartbeat period."""
    quiet = time.monotonic() - heartbeat_s
    for socket in sockets:
        if socket.last_sent < quiet and not socket.holds("ping"):
            socket.post("ping", PING)


async def subscribe(
    redis_url: str, channel: str, on_message: Callable[[str], Awaitable[None]], what: str
) -> None:
    """Hand every message of a Redis channel to `on_message`, for as long as the replica
    runs: one subscription per replica, fanned out to its own sockets. A lost connection
    (Redis restarting) resubscribes; clients keep what they last got."""
    from redis.asyncio import Redis

    while True:
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        await on_message(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s subscription lost; resubscribing", what, exc_info=True)
            await asyncio.sleep(1)
        finally:
            await redis.aclose()


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
    route = getattr(socket.ws.scope.get("route"), "path", "?")
    _count_open(route, +1)
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
        _count_open(route, -1)
        on_close()


_OPEN: collections.Counter[str] = collections.Counter()


def _count_open(route: str, change: int) -> None:
    """This replica's open sockets per route (a gauge: Prometheus sums the replicas)."""
    _OPEN[route] += change
    metrics.WEBSOCKETS.set(_OPEN[route], socket=route)


async def open_socket(ws: WebSocket) -> tuple[Socket, Principal]:
    """Accept, then authenticate from the first message (never the query string): a token
    as `{"type": "auth", "token": ...}` within the auth timeout."""
    settings = resources().settings
    await ws.accept()
    socket = Socket(ws, settings.delivery_ws_max_message_bytes, settings.delivery_ws_max_messages_per_second)
    try:
        body = await socket.receive(wait_s=settings.delivery_ws_auth_timeout_seconds)
        token = AuthIn.model_validate(body).token
        res = resources()
        access = await res.auth.lookup(res.tokens.verify(token))
        async with res.sessionmaker() as db:
            principal = await authenticate(db, access)
    except (TimeoutError, ValidationError, Unauthorized):
        raise Closed("unauthenticated") from None
    return socket, principal


async def guard(ws: WebSocket, run: Callable[[], Awaitable[None]]) -> None:
    """Close with the code the failure calls for; a client that left needs nothing."""
    try:
        await run()
        return
    except WebSocketDisconnect:
        return
    except Closed as exc:  # a refusal: the code says which
        code = exc.code
    except ServiceUnavailable:  # a shard restarting: the client reconnects shortly
        code = CLOSE["unavailable"]
    except PoolTimeout:  # a reconnect storm larger than the connection pool: come back later
        log.warning("socket %s: no database connection free; told to reconnect", ws.url.path)
        code = CLOSE["unavailable"]
    except Exception:  # a fault of ours: logged, and the client told to come back (1011)
        log.exception("socket %s failed", ws.url.path)
        code = CLOSE["internal"]
    with contextlib.suppress(Exception):
        await ws.close(code)
