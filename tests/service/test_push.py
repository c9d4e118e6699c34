"""The FCM HTTP v1 adapter (`models.push.FcmPush`) against the FCM stand-in, through Serve over
real HTTP: the OAuth2 JWT-bearer flow (minted once, cached, minted again at expiry or when
revoked), every FCM answer mapped to its Outcome, the stand-in's refusals in Google's formats,
and an unreachable FCM."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from pydantic import SecretStr
from redis.asyncio import Redis

from config.settings import get_settings
from models.channels import Outcome
from models.push import JWT_BEARER, SCOPE, FcmPush, ServiceAccount, load_service_account
from models.sandbox_fcm import access_key
from tests.conftest import Live

PREFIX = "/sandbox-gateway/fcm"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def new_token() -> str:
    return "tok_" + secrets.token_urlsafe(24)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Clock:
    """time.time shifted by `offset` (what the sender believes the time is)."""

    def __init__(self, offset: float = 0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


class Sender:
    """An FcmPush on its own HTTP client, which notes every access token minted."""

    def __init__(
        self, account: ServiceAccount, base_url: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.minted: list[str] = []
        self.client = httpx.AsyncClient(timeout=30, event_hooks={"response": [self._note]})
        self.push = FcmPush(account, base_url=base_url, client=self.client, clock=clock)

    async def _note(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith("/token") and response.status_code == 200:
            await response.aread()
            self.minted.append(response.json()["access_token"])

    async def send(self, token: str, **kw: Any) -> Outcome:
        kw.setdefault("title", "Your order is on its way")
        kw.setdefault("body", "Ravi is 5 minutes away")
        return await self.push.send(token, **kw)


@pytest.fixture
def account(live: Live) -> ServiceAccount:
    # After `live`: the test process reads the data dir the backend uses, so the same key.
    return load_service_account(get_settings())


@pytest.fixture
async def senders(live: Live, account: ServiceAccount) -> AsyncIterator[Callable[..., Sender]]:
    made: list[Sender] = []

    def make(
        account: ServiceAccount = account,
        base_url: str = live.base_url + PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> Sender:
        made.append(Sender(account, base_url, clock))
        return made[-1]

    yield make
    for sender in made:
        await sender.push.aclose()
        await sender.client.aclose()


@pytest.fixture
async def sender(senders: Callable[..., Sender]) -> Sender:
    return senders()


@pytest.fixture
async def http(live: Live) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.base_url + PREFIX, timeout=30) as client:
        yield client


def assertion(account: ServiceAccount, key: Any = None, **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": account.client_email,
        "scope": SCOPE,
        "aud": account.token_uri,
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(
        {**body, **claims},
        key or account.signing_key(),
        algorithm="RS256",
        headers={"kid": account.private_key_id},
    )


async def access_token(http: httpx.AsyncClient, account: ServiceAccount) -> dict[str, str]:
    response = await http.post("/token", data={"grant_type": JWT_BEARER, "assertion": assertion(account)})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def delivered(http: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    response = await http.get("/sandbox/messages", params={"token": token})
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()
    return messages


async def fault(http: httpx.AsyncClient, token: str, status: str, **kw: Any) -> None:
    response = await http.post("/sandbox/faults", json={"token": token, "status": status, **kw})
    assert response.status_code == 204, response.text


def field_violations(response: httpx.Response) -> list[dict[str, str]]:
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    (bad_request,) = [d for d in error["details"] if d["@type"] == BAD_REQUEST]
    violations: list[dict[str, str]] = bad_request["fieldViolations"]
    return violations


# ---------------------------------------------------------------- sending


async def test_a_send_arrives_with_its_title_and_data(sender: Sender, http: httpx.AsyncClient):
    token = new_token()
    outcome = await sender.send(
        token, data={"order_id": "o-1", "kind": "order_picked"}, collapse_key="order-o-1", ttl_seconds=600
    )
    assert outcome.status == "sent" and outcome.provider_id is not None
    assert outcome.provider_id.startswith("projects/vurksha-dev/messages/")

    (message,) = await delivered(http, token)
    assert (message["channel"], message["to"], message["body"]) == ("push", token, "Ravi is 5 minutes away")
    extra = message["extra"]
    assert extra["title"] == "Your order is on its way"
    assert extra["data"] == {"order_id": "o-1", "kind": "order_picked"}
    assert outcome.provider_id.endswith("/" + extra["message_id"])
    assert extra["android"] == {"priority": "high", "collapse_key": "order-o-1", "ttl": "600s"}
    assert extra["apns"] == {"headers": {"apns-priority": "10", "apns-collapse-id": "order-o-1"}}

    await sender.send(token, body="Delivered", high_priority=False)
    newest, _ = await delivered(http, token)
    assert newest["body"] == "Delivered"
    assert newest["extra"]["android"] == {"priority": "normal"}
    assert newest["extra"]["apns"] == {"headers": {"apns-priority": "5"}}


async def test_one_access_token_serves_many_sends(sender: Sender):
    outcomes = await asyncio.gather(*[sender.send(new_token()) for _ in range(5)])
    outcomes.append(await sender.send(new_token()))
    assert {o.status for o in outcomes} == {"sent"}
    assert len(sender.minted) == 1  # concurrent sends waited for the one mint


async def test_an_access_token_near_its_expiry_is_minted_again(senders: Callable[..., Sender]):
    # The first token is minted "an hour ago" (its assertion still just valid), so it expires
    # in the sender's eyes once the clock is back to now.
    clock = Clock(offset=-3590)
    sender = senders(clock=clock)
    assert (await sender.send(new_token())).status == "sent"
    assert (await sender.send(new_token())).status == "sent"
    assert len(sender.minted) == 1
    clock.offset = 0
    assert (await sender.send(new_token())).status == "sent"
    assert len(sender.minted) == 2


async def test_a_revoked_access_token_is_replaced_and_the_send_retried(sender: Sender, live: Live):
    assert (await sender.send(new_token())).status == "sent"
    redis = Redis.from_url(live.redis_url)
    try:
        assert await redis.delete(access_key(sender.minted[0])) == 1
    finally:
        await redis.aclose()
    token = new_token()
    assert (await sender.send(token)).status == "sent"
    assert len(sender.minted) == 2


# ---------------------------------------------------------------- FCM's answers


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        ("QUOTA_EXCEEDED", 7, Outcome("retry", code="QUOTA_EXCEEDED", retry_after_s=7.0)),
        ("UNAVAILABLE", 3, Outcome("retry", code="UNAVAILABLE", retry_after_s=3.0)),
        ("INTERNAL", None, Outcome("retry", code="INTERNAL")),
        ("INVALID_ARGUMENT", None, Outcome("failed", code="INVALID_ARGUMENT")),
        ("SENDER_ID_MISMATCH", None, Outcome("failed", code="SENDER_ID_MISMATCH", drop_address=True)),
        ("THIRD_PARTY_AUTH_ERROR", None, Outcome("failed", code="THIRD_PARTY_AUTH_ERROR")),
    ],
)
async def test_each_fcm_error_gives_its_outcome(
    sender: Sender, http: httpx.AsyncClient, status: str, retry_after: int | None, expected: Outcome
):
    token = new_token()
    await fault(http, token, status, times=2, retry_after_seconds=retry_after)
    assert await sender.send(token) == expected
    assert await sender.send(token) == expected
    assert (await sender.send(token)).status == "sent"  # the faults are used up
    assert len(await delivered(http, token)) == 1
    # THIRD_PARTY_AUTH_ERROR is a 401 too, but about APNs credentials: no new access token.
    assert len(sender.minted) == 1


async def test_an_unregistered_token_is_dropped(sender: Sender, http: httpx.AsyncClient):
    token = new_token()
    assert (await sender.send(token)).status == "sent"
    response = await http.post(f"/sandbox/tokens/{token}/unregister")
    assert response.status_code == 204, response.text
    assert await sender.send(token) == Outcome("failed", code="UNREGISTERED", drop_address=True)
    assert len(await delivered(http, token)) == 1


async def test_a_malformed_token_is_dropped(sender: Sender):
    assert await sender.send("not a token") == Outcome("failed", code="INVALID_ARGUMENT", drop_address=True)


async def test_an_unreachable_fcm_is_retried(senders: Callable[..., Sender], account: ServiceAccount):
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert await senders(base_url=nowhere).send(new_token()) == Outcome("retry", code="unreachable")
    no_oauth = account.model_copy(update={"token_uri": f"{nowhere}/token"})
    assert await senders(account=no_oauth).send(new_token()) == Outcome("retry", code="oauth_unavailable")


# ---------------------------------------------------------------- the stand-in's refusals


async def test_an_assertion_signed_with_another_key_is_refused(
    http: httpx.AsyncClient, account: ServiceAccount, senders: Callable[..., Sender]
):
    other_key = generate_private_key(public_exponent=65537, key_size=2048)
    response = await http.post(
        "/token", data={"grant_type": JWT_BEARER, "assertion": assertion(account, other_key)}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"

    pem = other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forged = account.model_copy(update={"private_key": SecretStr(pem.decode())})
    sender = senders(account=forged)
    assert await sender.send(new_token()) == Outcome("failed", code="oauth_invalid_grant")


async def test_the_token_endpoint_checks_the_grant(http: httpx.AsyncClient, account: ServiceAccount):
    wrong_grant = await http.post("/token", data={"grant_type": "client_credentials", "assertion": "x"})
    assert wrong_grant.status_code == 400
    assert wrong_grant.json()["error"] == "unsupported_grant_type"

    too_long = assertion(account, exp=int(time.time()) + 7200)
    response = await http.post("/token", data={"grant_type": JWT_BEARER, "assertion": too_long})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")

    other_audience = assertion(account, aud="https://oauth2.googleapis.com/token")
    response = await http.post("/token", data={"grant_type": JWT_BEARER, "assertion": other_audience})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")

    response = await http.post("/token", data={"grant_type": JWT_BEARER, "assertion": assertion(account)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["expires_in"], body["token_type"]) == (3600, "Bearer")


async def test_non_string_data_values_are_refused(http: httpx.AsyncClient, account: ServiceAccount):
    token = new_token()
    message = {"token": token, "data": {"order_id": "o-1", "count": 2}}
    response = await http.post(
        "/v1/projects/vurksha-dev/messages:send",
        json={"message": message},
        headers=await access_token(http, account),
    )
    assert response.status_code == 400, response.text
    assert [v["field"] for v in field_violations(response)] == ["message.data[1].value"]
    assert await delivered(http, token) == []


async def test_an_oversize_message_is_refused(http: httpx.AsyncClient, account: ServiceAccount):
    token = new_token()
    message = {"token": token, "data": {"blob": "x" * 5000}}
    response = await http.post(
        "/v1/projects/vurksha-dev/messages:send",
        json={"message": message},
        headers=await access_token(http, account),
    )
    assert response.status_code == 400, response.text
    assert [v["field"] for v in field_violations(response)] == ["message"]
    assert await delivered(http, token) == []


async def test_a_send_needs_a_live_access_token_of_the_project(
    http: httpx.AsyncClient, account: ServiceAccount
):
    token = new_token()
    body = {"message": {"token": token, "notification": {"title": "t", "body": "b"}}}
    anonymous = await http.post("/v1/projects/vurksha-dev/messages:send", json=body)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    unknown = await http.post(
        "/v1/projects/vurksha-dev/messages:send", json=body, headers={"Authorization": "Bearer ya29.made-up"}
    )
    assert unknown.status_code == 401

    auth = await access_token(http, account)
    elsewhere = await http.post("/v1/projects/another-project/messages:send", json=body, headers=auth)
    assert elsewhere.status_code == 403
    assert elsewhere.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "details" not in elsewhere.json()["error"]  # not a SENDER_ID_MISMATCH: keep the tokens

    dry_run = await http.post(
        "/v1/projects/vurksha-dev/messages:send", json={**body, "validate_only": True}, headers=auth
    )
    assert dry_run.status_code == 200, dry_run.text
    assert dry_run.json() == {"name": "projects/vurksha-dev/messages/fake_message_id"}
    assert await delivered(http, token) == []
