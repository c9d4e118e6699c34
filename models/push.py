"""Push notifications through Firebase Cloud Messaging's HTTP v1 API.

FCM authorises each send with an OAuth2 access token that the sender mints itself from a
service-account key (the JSON file Google issues): an RS256 JWT signed with the key, exchanged
at the key's `token_uri` (RFC 7523, Google's service-account flow). Outside production the key
is generated into the data dir and its `token_uri` is the local FCM stand-in's
(`models.sandbox_fcm`), so the same code path runs everywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key
from pydantic import BaseModel, ConfigDict, SecretStr

from config.settings import Settings
from models.channels import Outcome, retry_after
from models.tokens import write_once

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600  # Google's ceiling for exp - iat
# A token this close to its expiry is replaced before use: a send that takes a while, or a
# clock a little behind Google's, must not arrive with a token that has just died.
REFRESH_MARGIN_S = 60

DEV_PROJECT_ID = "vurksha-dev"
DEV_CLIENT_EMAIL = "notifications@vurksha-dev.iam.gserviceaccount.com"

# What an FCM registration token is made of (in practice ~160 characters); everything that
# takes one from a client (device registration, paths, the stand-in) checks this alphabet.
TOKEN_ALPHABET = r"^[A-Za-z0-9:_\-]+$"  # noqa: S105 (a pattern, not a secret)
TOKEN_MIN, TOKEN_MAX = 20, 4096

# FCM's errorCodes that mean the registration token will never work again.
DEAD_TOKEN_CODES = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


class ServiceAccount(BaseModel):
    """The fields of Google's service-account key that the token flow needs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    project_id: str
    client_email: str
    private_key: SecretStr  # RSA, PEM
    private_key_id: str
    token_uri: str

    def signing_key(self) -> RSAPrivateKey:
        key = serialization.load_pem_private_key(self.private_key.get_secret_value().encode(), password=None)
        if not isinstance(key, RSAPrivateKey):
            raise ValueError("the FCM service-account key must be an RSA key")
        return key


def _create_key_file(path: Path, settings: Settings) -> None:
    """A development key whose token endpoint is the local stand-in's."""
    pem = generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = {
        "type": "service_account",
        "project_id": DEV_PROJECT_ID,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem.decode(),
        "client_email": DEV_CLIENT_EMAIL,
        "token_uri": f"{settings.fcm_api_base}/token",
    }
    write_once(path, json.dumps(key, indent=2).encode())


def load_service_account(settings: Settings) -> ServiceAccount:
    """The key from `fcm_service_account` (JSON text) or `fcm_key_file`. Outside production a
    missing file is generated; in production it is an error."""
    if settings.fcm_service_account is not None:
        return ServiceAccount.model_validate_json(settings.fcm_service_account.get_secret_value())
    path = settings.fcm_key_file
    if not path.exists():
        if settings.env == "production":
            raise RuntimeError(f"the FCM service-account key file {path} does not exist")
        _create_key_file(path, settings)
    account = ServiceAccount.model_validate_json(path.read_text())
    if settings.env != "production" and account.project_id == DEV_PROJECT_ID:
        # A generated key's token endpoint is the stand-in's wherever it is now (the port or
        # the stand-in's path may have changed since the key was written).
        account = account.model_copy(update={"token_uri": f"{settings.fcm_api_base}/token"})
    return account


class _OAuthFailed(Exception):
    """Minting an access token failed; the send ends with `outcome`."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.code)
        self.outcome = outcome


def _json(response: httpx.Response) -> dict[str, Any]:
    """The body as a JSON object, or {} (a proxy's HTML error page, an empty body)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class FcmPush:
    """Sends one message to one registration token and says what FCM decided (`Outcome`).

    Access tokens are cached until shortly before they expire and shared by concurrent
    sends: one mint at a time, the others wait for it and use its token."""

    def __init__(
        self,
        account: ServiceAccount,
        *,
        base_url: str,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._account = account
        self._key = account.signing_key()
        self._url = f"{base_url.rstrip('/')}/v1/projects/{account.project_id}/messages:send"
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self._sends: aiohttp.ClientSession | None = None

    async def send(
        self,
        token: str,
        *,
        title: str,
        body: str,
        data: dict[str, str] | None = None,
        collapse_key: str | None = None,
        high_priority: bool = True,
        ttl_seconds: int | None = None,
    ) -> Outcome:
        """Send a notification (and its data) to a device; never raises for what FCM or the
        network decided."""
        android: dict[str, Any] = {"priority": "high" if high_priority else "normal"}
        apns_headers = {"apns-priority": "10" if high_priority else "5"}
        if collapse_key is not None:
            android["collapse_key"] = collapse_key
            apns_headers["apns-collapse-id"] = collapse_key
        if ttl_seconds is not None:
            android["ttl"] = f"{ttl_seconds}s"
        message = {
            "message": {
                "token": token,
                "notification": {"title": title, "body": body},
                "data": data or {},
                "android": android,
                "apns": {"headers": apns_headers},
            }
        }
        try:
            access = await self._access_token()
            answer = await self._post(access, message)
            if answer.status == 401 and _error_code(answer.body) == "UNAUTHENTICATED":
                # Revoked, or expired early: mint once more (unless a concurrent send already
                # has) and try once more.
                answer = await self._post(await self._access_token(rejected=access), message)
        except _OAuthFailed as failed:
            return failed.outcome
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("FCM unreachable: %s", type(exc).__name__)
            return Outcome("retry", code="unreachable")
        return _outcome(answer)

    async def aclose(self) -> None:
        """Close the connections (the injected httpx client is its owner's to close)."""
        if self._sends is not None:
            await self._sends.close()
            self._sends = None

    async def _post(self, access: str, message: dict[str, Any]) -> _Answer:
        # Sends go through aiohttp: a broadcast makes thousands of them, and httpx cost about
        # three times the CPU per request (the token mints, rare, stay on httpx).
        if self._sends is None:
            self._sends = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10), connector=aiohttp.TCPConnector(limit=100)
            )
        headers = {"Authorization": f"Bearer {access}"}
        async with self._sends.post(self._url, json=message, headers=headers) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return _Answer(
                response.status, response.headers.get("Retry-After"), body if isinstance(body, dict) else {}
            )

    async def _access_token(self, rejected: str | None = None) -> str:
        async with self._lock:
            fresh = self._clock() < self._expires_at - REFRESH_MARGIN_S
            if self._token is None or self._token == rejected or not fresh:
                self._token = None  # a failed mint must not leave the rejected token behind
                self._token, self._expires_at = await self._mint()
            return self._token

    async def _mint(self) -> tuple[str, float]:
        account = self._account
        now = self._clock()
        claims = {
            "iss": account.client_email,
            "scope": SCOPE,
            "aud": account.token_uri,
            "iat": int(now),
            "exp": int(now) + ASSERTION_LIFETIME_S,
        }
        assertion = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": account.private_key_id})
        try:
            response = await self._client.post(
                account.token_uri, data={"grant_type": JWT_BEARER, "assertion": assertion}
            )
        except httpx.HTTPError as exc:
            log.warning("FCM token endpoint unreachable: %s", type(exc).__name__)
            raise _OAuthFailed(Outcome("retry", code="oauth_unavailable")) from None
        body = _json(response)
        if response.status_code == 429 or response.status_code >= 500:
            log.warning("FCM token endpoint unavailable: HTTP %s", response.status_code)
            wait = retry_after(response.headers.get("Retry-After"))
            raise _OAuthFailed(Outcome("retry", code="oauth_unavailable", retry_after_s=wait))
        access, expires_in = body.get("access_token"), body.get("expires_in")
        if response.status_code != 200 or not isinstance(access, str) or not isinstance(expires_in, int):
            # Google's OAuth error (`invalid_grant`: a deleted or disabled key, a clock far off)
            # is a configuration problem that retrying will not fix. Its code only: never the
            # assertion or the key.
            error = body.get("error")
            if not isinstance(error, str):
                error = f"http_{response.status_code}"
            log.error("FCM token endpoint refused the service account %s: %s", account.client_email, error)
            raise _OAuthFailed(Outcome("failed", code=f"oauth_{error}"))
        return access, now + expires_in


def _error_code(body: dict[str, Any]) -> str | None:
    """FCM's errorCode when the error carries one, else the canonical status."""
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    for detail in _details(error):
        if detail.get("@type") == FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
            return str(detail["errorCode"])
    status = error.get("status")
    return status if isinstance(status, str) else None


def _details(error: dict[str, Any]) -> list[dict[str, Any]]:
    details = error.get("details")
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _token_rejected(body: dict[str, Any]) -> bool:
    """FCM's "not a valid FCM registration token": a BadRequest naming `message.token`."""
    error = body.get("error")
    for detail in _details(error) if isinstance(error, dict) else []:
        violations = detail.get("fieldViolations") if detail.get("@type") == BAD_REQUEST_TYPE else None
        if isinstance(violations, list) and any(
            isinstance(v, dict) and v.get("field") == "message.token" for v in violations
        ):
            return True
    return False


@dataclass(frozen=True)
class _Answer:
    status: int
    retry_after: str | None
    body: dict[str, Any]


def _outcome(answer: _Answer) -> Outcome:
    body = answer.body
    if answer.status == 200:
        name = body.get("name")
        return Outcome("sent", provider_id=name if isinstance(name, str) else None)
    code = _error_code(body) or f"http_{answer.status}"
    # The code only: FCM's message may quote the request.
    log.warning("FCM refused a message: HTTP %s %s", answer.status, code)
    if code in DEAD_TOKEN_CODES:
        return Outcome("failed", code=code, drop_address=True)
    if code == "INVALID_ARGUMENT":
        return Outcome("failed", code=code, drop_address=_token_rejected(body))
    if answer.status == 429 or answer.status >= 500:
        return Outcome("retry", code=code, retry_after_s=retry_after(answer.retry_after))
    # THIRD_PARTY_AUTH_ERROR (our APNs/Web Push credentials), our own 401/403: not the token's
    # fault, and not fixed by retrying.
    return Outcome("failed", code=code)


def make_push(settings: Settings) -> FcmPush:
    return FcmPush(load_service_account(settings), base_url=settings.fcm_api_base)
