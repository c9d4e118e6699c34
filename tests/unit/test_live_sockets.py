"""The delivery sockets' own rules, without a backend: how a socket ends when its handler
fails (each cause closes with the code that tells the app what to do: 4xxx stop and fix the
request, 1011/1013 reconnect), driven as an ASGI WebSocket session; and the replica's one
heartbeat timer."""

import asyncio
import time
import uuid
from typing import Any

import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from deployments.live import Hub
from deployments.sockets import CLOSE, PING, Closed, Socket, guard
from models.errors import ServiceUnavailable


async def close_code_when_failing_with(exc: Exception) -> int:
    async def endpoint(ws: WebSocket) -> None:
        async def run() -> None:
            await ws.accept()
            raise exc

        await guard(ws, run)

    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "websocket.connect"})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "root_path": ""}
    await Starlette(routes=[WebSocketRoute("/ws", endpoint)])(scope, incoming.get, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    return int(sent[-1]["code"])


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Closed("flood"), CLOSE["flood"]),
        (ServiceUnavailable("fleet shard restarting"), CLOSE["unavailable"]),
        (PoolTimeout("QueuePool limit reached"), CLOSE["unavailable"]),
        (RuntimeError("a bug of ours"), CLOSE["internal"]),
    ],
)
async def test_a_failing_socket_closes_with_the_code_for_its_cause(exc: Exception, code: int) -> None:
    assert await close_code_when_failing_with(exc) == code


async def test_the_heartbeat_pings_only_sockets_that_have_been_quiet() -> None:
    async def no_partner_events(event: dict[str, Any]) -> None:
        raise AssertionError("no fleet events here")

    hub = Hub("redis://unused", heartbeat_s=0.6, on_partner_event=no_partner_events)
    quiet, busy, board = (Socket(None, 1024, 10) for _ in range(3))  # type: ignore[arg-type]
    hub.orders[uuid.uuid4()].add(quiet)
    hub.partners[uuid.uuid4()].add(busy)
    hub.watch_board(uuid.uuid4(), board)
    quiet.last_sent = board.last_sent = time.monotonic() - 5
    beating = asyncio.create_task(hub._heartbeats())
    try:
        for _ in range(8):  # busy keeps sending: never pinged (a heartbeat every 0.2 s)
            busy.last_sent = time.monotonic()
            await asyncio.sleep(0.05)
    finally:
        beating.cancel()
    assert quiet._pending == {"ping": PING} and board._pending == {"ping": PING}
    assert not busy.holds("ping")
