"""The services' own HTTP request time limit (Serve's is off: it also ended WebSockets)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from deployments.common import RequestTimeoutMiddleware

LIMIT_S = 0.2


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params["s"]))
    return JSONResponse({"ok": True})


async def fails(request: Request) -> JSONResponse:
    raise TimeoutError("a timeout of the route's own, not the request's")


async def streams(request: Request) -> StreamingResponse:
    async def body():  # type: ignore[no-untyped-def]
        yield b"first"
        await asyncio.sleep(1)
        yield b"never"

    return StreamingResponse(body())


async def socket(ws: WebSocket) -> None:
    await ws.accept()
    await asyncio.sleep(LIMIT_S * 3)  # longer than any HTTP request may take
    await ws.send_text("still here")
    await ws.close()


def app() -> Starlette:
    routes = [
        Route("/slow", slow),
        Route("/fails", fails),
        Route("/streams", streams),
        WebSocketRoute("/ws", socket),
    ]
    api = Starlette(routes=routes)
    api.add_middleware(RequestTimeoutMiddleware, timeout_s=LIMIT_S)
    return api


@pytest.fixture
async def client():  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://t") as c:
        yield c


async def test_a_request_within_the_limit_is_answered(client: httpx.AsyncClient) -> None:
    response = await client.get("/slow", params={"s": 0})
    assert response.status_code == 200 and response.json() == {"ok": True}


async def test_a_request_over_the_limit_gets_a_504_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/slow", params={"s": LIMIT_S * 5})
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "request_timeout"


async def test_a_timeout_raised_by_the_route_itself_is_not_called_the_request_s(
    client: httpx.AsyncClient,
) -> None:
    with pytest.raises(TimeoutError, match="of the route's own"):
        await client.get("/fails")


async def test_a_response_already_streaming_is_cut_not_replaced(client: httpx.AsyncClient) -> None:
    with pytest.raises(TimeoutError):
        await client.get("/streams")


async def test_a_websocket_outlives_the_request_limit() -> None:
    sent: list[dict[str, object]] = []
    incoming = asyncio.Queue[dict[str, object]]()
    incoming.put_nowait({"type": "websocket.connect"})

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "root_path": ""}
    await app()(scope, incoming.get, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "still here"
