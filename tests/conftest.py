"""Test harness. Service tests run against the real backend: PostgreSQL and Redis (the
machine's when DATABASE_URL/REDIS_URL are set, embedded otherwise) and a local Ray Serve
started once per session through the same launcher as `make run`."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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
# A promoted recommender model reaches the replicas within half a second.
os.environ.setdefault("VURKSHA_RECOMMENDER_POLL_SECONDS", "0.5")
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


_PHONES_ISSUED: set[str] = set()


def fake_phone() -> str:
    """A phone number no other caller in this run got (the database is emptied at the start of
    a run; 10^8 numbers still collide now and then over the thousands a run creates)."""
    while True:
        phone = "+9198" + "".join(secrets.choice("0123456789") for _ in range(8))
        if phone not in _PHONES_ISSUED:
            _PHONES_ISSUED.add(phone)
            return phone


_CHANGES_AUTH = re.compile(r"\s*(UPDATE|DELETE FROM|INSERT INTO)\s+(users|auth_sessions)\b", re.I)


@dataclass
class Live:
    base_url: str
    database_url: str
    redis_url: str

    def client(self, ip: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"X-Forwarded-For": ip or fake_ip(), **kw.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kw)

    def sql(self, query: str, *, announce: bool = True, **params: Any) -> list[Any]:
        """Run one statement directly in PostgreSQL (to inspect state or move a clock). A
        change to users or sessions made this way is then announced as ops would after one
        by hand (`vurksha auth reset`), so the authentication cache does not hide it, unless
        `announce` is false."""
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

        rows = asyncio.run(go())
        if _CHANGES_AUTH.match(query) and announce:
            self.reset_auth_cache()
        return rows

    def reset_auth_cache(self) -> None:
        import redis

        from deployments.common import AuthCache

        with redis.Redis.from_url(self.redis_url) as client:
            client.incr(AuthCache.EPOCH)  # what `vurksha auth reset` does

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def production_app(live: Live, app: str) -> Iterator[str]:
    """One service's FastAPI app (`deployments.x:api`) under uvicorn with production settings
    (real-looking secrets, the live database), yielding its base URL once it is healthy."""
    port = _free_port()
    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    env = {
        **os.environ,
        "VURKSHA_ENV": "production",
        "DATABASE_URL": live.database_url,
        "REDIS_URL": live.redis_url,
        "VURKSHA_OTP_PEPPER": "a-real-secret-pepper",
        "VURKSHA_CURSOR_SECRET": "a-real-cursor-key",
        "VURKSHA_JWT_PRIVATE_KEY": key.decode(),
        "VURKSHA_SMS_PROVIDER": "http",
        "VURKSHA_SMS_ACCOUNT_SID": "AC0000",
        "VURKSHA_SMS_AUTH_TOKEN": "token",
        "VURKSHA_ADMIN_PHONE": "+919812345678",
        "VURKSHA_RAZORPAY_BASE_URL": "https://api.razorpay.com",
        "VURKSHA_RAZORPAY_KEY_ID": "rzp_live_x",
        "VURKSHA_RAZORPAY_KEY_SECRET": "live-secret",
        "VURKSHA_RAZORPAY_WEBHOOK_SECRET": "whsec",
        "VURKSHA_FCM_BASE_URL": "https://fcm.googleapis.com",
        "VURKSHA_FCM_SERVICE_ACCOUNT": '{"project_id": "p"}',
        "VURKSHA_SMTP_HOST": "smtp.example.com",
    }
    command = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/healthz")
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert health.status_code == 200, health.text
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The whole-API fuzz runs last: the random stores, products and orders it writes cannot
    change what another test sees."""
    items.sort(key=lambda item: item.path.name == "test_fuzz_api.py")
