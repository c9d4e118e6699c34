"""Test harness. Service tests run against the real backend: PostgreSQL and Redis (the
machine's when DATABASE_URL/REDIS_URL are set, embedded otherwise) and a local Ray Serve
started once per session through the same launcher as `make run`."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

ROOT = Path(__file__).resolve().parent.parent

# Set before anything reads settings: the Ray workers inherit this environment.
from deployments.launcher import local_ray_env  # noqa: E402

local_ray_env()
os.environ["VURKSHA_ENV"] = "test"
os.environ.setdefault("VURKSHA_DATA_DIR", str(ROOT / ".vurksha" / "test"))
os.environ.setdefault("VURKSHA_HTTP_PORT", "8000")
os.environ.setdefault("VURKSHA_RATE_LIMIT_PER_IP_PER_MINUTE", "300")
os.environ.setdefault("VURKSHA_RATE_LIMIT_PER_USER_PER_MINUTE", "120")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Background work on test time scales: payments pending for a second are reconciled, a relay
# that dies mid-delivery has its events leased back after 5 s...
os.environ.setdefault("VURKSHA_RECONCILE_AFTER_SECONDS", "1")
os.environ.setdefault("VURKSHA_OUTBOX_LEASE_SECONDS", "5")
os.environ.setdefault("VURKSHA_OUTBOX_POLL_SECONDS", "0.5")
# ...and an event its subscriber keeps refusing is dead-lettered within seconds.
os.environ.setdefault("VURKSHA_OUTBOX_MAX_ATTEMPTS", "5")
os.environ.setdefault("VURKSHA_OUTBOX_BACKOFF_BASE_SECONDS", "0.2")


# CI must be repeatable (a submission lands only on green): there the property tests and the
# API fuzzers draw the same examples every run. Locally they explore fresh ones each time.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def fake_ip() -> str:
    """A documentation-range address (RFC 3849) for X-Forwarded-For: each test client gets
    its own, so per-IP limits of one test do not leak into another. No traffic goes there."""
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"


def fake_phone() -> str:
    return "+9198" + "".join(secrets.choice("0123456789") for _ in range(8))


@dataclass
class Live:
    base_url: str
    database_url: str
    redis_url: str

    def client(self, ip: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"X-Forwarded-For": ip or fake_ip(), **kw.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kw)

    def sql(self, query: str, **params: Any) -> list[Any]:
        """Run one statement directly in PostgreSQL (to inspect state or move a clock)."""
        from sqlalchemy import text

        from models.db import make_engine

        async def go() -> list[Any]:
            engine = make_engine(self.database_url, pool_size=1, max_overflow=0)
            try:
                async with engine.begin() as conn:
                    result = await conn.execute(text(query), params)
                    return list(result.all()) if result.returns_rows else []
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def outbox_code(self, client: httpx.Client, phone: str) -> str:
        response = client.get("/notifications/dev/outbox", params={"to": phone})
        assert response.status_code == 200, response.text
        match = re.match(r"^(\d{6}) ", response.json()[0]["body"])
        assert match, response.json()
        return match.group(1)

    def request_otp(self, client: httpx.Client, phone: str) -> dict[str, Any]:
        response = client.post("/users/auth/otp", json={"phone": phone})
        assert response.status_code == 202, response.text
        return response.json()

    def login(self, phone: str | None = None, client: httpx.Client | None = None) -> Session:
        client = client or self.client()
        if phone is None:
            phone = fake_phone()
        else:  # a repeat login: step past the resend window of the previous code
            self.sql(
                "UPDATE otp_challenges SET created_at = created_at - interval '31 seconds' WHERE phone = :p",
                p=phone,
            )
        challenge = self.request_otp(client, phone)
        code = self.outbox_code(client, phone)
        response = client.post(
            "/users/auth/verify", json={"challenge_id": challenge["challenge_id"], "code": code}
        )
        assert response.status_code == 200, response.text
        return Session(client=client, phone=phone, tokens=response.json())


@dataclass
class Session:
    client: httpx.Client
    phone: str
    tokens: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens['access_token']}"}

    @property
    def user_id(self) -> str:
        return str(self.tokens["user"]["id"])

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.client.request(method, url, headers={**self.auth, **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="session")
def live() -> Iterator[Live]:
    from config.settings import get_settings
    from deployments.launcher import backend

    get_settings.cache_clear()
    with backend(reset=True) as settings:
        assert settings.database_url and settings.redis_url
        yield Live(
            base_url=f"http://{settings.http_host}:{settings.http_port}",
            database_url=settings.database_url,
            redis_url=settings.redis_url,
        )


@pytest.fixture
def user(live: Live) -> Session:
    return live.login()
