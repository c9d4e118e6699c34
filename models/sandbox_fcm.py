"""The FCM stand-in: Google's OAuth2 token endpoint for service accounts and FCM's HTTP v1
`messages:send`, with their rules and wire formats, so `models.push.FcmPush` runs against it
unchanged outside production.

It verifies the sender's signed JWT against the public half of the service-account key
(`models.push.load_service_account`: the one the senders sign with), hands out access tokens,
validates messages as FCM does, and records what it accepts in the dev outbox (channel
`push`). Controls make a token unregistered or queue faults for it, so every answer a sender
must handle can be produced on demand. State is in Redis under `sandbox-fcm:` keys, so
replicas agree; the rules are here, the routes in `deployments/sandbox_fcm.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from models.channels import DevOutbox, OutboxMessage
from models.errors import AppError
from models.push import (
    BAD_REQUEST_TYPE,
    FCM_ERROR_TYPE,
    JWT_BEARER,
    SCOPE,
    TOKEN_ALPHABET,
    TOKEN_MAX,
    TOKEN_MIN,
    ServiceAccount,
)

PREFIX = "sandbox-fcm:"
ACCESS_TOKEN_TTL_S = 3600
STATE_TTL_S = 3 * 24 * 3600  # unregistered marks and queued faults, like the sandbox gateway's
MAX_MESSAGE_BYTES = 4096
MAX_ASSERTION_LIFETIME_S = 3600
# An assertion stamped this far ahead of our clock is still accepted: senders' clocks drift.
CLOCK_SKEW_S = 60
# What FCM registration tokens are made of (`models.push`).
TOKEN_PATTERN = re.compile(TOKEN_ALPHABET)
# FCM's wording (not a secret).
INVALID_TOKEN = "The registration token is not a valid FCM registration token"  # noqa: S105
# Message fields that are maps: FCM names their entries `field[i].value`, not `field.key`.
MAP_FIELDS = frozenset({"message.data", "message.android.data", "message.apns.headers"})

# FCM's errorCode -> (HTTP status, canonical status, message), as FCM answers them.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for sending messages to this device."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
}
FaultCode = Literal[
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "SENDER_ID_MISMATCH",
    "THIRD_PARTY_AUTH_ERROR",
]


# ---------------------------------------------------------------- Google's errors


class SandboxFcmError(AppError):
    """An error the stand-in answers in one of Google's formats, not ours: each kind below
    (the FCM API's, the OAuth token endpoint's) renders its own `body`."""

    def body(self) -> dict[str, Any]:
        raise NotImplementedError  # abstract: only GoogleError and OAuthError are raised


class GoogleError(SandboxFcmError):
    """A Google API error: `{"error": {"code", "message", "status", "details"}}`."""

    code = "google_error"

    def __init__(
        self,
        status_code: int,
        status: str,
        message: str,
        *,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            headers=headers,
            extra={"status": status, "details": list(details)},
        )

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.status_code,
            "message": self.message,
            "status": self.extra["status"],
        }
        if self.extra["details"]:
            error["details"] = self.extra["details"]
        return {"error": error}


class OAuthError(SandboxFcmError):
    """Google's OAuth2 token endpoint error: `{"error", "error_description"}`, HTTP 400."""

    code = "oauth_error"

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description, status_code=400, extra={"error": error})

    def body(self) -> dict[str, Any]:
        return {"error": self.extra["error"], "error_description": self.message}


def fcm_error(error_code: str, *, retry_after_s: int | None = None) -> GoogleError:
    status_code, status, message = FCM_ERRORS[error_code]
    return GoogleError(
        status_code,
        status,
        message,
        details=[{"@type": FCM_ERROR_TYPE, "errorCode": error_code}],
        headers={"Retry-After": str(retry_after_s)} if retry_after_s is not None else None,
    )


def invalid_argument(field: str | None, description: str) -> GoogleError:
    """FCM's 400 for a bad request, the field named in a `google.rpc.BadRequest` detail."""
    violation = {"field": field, "description": description} if field else {"description": description}
    return GoogleError(
        400,
        "INVALID_ARGUMENT",
        description,
        details=[
            {"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"},
            {"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]},
        ],
    )


def unauthenticated() -> GoogleError:
    return GoogleError(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
        "cookie or other valid authentication credential.",
        headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
    )


_PROTO_TYPES = {"string_type": "TYPE_STRING", "bool_type": "TYPE_BOOL", "literal_error": "TYPE_ENUM"}


def _field_path(parts: Sequence[Any], body: Any) -> str:
    """pydantic's location as Google names the field (`message.data[0].value`)."""
    path, node = "", body
    for part in parts:
        if path in MAP_FIELDS and isinstance(node, dict) and part in node:
            path += f"[{list(node).index(part)}].value"
        else:
            path = f"{path}.{part}" if path else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return path


def validation_error(errors: Sequence[Mapping[str, Any]], body: Any) -> GoogleError:
    """The first of pydantic's validation errors (of a body, query or path parameter),
    worded and shaped as Google reports bad input. The input itself is never echoed."""
    if not errors:
        return invalid_argument(None, "Request contains an invalid argument.")
    error = errors[0]
    kind = error.get("type", "")
    if kind == "json_invalid":
        return invalid_argument(None, "Invalid JSON payload received. Unexpected token.")
    loc = list(error.get("loc", ()))
    path = _field_path(loc[1:], body if loc[:1] == ["body"] else None)
    if kind == "extra_forbidden":
        parent, _, name = path.rpartition(".")
        return invalid_argument(
            parent or None,
            f"Invalid JSON payload received. Unknown name \"{name}\" at '{parent}': Cannot find field.",
        )
    if kind == "missing":
        return invalid_argument(path, f"Missing required field '{path}'.")
    proto = _PROTO_TYPES.get(kind)
    return invalid_argument(path or None, f"Invalid value at '{path}'" + (f" ({proto})" if proto else ""))


# ---------------------------------------------------------------- bodies


class _Body(BaseModel):
    # FCM refuses fields it does not know and values of the wrong JSON type (no coercion).
    model_config = ConfigDict(extra="forbid", strict=True)


class Notification(_Body):
    title: str | None = None
    body: str | None = None
    image: str | None = None


class AndroidConfig(_Body):
    collapse_key: str | None = None
    priority: Literal["normal", "high", "NORMAL", "HIGH"] | None = None
    ttl: str | None = Field(None, pattern=r"^\d+(\.\d{1,9})?s$", description='A duration: "3.5s"')
    restricted_package_name: str | None = None
    data: dict[str, str] | None = None
    notification: dict[str, Any] | None = None


class ApnsConfig(_Body):
    headers: dict[str, str] | None = None
    payload: dict[str, Any] | None = None


class Message(_Body):
    """FCM's Message; exactly one of token, topic, condition."""

    token: str | None = None
    topic: str | None = None
    condition: str | None = None
    data: dict[str, str] | None = None
    notification: Notification | None = None
    android: AndroidConfig | None = None
    apns: ApnsConfig | None = None
    webpush: dict[str, Any] | None = None
    fcm_options: dict[str, Any] | None = None


class SendRequest(_Body):
    """The body of `messages:send`."""

    validate_only: bool = False
    message: Message


class SendResponse(BaseModel):
    name: str = Field(description="projects/{project}/messages/{message_id}")


class AccessToken(BaseModel):
    access_token: str
    expires_in: int
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 (a scheme name)


class FaultRequest(_Body):
    """Make the next `times` sends to `token` fail with FCM's error `status`."""

    token: str = Field(min_length=1, max_length=4096)
    status: FaultCode
    times: int = Field(1, ge=1, le=1000)
    retry_after_seconds: int | None = Field(None, ge=0, description="Sent as the Retry-After header")


class GoogleErrorDetail(BaseModel):
    code: int
    message: str
    status: str
    details: list[dict[str, Any]] = []


class GoogleErrorBody(BaseModel):
    """A Google API error (FCM's answers other than 200)."""

    error: GoogleErrorDetail


class OAuthErrorBody(BaseModel):
    """Google's OAuth2 token endpoint error."""

    error: str
    error_description: str


def check_message(message: Message) -> None:
    """FCM's rules that a JSON schema does not express."""
    targets = [t for t in (message.token, message.topic, message.condition) if t is not None]
    if not targets:
        raise invalid_argument("message", "Recipient of the message is not set.")
    if len(targets) > 1:
        raise invalid_argument("message", "Exactly one of token, topic or condition must be set.")
    token = message.token
    if token is not None and not (TOKEN_MIN <= len(token) <= TOKEN_MAX and TOKEN_PATTERN.match(token)):
        raise invalid_argument("message.token", INVALID_TOKEN)
    if len(message.model_dump_json(exclude_none=True).encode()) > MAX_MESSAGE_BYTES:
        raise invalid_argument("message", f"Message is too big: at most {MAX_MESSAGE_BYTES} bytes of JSON.")


# ---------------------------------------------------------------- OAuth2 (RFC 7523)


class _Claims(BaseModel):
    model_config = ConfigDict(strict=True)

    scope: str
    iat: int
    exp: int


def verify_assertion(
    account: ServiceAccount,
    public_key: RSAPublicKey,
    grant_type: str | None,
    assertion: str | None,
    *,
    now: float,
) -> None:
    """Google's checks of a service account's JWT-bearer grant: RS256 only (pinned), the
    key's id, signature, issuer, audience, scope, and a lifetime of at most an hour."""
    if not grant_type:
        raise OAuthError("invalid_request", "Missing required parameter: grant_type")
    if grant_type != JWT_BEARER:
        raise OAuthError("unsupported_grant_type", "Invalid grant_type")
    if not assertion:
        raise OAuthError("invalid_request", "Missing required parameter: assertion")
    try:
        decoded = jwt.decode_complete(
            assertion,
            public_key,
            algorithms=["RS256"],
            audience=account.token_uri,
            issuer=account.client_email,
            # The times are checked below, against this sandbox's clock.
            options={
                "require": ["iss", "aud", "iat", "exp", "scope"],
                "verify_exp": False,
                "verify_iat": False,
            },
        )
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError, jwt.MissingRequiredClaimError) as exc:
        raise OAuthError("invalid_grant", f"Invalid JWT: {exc}") from None
    except jwt.InvalidTokenError:
        raise OAuthError("invalid_grant", "Invalid JWT Signature.") from None
    if decoded["header"].get("kid") != account.private_key_id:
        raise OAuthError("invalid_grant", "Invalid JWT Signature.")
    try:
        claims = _Claims.model_validate(decoded["payload"])
    except ValueError:
        raise OAuthError("invalid_grant", "Invalid JWT: malformed claims") from None
    if SCOPE not in claims.scope.split():
        raise OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    if (
        claims.exp <= now
        or claims.exp > claims.iat + MAX_ASSERTION_LIFETIME_S
        or claims.iat > now + CLOCK_SKEW_S
    ):
        raise OAuthError(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
            "timeframe. Check your iat and exp values in the JWT claim.",
        )


# ---------------------------------------------------------------- state


def access_key(access_token: str) -> str:
    """Where a live access token is kept (deleting it revokes the token). Hashed: the keys
    do not hold live credentials."""
    return f"{PREFIX}access:{hashlib.sha256(access_token.encode()).hexdigest()}"


def _unregistered_key(token: str) -> str:
    return f"{PREFIX}unregistered:{token}"


def _faults_key(token: str) -> str:
    return f"{PREFIX}faults:{token}"


class SandboxFcm:
    """The stand-in's state and rules for one service account, over one Redis pool."""

    def __init__(
        self, redis: Redis, account: ServiceAccount, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._account = account
        self._public_key = account.signing_key().public_key()
        self._clock = clock
        self._outbox = DevOutbox(redis)

    async def mint(self, grant_type: str | None, assertion: str | None) -> AccessToken:
        """Exchange a signed JWT for an access token that lives an hour."""
        verify_assertion(self._account, self._public_key, grant_type, assertion, now=self._clock())
        access_token = "ya29." + secrets.token_urlsafe(48)
        await self._redis.set(access_key(access_token), "1", ex=ACCESS_TOKEN_TTL_S)
        return AccessToken(access_token=access_token, expires_in=ACCESS_TOKEN_TTL_S)

    async def authorize(self, access_token: str | None, project: str) -> None:
        """A live access token of this project's service account, as FCM checks before
        anything else."""
        if not access_token or not await self._redis.exists(access_key(access_token)):
            raise unauthenticated()
        if project != self._account.project_id:
            # The caller's project is wrong, not the device's token: no FcmError detail.
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on project {project}.",
            )

    async def send(self, project: str, request: SendRequest) -> SendResponse:
        """Validate, answer as the token's state says, and record what is delivered."""
        message = request.message
        check_message(message)
        if message.token is not None:
            await self._check_token(message.token)
        if request.validate_only:
            return SendResponse(name=f"projects/{project}/messages/fake_message_id")  # FCM's own
        message_id = f"0:{int(self._clock() * 1000)}%{secrets.token_hex(8)}"
        notification = message.notification or Notification()
        recipient = message.token or message.topic or message.condition or ""
        await self._outbox.record(
            "push",
            recipient,
            notification.body or "",
            extra={
                "title": notification.title,
                "data": message.data or {},
                "message_id": message_id,
                "android": message.android.model_dump(exclude_none=True) if message.android else None,
                "apns": message.apns.model_dump(exclude_none=True) if message.apns else None,
            },
        )
        return SendResponse(name=f"projects/{project}/messages/{message_id}")

    async def _check_token(self, token: str) -> None:
        # One round trip for both (a broadcast sends thousands a second through here). LPOP:
        # concurrent sends each take a different queued fault, never the same one twice.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(_unregistered_key(token))
            pipe.lpop(_faults_key(token))
            unregistered, raw = await pipe.execute()
        if unregistered:
            raise fcm_error("UNREGISTERED")
        if isinstance(raw, str | bytes):
            fault = json.loads(raw)
            raise fcm_error(fault["status"], retry_after_s=fault["retry_after_seconds"])

    async def unregister(self, token: str) -> None:
        """From now on the token is UNREGISTERED, as when the app is uninstalled."""
        await self._redis.set(_unregistered_key(token), "1", ex=STATE_TTL_S)

    async def add_fault(self, fault: FaultRequest) -> None:
        entry = json.dumps({"status": fault.status, "retry_after_seconds": fault.retry_after_seconds})
        key = _faults_key(fault.token)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *([entry] * fault.times))
            pipe.expire(key, STATE_TTL_S)
            await pipe.execute()

    async def messages(self, token: str) -> list[OutboxMessage]:
        """What was delivered to a token, newest first."""
        return await self._outbox.read(token, "push")
