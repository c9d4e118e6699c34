"""What `vurksha run` shows on the terminal and what only goes to its log file: the launcher's
steps, warnings and errors (with their tracebacks) reach the terminal; INFO chatter, from our
loggers or forwarded from Ray's workers, stays in the file; no secret reaches either."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.logging import STEPS, WorkerLogRouter, setup_logging

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


@pytest.fixture
def run_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, io.StringIO]]:
    """The root logger as `vurksha run` sets it up, writing the terminal into a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers.clear()
    terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    log_file = tmp_path / "logs" / "vurksha.log"
    setup_logging("INFO", log_file)
    try:
        yield log_file, terminal
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved


def test_terminal_gets_steps_and_warnings_the_file_gets_everything(run_logging):
    log_file, terminal = run_logging
    logging.getLogger(STEPS).info("database schema migrated")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade 0002 -> 0003")
    logging.getLogger("vurksha.launcher").warning("stopping orphaned Serve haproxy")
    logging.getLogger("vurksha.launcher").warning(
        "HTTPOptions.host='127.0.0.1' won't accept connections from HAProxy on other nodes"
    )
    logging.getLogger("vurksha.users").error("token %s refused", JWT)

    shown = terminal.getvalue()
    assert "==> database schema migrated" in shown
    assert "WARNING vurksha.launcher: stopping orphaned Serve haproxy" in shown
    assert "Running upgrade" not in shown
    assert "HTTPOptions.host" not in shown  # known and harmless on a local start
    assert "ERROR vurksha.users: token [redacted] refused" in shown
    written = log_file.read_text()
    for line in ("database schema migrated", "Running upgrade 0002 -> 0003", "HTTPOptions.host", "[redacted]"):
        assert line in written
    assert JWT not in written + shown


def test_worker_output_is_filed_and_only_trouble_is_shown(tmp_path):
    log_file = tmp_path / "worker.log"
    terminal = io.StringIO()
    route = WorkerLogRouter(log_file, terminal)
    route(
        {
            "pid": 41,
            "actor_name": "ServeController",
            "lines": [
                "INFO 2026-11-27 14:05:15,536 controller 41 -- Deploying new app 'users'.",
                "WARNING 2026-11-27 14:05:16,000 controller 41 -- Deployment 'users' is unhealthy.",
                "INFO 2026-11-27 14:05:17,000 controller 41 -- Adding 1 replica.",
            ],
        }
    )
    route(
        {
            "pid": 42,
            "task_name": "ServeReplica:orders",
            "lines": [
                "2026-11-27 14:05:20,000 ERROR vurksha.orders: checkout failed",
                "Traceback (most recent call last):",
                '  File "models/orders.py", line 1, in place_order',
                f"ValueError: bad token {JWT}",
                "2026-11-27 14:05:21,000 INFO vurksha.orders: recovered",
                "    indented INFO continuation is not trouble",
            ],
        }
    )
    route.close()
    shown = terminal.getvalue().splitlines()
    assert shown == [
        "(ServeController pid=41) WARNING 2026-11-27 14:05:16,000 controller 41 -- Deployment 'users' is unhealthy.",
        "(ServeReplica:orders pid=42) 2026-11-27 14:05:20,000 ERROR vurksha.orders: checkout failed",
        "(ServeReplica:orders pid=42) Traceback (most recent call last):",
        '(ServeReplica:orders pid=42)   File "models/orders.py", line 1, in place_order',
        "(ServeReplica:orders pid=42) ValueError: bad token [redacted]",
    ]
    filed = log_file.read_text().splitlines()
    assert len(filed) == 9
    assert "(ServeController pid=41) INFO 2026-11-27 14:05:15,536 controller 41 -- Deploying new app 'users'." in filed
    assert JWT not in log_file.read_text()


# ---------------------------------------------------------------- JSON lines


@pytest.fixture
def json_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The root logger as a replica sets it up with VURKSHA_LOG_FORMAT=json, request lines on."""
    from config.settings import get_settings

    monkeypatch.setenv("VURKSHA_LOG_REQUESTS", "true")
    get_settings.cache_clear()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers.clear()
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("INFO", fmt="json")
    try:
        yield out
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
        get_settings.cache_clear()


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    """Our lines (the test's HTTP client logs its own)."""
    import json

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if str(line["logger"]).startswith("vurksha")]


def test_json_lines_carry_the_request_id_user_id_and_latency_never_a_token(json_lines):
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from config.logging import REQUEST
    from deployments.common import RequestIdMiddleware

    async def order(request: Request) -> JSONResponse:
        state = REQUEST.get()
        assert state is not None
        state["user_id"] = "u-1"  # what authentication records
        logging.getLogger("vurksha.orders").info("placing with %s", f"Bearer {JWT}")
        return JSONResponse({"ok": True}, status_code=201)

    app = RequestIdMiddleware(Starlette(routes=[Route("/orders/{order_id}", order, methods=["POST"])]))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(
                "/orders/123?otp=654321", headers={"X-Request-ID": "req-42", "Authorization": f"Bearer {JWT}"}
            )

    import asyncio

    assert asyncio.run(call()).status_code == 201
    app_line, request_line = _lines(json_lines)
    assert app_line["logger"] == "vurksha.orders" and app_line["level"] == "INFO"
    assert app_line["request_id"] == "req-42" and app_line["user_id"] == "u-1"
    assert app_line["message"] == "placing with Bearer [redacted]"
    assert request_line["logger"] == "vurksha.access"
    assert (request_line["method"], request_line["path"], request_line["status"]) == ("POST", "/orders/{order_id}", 201)
    assert isinstance(request_line["latency_ms"], float) and request_line["latency_ms"] >= 0
    assert request_line["request_id"] == "req-42" and request_line["user_id"] == "u-1"
    text = str(_lines(json_lines))
    assert JWT not in text and "654321" not in text and "/orders/123" not in text


def test_json_lines_outside_a_request_have_no_request_fields_and_keep_tracebacks(json_lines):
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        logging.getLogger("vurksha.relay").exception("delivery failed")
    (line,) = _lines(json_lines)
    assert "request_id" not in line and "user_id" not in line
    assert line["level"] == "ERROR" and "ValueError: bad token [redacted]" in str(line["exc"])
