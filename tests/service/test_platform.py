"""The shared HTTP layer and the platform: health of every application, problem documents,
request ids, rate limits, OpenAPI, migrations, and production hardening."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import yaml
from sqlalchemy import make_url, text

from deployments.common import resolve_client_ip
from deployments.launcher import SERVE_CONFIG
from deployments.openapi import OPENAPI_FILE, WEBSOCKETS_FILE, render, render_websockets
from models.db import WriteInRead, make_engine, make_sessionmaker, read_only
from models.migrate import downgrade, upgrade
from tests.conftest import ROOT, Live, Session, fake_ip, production_app

APPS = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]


@pytest.mark.parametrize("app", APPS, ids=lambda a: a["name"])
def test_every_application_is_healthy(live: Live, app: dict):
    response = live.client().get(f"{app['route_prefix']}/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "service": app["name"],
        "checks": {"postgres": "ok", "redis": "ok"},
    }


def test_unknown_route_is_a_problem_document_with_request_id(live: Live):
    response = live.client().get("/users/nope", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "req-123"
    body = response.json()
    assert body == {
        "type": "urn:vurksha:problem:not_found",
        "title": "Not Found",
        "status": 404,
        "code": "not_found",
        "detail": "Not Found",
        "request_id": "req-123",
    }


def test_request_id_is_generated_when_missing(live: Live):
    response = live.client().get("/users/me")
    assert response.status_code == 401
    assert (
        response.headers["x-request-id"] and response.json()["request_id"] == response.headers["x-request-id"]
    )
    assert response.headers["x-content-type-options"] == "nosniff"


def test_malformed_json_is_422_not_500(live: Live):
    response = live.client().post(
        "/users/auth/otp", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


def _too_large(response: httpx.Response) -> bool:
    body = response.json()
    return response.status_code == 413 and body["code"] == "payload_too_large" and bool(body["request_id"])


def test_oversized_bodies_are_refused_before_they_are_read(live: Live, user: Session):
    """A 5 MB profile update is a 413 whether it says its length or streams without one, and
    nothing of it is applied; routes made for more (bulk imports, webhooks) take more."""
    name = user.client.get("/users/me", headers=user.auth).json()["name"]
    huge = b'{"name": "' + b"x" * 5_000_000 + b'"}'
    declared = user.client.patch(
        "/users/me", content=huge, headers={**user.auth, "content-type": "application/json"}
    )
    assert _too_large(declared), declared.text

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(huge), 65_536):
            yield huge[i : i + 65_536]

    streamed = user.client.patch(
        "/users/me", content=chunks(), headers={**user.auth, "content-type": "application/json"}
    )
    assert "content-length" not in streamed.request.headers
    assert _too_large(streamed), streamed.text
    assert user.client.get("/users/me", headers=user.auth).json()["name"] == name
    # 1 MB is over the default but within a bulk import's limit: the customer is refused as a
    # customer (403), not for the size; a webhook's limit is 256 KB.
    rows = [{"sku": f"BIG{i}", "name": "x" * 900} for i in range(1_000)]
    assert user.client.post("/products/import", json={"products": rows}, headers=user.auth).status_code == 403
    webhook = live.client().post(
        "/payments/webhooks/razorpay",
        content=b"{" + b" " * 300_000 + b"}",
        headers={"X-Razorpay-Signature": "x"},
    )
    assert _too_large(webhook), webhook.text


def test_validation_errors_do_not_echo_input(live: Live):
    response = live.client().post("/users/auth/verify", json={"challenge_id": "x", "code": "secret-code-99"})
    assert response.status_code == 422 and "secret-code-99" not in response.text


def fresh_window(needed_seconds: float = 20) -> None:
    """Limits count per fixed minute: start a burst early in a window so it cannot straddle
    two windows (where the count restarts)."""
    into = time.time() % 60
    if into > 60 - needed_seconds:
        time.sleep(60 - into + 0.1)


def test_per_ip_rate_limit_with_retry_after(live: Live):
    client = live.client(ip=fake_ip())
    fresh_window()
    statuses = [client.get("/users/me").status_code for _ in range(301)]
    assert statuses[:300] == [401] * 300 and statuses[300] == 429
    limited = client.get("/users/me")
    assert limited.json()["code"] == "rate_limited" and 1 <= int(limited.headers["retry-after"]) <= 60
    assert live.client().get("/users/me").status_code == 401  # other callers are unaffected


def test_per_user_rate_limit_follows_the_user_across_networks(live: Live, user: Session):
    fresh_window()
    statuses = [
        user.client.get("/users/me", headers={**user.auth, "X-Forwarded-For": fake_ip()}).status_code
        for _ in range(121)
    ]
    assert statuses[:120] == [200] * 120 and statuses[120] == 429


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored():
    """Only trusted proxies may set the client address; unit-level check of the rule."""
    trusted = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")]
    assert resolve_client_ip("203.0.113.9", "198.51.100.1", trusted) == "203.0.113.9"
    assert resolve_client_ip("127.0.0.1", "198.51.100.1, 203.0.113.7", trusted) == "203.0.113.7"
    assert resolve_client_ip("127.0.0.1", "198.51.100.1, 203.0.113.7, 10.1.2.3", trusted) == "203.0.113.7"
    assert resolve_client_ip("127.0.0.1", "garbage", trusted) == "127.0.0.1"
    assert resolve_client_ip("127.0.0.1", "", trusted) == "127.0.0.1"


def test_merged_openapi_is_current():
    assert OPENAPI_FILE.read_text() == render(), "openapi.json is stale: run `make openapi`"
    assert WEBSOCKETS_FILE.read_text() == render_websockets(), (
        "websockets.schema.json is stale: run `make openapi`"
    )


def test_migrations_run_down_and_up_from_empty(live: Live):
    """In a separate, empty database, so the live backend keeps its schema."""
    name = "vurksha_migration_test"

    async def recreate() -> None:
        engine = make_engine(live.database_url, pool_size=1, max_overflow=0)
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            await conn.execute(text(f"CREATE DATABASE {name}"))
        await engine.dispose()

    asyncio.run(recreate())
    url = make_url(live.database_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    downgrade(url, "base")
    upgrade(url)


def test_reads_run_without_a_transaction_and_writes_are_refused_before_they_are_sent(live: Live):
    """The engine GET and HEAD requests use: no BEGIN (two statements of one session are two
    transactions, so their now() differ); a write or a row lock never reaches PostgreSQL."""
    marker = f"read-only-{time.time_ns()}"

    async def go() -> tuple[bool, list[str]]:
        engine = make_engine(live.database_url, pool_size=1, max_overflow=0)
        try:
            async with make_sessionmaker(read_only(engine))() as db:
                first = await db.scalar(text("SELECT now()"))
                second = await db.scalar(text("SELECT now()"))
                refused = []
                for statement in (
                    "INSERT INTO stores (id, name) VALUES (gen_random_uuid(), :m)",
                    "UPDATE stores SET name = :m WHERE false",
                    "WITH gone AS (DELETE FROM stores WHERE name = :m RETURNING id) SELECT 1",
                    "SELECT id FROM stores LIMIT 1 FOR UPDATE",
                    "SELECT id FROM stores LIMIT 1 FOR NO KEY UPDATE",
                ):
                    with pytest.raises(WriteInRead):
                        await db.execute(text(statement), {"m": marker} if ":m" in statement else {})
                    refused.append(statement.split()[0])
                assert await db.scalar(text("SELECT count(*) FROM stores")) is not None
            async with engine.begin() as conn:  # the engine it came from still writes
                await conn.execute(text("CREATE TEMP TABLE scratch (x int)"))
                await conn.execute(text("INSERT INTO scratch VALUES (1)"))
            return first != second, refused
        finally:
            await engine.dispose()

    separate, refused = asyncio.run(go())
    assert separate, "two reads of one session ran in one transaction"
    assert len(refused) == 5
    assert live.sql("SELECT count(*) FROM stores WHERE name = :m", m=marker)[0][0] == 0


def test_the_pool_hands_connections_out_first_come_first_served(live: Live):
    """Eight tasks share the pool's one connection, each asking again a moment after giving it
    back: they get it in the order they asked. (SQLAlchemy's own asyncio queue let a newcomer
    take a connection just returned for a waiter: 20-35 of these 160 grants out of order.)"""

    async def go() -> list[int]:
        engine = make_engine(live.database_url, pool_size=1, max_overflow=0)
        tickets, granted, pause = itertools.count(), [], random.Random(1)

        async def worker() -> None:
            for _ in range(20):
                ticket = next(tickets)
                async with engine.connect() as conn:
                    granted.append(ticket)
                    await conn.execute(text("SELECT 1"))
                await asyncio.sleep(pause.random() * 0.002)

        try:
            await asyncio.gather(*(worker() for _ in range(8)))
        finally:
            await engine.dispose()
        return granted

    granted = asyncio.run(go())
    assert granted == sorted(granted) and len(granted) == 160


def test_dev_outbox_is_404_in_production(live: Live):
    """The notifications app started with production settings, under uvicorn, over HTTP."""
    with production_app(live, "deployments.notifications:api") as base:
        response = httpx.get(f"{base}/dev/outbox", params={"to": "+919812345678"})
        assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_production_refuses_to_start_with_default_secrets():
    env = {**os.environ, "VURKSHA_ENV": "production"}
    result = subprocess.run(
        [sys.executable, "-c", "from config.settings import get_settings; get_settings()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "refusing to start in production" in result.stderr


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def test_ray_serve_and_haproxy_listen_on_loopback_only(live: Live):
    """GCS, raylet, agents, metrics, HAProxy (ingress, stats, Prometheus) and replicas' HTTP
    and gRPC servers must not be reachable from the network."""
    offenders = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or not conn.pid or _is_loopback(conn.laddr.ip):
            continue
        try:
            proc = psutil.Process(conn.pid)
            ours = (
                proc.exe().startswith(sys.prefix)
                or "haproxy" in proc.name()
                or proc.name().startswith("ray::")
            )
        except psutil.Error:
            continue
        if ours:
            offenders.append((proc.name(), conn.laddr.ip, conn.laddr.port))
    # Including each replica's inter-deployment gRPC server, which Ray 2.60 binds on [::]
    # (config/loopback.py moves it to loopback on a single-node cluster).
    assert not offenders, offenders


def test_footprint_counts_every_process_of_the_stack_once(live: Live):
    """`vurksha footprint` on the stack this test session runs (the driver is pytest): every
    application's replicas, Serve's actors, Ray's daemons and HAProxy, each process once."""
    from config.settings import get_settings
    from deployments.footprint import measure, stack_processes

    data_dir = get_settings().data_dir
    processes = stack_processes([os.getpid()], data_dir)
    assert len({p.pid for p in processes}) == len(processes)
    footprint = measure([os.getpid()], data_dir)
    roles = set(footprint.groups)
    assert {f"replica {app['name']}:{app['name']}" for app in APPS} <= roles, roles  # the ingresses
    assert {"actor ServeController", "Ray raylet", "Ray GCS", "HAProxy", "launcher"} <= roles, roles
    assert all(n >= 1 and pss > 0 for n, pss in footprint.groups.values())
    ours = psutil.Process().memory_full_info().pss
    assert footprint.groups["launcher"] == (1, pytest.approx(ours, rel=0.2))
    printed = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "footprint", "--pid", str(os.getpid())],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "replica users:users" in printed and printed.splitlines()[-1].startswith("total")
