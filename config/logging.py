"""Logging setup. Secrets must never reach a log line, so a filter masks anything that looks
like a bearer token, a refresh token or a JWT even if a careless caller formats one in."""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

_SECRET_PATTERNS = [
    re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+"),  # JWTs
    re.compile(r"rt_[\w-]{20,}"),  # our refresh tokens
    re.compile(r"(?i)(bearer\s+)[\w.-]+"),
]


class RedactSecrets(logging.Filter):
    @staticmethod
    def text(message: str) -> str:
        for pattern in _SECRET_PATTERNS:
            message = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", message)
        return message

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# The launcher's progress lines: on the terminal at INFO when everything else goes to a file.
STEPS = "vurksha.steps"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Warnings Ray prints on local starts that say nothing wrong about this setup: kept in the log
# file, not shown to a newcomer as if something were. Serve binds loopback on purpose, and on
# two cores Ray starts workers two at a time, so a replica may wait over 30 s for its turn (a
# replica that never starts still fails the deploy step, loudly).
BENIGN = (
    re.compile(r"HTTPOptions\.host='127\.0\.0\.1' won't accept connections from HAProxy"),
    re.compile(r"replicas that have taken more than \d+s to be scheduled"),
)


def _for_terminal(record: logging.LogRecord) -> bool:
    if record.name == STEPS:
        return True
    return record.levelno >= logging.WARNING and not any(p.search(record.getMessage()) for p in BENIGN)


# The request a log line is written for: the ASGI scope's `state` of the request being served
# (its `request_id`, and `user_id` once authenticated), set by the request-id middleware.
REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("vurksha_request", default=None)
# Fields a log call may add with `extra=` that JSON lines carry (a request line's).
_EXTRA = ("method", "path", "status", "latency_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request's id and user id
    when there is a request, a request line's method, path, status and latency, and the
    traceback. Messages are redacted before they get here (RedactSecrets)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (state := REQUEST.get()) is not None:
            entry["request_id"] = state.get("request_id")
            if "user_id" in state:
                entry["user_id"] = state["user_id"]
        for key in _EXTRA:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = RedactSecrets.text(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def _formatter(fmt: Literal["text", "json"]) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT)


def setup_logging(
    level: str = "INFO", log_file: Path | None = None, fmt: Literal["text", "json"] = "text"
) -> None:
    """Configure the root logger once per process (launcher, replicas, actors), in the human
    format or as JSON lines (`fmt`, settings.log_format).

    With `log_file` (the `vurksha run` terminal) everything at `level` goes to that file, and
    the terminal gets only the launcher's steps, warnings and errors."""
    root = logging.getLogger()
    if any(isinstance(f, RedactSecrets) for h in root.handlers for f in h.filters):
        return
    console = logging.StreamHandler()
    console.addFilter(RedactSecrets())
    if log_file is None:
        console.setFormatter(_formatter(fmt))
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(_formatter(fmt))
        to_file.addFilter(RedactSecrets())
        root.addHandler(to_file)
        console.setFormatter(_TerminalFormatter())
        console.addFilter(_for_terminal)
    root.addHandler(console)
    root.setLevel(level.upper())


class _TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == STEPS:
            return f"==> {record.getMessage()}"
        return f"{record.levelname} {record.name}: {super().format(record)}"


# A line of a worker's output that reports trouble: our format ("<date> <time> LEVEL name:"),
# Serve's ("LEVEL <date> ..."), a Python warning, or the start of a traceback.
_TROUBLE = re.compile(
    r"^(?:\d{4}-\d\d-\d\d [\d:,.]+ )?(?:WARNING|ERROR|CRITICAL)\b|^\w*Warning: |^Traceback \(most recent"
)
# What continues a traceback or multi-line error: indented lines and the exception line.
_CONTINUES = re.compile(r"^\s|^[\w.]+(?:Error|Exception|Exit|Interrupt)\b")


class WorkerLogRouter:
    """Ray forwards every worker's output to the driver (`log_to_driver`); this handler for it
    writes all of it to `log_file` and copies only warnings, errors and tracebacks to
    `terminal`, so a start shows its steps instead of hundreds of INFO lines."""

    def __init__(self, log_file: Path, terminal: TextIO) -> None:
        self._file = log_file.open("a", buffering=1)
        self._terminal = terminal
        self._redact = RedactSecrets()
        self._showing: dict[object, bool] = {}  # per worker: inside a reported block

    def __call__(self, data: dict[str, Any]) -> None:
        source = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({source} pid={data.get('pid')})"
        key = data.get("pid")
        for line in data.get("lines", ()):
            line = self._redact.text(line)
            self._file.write(f"{prefix} {line}\n")
            if _TROUBLE.search(line):
                show = not any(p.search(line) for p in BENIGN)
            else:
                show = self._showing.get(key, False) and bool(_CONTINUES.search(line))
            self._showing[key] = show
            if show:
                self._terminal.write(f"{prefix} {line}\n")
        self._terminal.flush()

    def close(self) -> None:
        self._file.close()
