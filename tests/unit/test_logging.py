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
