"""Logging setup. Secrets must never reach a log line, so a filter masks anything that looks
like a bearer token, a refresh token or a JWT even if a careless caller formats one in."""

from __future__ import annotations

import logging
import re

_SECRET_PATTERNS = [
    re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+"),  # JWTs
    re.compile(r"rt_[\w-]{20,}"),  # our refresh tokens
    re.compile(r"(?i)(bearer\s+)[\w.-]+"),
]


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _SECRET_PATTERNS:
            redacted = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process (launcher, replicas, actors)."""
    root = logging.getLogger()
    if any(isinstance(f, RedactSecrets) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root.addHandler(handler)
    root.setLevel(level.upper())
