"""The shared HTTP layer of every service: app factory, problem-document errors, request ids,
a DB session per request, Redis rate limits, authentication and roles, health checks, and the
Serve ingress builder. Business rules live in `models/`, never here."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from http import HTTPStatus
from typing import Annotated, Any

from asyncpg.exceptions import InterfaceError as AsyncpgInterfaceError
from asyncpg.exceptions import OperatorInterventionError, PostgresConnectionError
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Every table on the metadata in every replica: foreign keys cross domains (users.store_id ->
# stores), and the ORM resolves them when it orders a flush.
import models.tables  # noqa: F401
from actors import steady_gc
from config import metrics
from config.logging import REQUEST, setup_logging
from config.loopback import serve_grpc_on_loopback
from config.settings import Settings, get_settings
from models import idempotency, products, users
from models.channels import SmsProvider, make_sms_provider
from models.db import make_engine, make_redis, make_sessionmaker, read_only, transaction, utcnow
from models.errors import (
    AppError,
    Forbidden,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
)
from models.gateway import RazorpayClient, make_gateway
from models.tokens import AccessClaims, TokenService

log = logging.getLogger("vurksha.http")
access_log = logging.getLogger("vurksha.access")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------- per-process resources


class Resources:
    """Connections and keys one process (a Serve replica, or uvicorn) shares across requests."""

    def __init__(self, settings: Settings) -> None:
        if not settings.database_url or not settings.redis_url:
            raise RuntimeError("DATABASE_URL and REDIS_URL must be set (the launcher sets them)")
        self.settings = settings
        self.engine: AsyncEngine = make_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        self.sessionmaker: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self.read_sessionmaker: async_sessionmaker[AsyncSession] = make_sessionmaker(read_only(self.engine))
        self.redis: Redis = make_redis(settings.redis_url)
        self.tokens = TokenService.from_settings(settings)
        self.limiter = RateLimiter(self.redis)
        self.auth = AuthCache(self.redis, settings.auth_cache_ttl_seconds)
        self.trusted_proxies: list[IPNetwork] = [
            ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies
        ]

    @cached_property
    def sms(self) -> SmsProvider:
        return make_sms_provider(self.settings, self.redis)

    @cached_property
    def gateway(self) -> RazorpayClient:
        return make_gateway(self.settings)

    async def close(self) -> None:
        await self.redis.aclose()
        await self.engine.dispose()


_resources: Resources | None = None


def resources() -> Resources:
    """This process's resources, made by its first caller: at a replica's start, or at an app's
    first request under bare uvicorn. The process is then a loaded server, and tunes its
    collector for it (`steady_gc`)."""
    global _resources
    if _resources is None:
        _resources = Resources(get_settings())
        steady_gc()
    return _resources


# ---------------------------------------------------------------- errors


class Problem(BaseModel):
    """RFC 9457 problem document; `code` is the stable, machine-readable part."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: str | None = None


# The header that makes a write idempotent; its validation errors keep their own 400 codes.
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Validation error types that are specific enough to be the problem's code.
CUSTOM_VALIDATION_CODES = {"invalid_phone", "unknown_time_zone"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": Problem,
        "description": HTTPStatus(status).phrase,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status in (400, 401, 403, 404, 409, 422, 429, 503, 504)
}


def problem(
    request: Request,
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    # Extension members never override the standard ones.
    body = {
        **(extra or {}),
        "type": f"urn:vurksha:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
        "request_id": getattr(request.state, "request_id", None),
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if exc.status_code == 429:
        metrics.RATE_LIMITED.inc(scope=exc.code)
    if exc.code == "otp_locked":
        metrics.OTP_LOCKOUTS.inc()
    return problem(request, exc.status_code, exc.code, exc.message, exc.headers, exc.extra)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Never echo the input back: it may be an OTP, a token or personal data.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    for error in errors:
        if error["loc"] == ["header", IDEMPOTENCY_HEADER]:
            missing = error["type"] == "missing"
            return problem(
                request,
                400,
                "idempotency_key_required" if missing else "invalid_idempotency_key",
                "An Idempotency-Key header is required"
                if missing
                else "Idempotency-Key must be 1 to 255 printable ASCII characters",
            )
    code = (
        errors[0]["type"] if errors and errors[0]["type"] in CUSTOM_VALIDATION_CODES else "validation_error"
    )
    return problem(request, 422, code, "The request is not valid", extra={"errors": errors})


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET", "type": "http"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 413:
        return _too_large(request)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem(request, exc.status_code, code, detail, headers)


# What a 503 for a lost PostgreSQL or Redis connection tells the client to wait (seconds).
RETRY_AFTER_UNAVAILABLE_S = 1


# A connection refused, cut or closed, or its server's socket gone (OSError: the pool
# re-raises a failed connect as the driver raised it), a server shutting down or starting up
# (SQLSTATE 57P), a pool or Redis timeout: whatever the driver or SQLAlchemy wraps it in.
_LOST = (
    PoolTimeout,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    PostgresConnectionError,
    OperatorInterventionError,
    AsyncpgInterfaceError,
)


def unavailable(exc: BaseException | None) -> bool:
    """A lost, refused or exhausted connection to PostgreSQL or Redis (a restart, a failover,
    the network): the request may well succeed if tried again, unlike a bug."""
    for _ in range(5):  # the exception and what it wraps
        if exc is None:
            return False
        if isinstance(exc, _LOST) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
            return True
        exc = exc.__cause__ or getattr(exc, "orig", None)
    return False


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    if unavailable(exc):
        setattr(request.state, _UNAVAILABLE, True)  # RetryReadMiddleware may try once more
        log.warning("request %s: a backing service is unavailable (%s)", request_id, type(exc).__name__)
        return problem(
            request,
            503,
            ServiceUnavailable.code,
            "A service we depend on is unavailable; retry shortly",
            {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
        )
    log.error("unhandled error (request %s)", request_id, exc_info=exc)
    return problem(request, 500, "internal_error", "Something went wrong on our side")


# ---------------------------------------------------------------- reads retried once

_UNAVAILABLE = "backing_service_unavailable"


# The methods that only read: retried once on a lost connection, and run in autocommit.
_READS = frozenset({"GET", "HEAD"})


class RetryReadMiddleware:
    """A read (GET, HEAD) that lost its PostgreSQL or Redis connection runs once more before it
    is answered 503: by then the pool has dropped the dead connections, so the retry connects
    afresh, and a restart or failover that is already over is not the client's problem. Reads
    only: a write may have committed before its connection went. Pure ASGI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _READS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        retry = sent = False

        async def send_unless_retrying(message: Message) -> None:
            nonlocal retry, sent
            if message["type"] == "http.response.start" and state.pop(_UNAVAILABLE, False):
                retry = True  # the 503 of the first attempt is dropped, body and all
            if not retry:
                sent = True
                await send(message)

        try:
            await self.app(scope, receive, send_unless_retrying)
        except Exception as exc:  # one the app's handlers re-raise to the server
            if sent or not unavailable(exc):
                raise
            retry = True
        if retry:
            log.info("request %s: retrying a read on a fresh connection", state.get("request_id"))
            state.pop(_UNAVAILABLE, None)
            await self.app(scope, receive, send)


# ---------------------------------------------------------------- request id


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def _under_serve() -> bool:
    try:
        serve.get_replica_context()
    except Exception:  # raises outside a Serve replica
        return False
    return True


class RequestIdMiddleware:
    """Every request has an id, echoed as `X-Request-ID` and put in problem bodies. Under Serve
    the proxy already assigns one (the caller's, or a fresh one), puts it in the request
    headers and echoes it; elsewhere (plain uvicorn) this middleware does both, accepting only
    a sane caller id. Pure ASGI, not BaseHTTPMiddleware: it is on every request's hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.echo: bool | None = None  # decided on the first request, once serve is importable
        self.log_requests = get_settings().log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.echo is None:
            self.echo = not _under_serve()
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        extra = [(b"x-content-type-options", b"nosniff")]
        if self.echo:
            request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
            extra.append((b"x-request-id", request_id.encode()))
        else:
            request_id = incoming
        state = scope.setdefault("state", {})
        state["request_id"] = request_id or None
        REQUEST.set(state)  # this request's task (and what it awaits) logs with its id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + extra
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests and scope["type"] == "http":
                _log_request(scope, status, time.perf_counter() - started)


def _log_request(scope: Scope, status: int, seconds: float) -> None:
    """The request line (settings.log_requests): the route's template, never the raw path
    (ids in it), nor the query (tokens, codes, personal data)."""
    route = getattr(scope.get("route"), "path", None)
    path = scope.get("root_path", "") + route if route else "(unmatched)"
    latency_ms = round(seconds * 1000, 1)
    line = {"method": scope["method"], "path": path, "status": status, "latency_ms": latency_ms}
    access_log.info("%s %s %d %.1f ms", scope["method"], path, status, latency_ms, extra=line)


# ---------------------------------------------------------------- body size

# Request bodies over this are refused with 413 `payload_too_large` before they are read.
# Routes that take more (bulk imports, webhooks, route problems) are given to serve_builder.
MAX_BODY_BYTES = 64 * 1024


def _too_large(request: Request) -> JSONResponse:
    return problem(request, 413, "payload_too_large", "The request body is too large for this route")


class BodyLimitMiddleware:
    """413 `payload_too_large` for a request body over its route's limit, before the body is
    read when it declares its Content-Length, else as soon as the bytes streamed in pass the
    limit (the handler's read fails; nothing was parsed, nothing written). Pure ASGI."""

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits  # path within the application -> bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        limit = self.limits.get(path, MAX_BODY_BYTES)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(Request(scope))(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413)  # FastAPI re-raises it to http_error
            return message

        await self.app(scope, receive_within_limit, send)


class RequestTimeoutMiddleware:
    """Every HTTP request ends within `http_request_timeout_seconds`: one that has sent nothing
    yet gets a 504 `request_timeout` problem, one already streaming is cut. Serve's own
    `request_timeout_s` stays off (serve.yaml): under direct ingress it also ends every
    WebSocket at that age, and a partner's or a tracking socket lives for a whole delivery."""

    def __init__(self, app: ASGIApp, timeout_s: float | None = None) -> None:
        self.app = app
        self.timeout_s = timeout_s or get_settings().http_request_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                await self.app(scope, receive, send_noting_start)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            detail = f"The request took longer than {self.timeout_s:g} s"
            await problem(Request(scope), 504, "request_timeout", detail)(scope, receive, send)


# ---------------------------------------------------------------- DB session


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request, committed at the boundary before the response is sent
    (the dependency is function-scoped); any error rolls it back unless the error says the
    failure itself must be recorded. A GET or HEAD only reads: its statements run in
    autocommit, with no BEGIN or COMMIT, and one that would write is refused."""
    res = resources()
    if request.method in _READS:
        async with res.read_sessionmaker() as session:
            yield session
        return
    async with transaction(res.sessionmaker, on_auth_change=res.auth.invalidate) as session:
        yield session


Db = Annotated[AsyncSession, Depends(get_db, scope="function")]


# ---------------------------------------------------------------- client ip, rate limits


def resolve_client_ip(peer: str, forwarded_for: str, trusted: list[IPNetwork]) -> str:
    """The caller's address. X-Forwarded-For is believed only when the peer is a trusted
    proxy, and then only up to the first hop (from the right) that is not itself trusted."""

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    if not is_trusted(peer):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()][-20:]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # garbage in the header: fall back to the peer we can see
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


def client_ip(request: HTTPConnection) -> str:
    peer = request.client.host if request.client else "0.0.0.0"
    return resolve_client_ip(peer, request.headers.get("x-forwarded-for", ""), resources().trusted_proxies)


class RateLimiter:
    """Fixed one-minute windows in Redis: one script call counts a request against several keys
    (a round trip and a single reply, about half the client CPU of a pipeline of INCR/EXPIRE
    pairs), atomically, and sets each window's expiry when the window opens. The same call
    reads the caller's authentication cache entries (`AuthCache.keys`), so an authenticated
    request costs one Redis round trip and no PostgreSQL query."""

    WINDOW = 60
    _COUNT = """
    local n = tonumber(ARGV[2])
    local reply = {}
    for i = 1, n do
        reply[i] = redis.call('INCR', KEYS[i])
        if reply[i] == 1 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
    end
    for i = n + 1, #KEYS do reply[i] = redis.call('GET', KEYS[i]) end
    return reply
    """

    def __init__(self, redis: Redis) -> None:
        self._count = redis.register_script(self._COUNT)

    async def hit(
        self, limits: list[tuple[str, int]], read: list[str]
    ) -> tuple[int | None, list[str | None]]:
        """Count one request against each (key, limit) and read the keys `read`: the seconds
        to wait if any limit is over (else None), and the values read."""
        now = time.time()
        window = int(now // self.WINDOW)
        keys = [f"rl:{key}:{window}" for key, _ in limits]
        reply = await self._count(keys=keys + read, args=[self.WINDOW + 1, len(keys)])
        counts, values = reply[: len(keys)], reply[len(keys) :]
        if any(count > limit for count, (_, limit) in zip(counts, limits, strict=True)):
            return self.WINDOW - int(now % self.WINDOW), values
        return None, values


@dataclass(frozen=True)
class Access:
    """A verified token, with what Redis holds about its session (read with the rate limit)."""

    claims: AccessClaims
    entry: str | None  # the session's cache entry, if any
    stamp: str  # the epoch and the user's generation: an entry counts only if it carries them


class AuthCache:
    """Who a session acts as, in Redis, so that authenticated requests need no PostgreSQL
    query, while a revoked session, a disabled account or a changed role still takes effect on
    the very next request.

    PostgreSQL stays the truth. An entry (`auth:s:<session>`) holds the caller, or a mark that
    the session has ended, stamped with the user's generation (`auth:g:<user>`) and a global
    epoch (`auth:epoch`) as they were read before PostgreSQL was asked. A transaction that
    changes a user's authentication (`note_auth_change`) bumps the generation before it
    commits (so it fails, 503, if Redis cannot be told) and again after (so an entry filled
    from rows read while it was in flight is stale at once). An entry whose stamp is not the
    current one is a miss: asked of PostgreSQL and refilled. Entries live at most
    `auth_cache_ttl_seconds` and never past their session's expiry; the epoch (`vurksha auth
    reset`) drops every entry, for changes made by hand in SQL."""

    EPOCH = "auth:epoch"
    GENERATION_TTL = 86_400  # far longer than any entry, so a generation never comes back

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    @staticmethod
    def _generation_key(user_id: uuid.UUID) -> str:
        return f"auth:g:{user_id}"

    @staticmethod
    def keys(claims: AccessClaims) -> list[str]:
        """The session's entry, the user's generation and the epoch, in that order."""
        return [f"auth:s:{claims.sid}", AuthCache._generation_key(claims.sub), AuthCache.EPOCH]

    @staticmethod
    def access(claims: AccessClaims, values: Sequence[str | None]) -> Access:
        entry, generation, epoch = values
        return Access(claims, entry, f"{epoch or 0}.{generation or 0}")

    async def lookup(self, claims: AccessClaims) -> Access:
        values: list[str | None] = await self._redis.mget(self.keys(claims))  # type: ignore[assignment]
        return self.access(claims, values)

    def read(self, access: Access) -> users.Caller | None:
        """The cached caller; None on a miss; the 401 if the cache knows the session ended."""
        stamp, _, rest = (access.entry or "").partition("|")
        if stamp != access.stamp:
            return None
        if rest == "-":
            raise users.session_ended()
        user_id, role, store_id = rest.split("|")
        if user_id != str(access.claims.sub):
            return None
        return users.Caller(
            id=access.claims.sub, role=users.Role(role), store_id=uuid.UUID(store_id) if store_id else None
        )

    async def fill(self, access: Access, caller: users.Caller | None, expires_at: datetime | None) -> None:
        """Remember what PostgreSQL answered (`caller` None: the session has ended)."""
        ttl = self._ttl_s
        if expires_at is not None:
            ttl = min(ttl, int((expires_at - utcnow()).total_seconds()))
        if ttl <= 0:
            return
        if caller is None:
            value = f"{access.stamp}|-"
        else:
            value = f"{access.stamp}|{caller.id}|{caller.role}|{caller.store_id or ''}"
        await self._redis.set(self.keys(access.claims)[0], value, ex=ttl)

    async def invalidate(self, user_ids: set[uuid.UUID]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.incr(self._generation_key(user_id))
                pipe.expire(self._generation_key(user_id), self.GENERATION_TTL)
            await pipe.execute()

    async def reset(self) -> None:
        """Drop every entry (after users or sessions were changed by hand in SQL)."""
        await self._redis.incr(self.EPOCH)


def _bearer(request: HTTPConnection) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def rate_limit(request: HTTPConnection) -> Access | None:
    """Per-IP limit on every request (and on every WebSocket handshake), plus a per-user
    limit when a valid token is present. Returns the verified claims, and the session's
    authentication cache entry read in the same round trip, so authentication neither
    verifies twice nor asks Redis again."""
    res = resources()
    claims = None
    if token := _bearer(request):
        try:
            claims = res.tokens.verify(token)
        except Unauthorized:
            claims = None
    limits = [(f"ip:{client_ip(request)}", res.settings.rate_limit_per_ip_per_minute)]
    if claims is not None:
        limits.append((f"user:{claims.sub}", res.settings.rate_limit_per_user_per_minute))
    retry_after, values = await res.limiter.hit(limits, AuthCache.keys(claims) if claims else [])
    if retry_after is not None:
        raise TooManyRequests("Too many requests; slow down", retry_after=retry_after)
    return AuthCache.access(claims, values) if claims else None


RateLimited = Depends(rate_limit)


# ---------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Principal(users.Caller):
    session_id: uuid.UUID


async def authenticate(db: AsyncSession, access: Access) -> Principal:
    """The caller of a verified token: from the authentication cache, else from PostgreSQL
    (then cached, the 401 included)."""
    cache = resources().auth
    caller = cache.read(access)
    if caller is None:
        claims = access.claims
        try:
            caller, expires_at = await users.authenticate(
                db, user_id=claims.sub, session_id=claims.sid, now=utcnow()
            )
        except Unauthorized:
            await cache.fill(access, None, None)
            raise
        await cache.fill(access, caller, expires_at)
    if (state := REQUEST.get()) is not None:
        state["user_id"] = str(caller.id)  # the request's log lines name its caller
    return Principal(id=caller.id, role=caller.role, store_id=caller.store_id, session_id=access.claims.sid)


# Declares bearer auth in OpenAPI (the docs' Authorize button); the token is read below.
BEARER = HTTPBearer(auto_error=False, description="Access token from /users/auth/verify")


async def current_principal(
    request: Request,
    db: Db,
    access: Annotated[Access | None, RateLimited],
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    if access is None:
        token = _bearer(request)
        if token is None:
            raise Unauthorized("Authentication required", code="not_authenticated")
        claims = resources().tokens.verify(token)  # raises the precise 401
        access = await resources().auth.lookup(claims)
    return await authenticate(db, access)


CurrentUser = Annotated[Principal, Depends(current_principal)]


async def optional_principal(
    request: Request, db: Db, access: Annotated[Access | None, RateLimited]
) -> Principal | None:
    """The caller when a token is sent (an invalid one is still a 401), else None."""
    if access is None and _bearer(request) is None:
        return None
    return await current_principal(request, db, access, None)


MaybeUser = Annotated[Principal | None, Depends(optional_principal)]


async def browsing_store(
    request: Request,
    db: Db,
    access: Annotated[Access | None, RateLimited],
    store_id: uuid.UUID | None = None,
    address_id: Annotated[
        uuid.UUID | None, Query(description="One of your addresses (needs a token); instead of store_id")
    ] = None,
) -> uuid.UUID | None:
    """The store whose stock and prices the caller sees: `store_id`, or the store serving
    `address_id` (one of the caller's own addresses)."""
    if store_id is not None and address_id is not None:
        raise Unprocessable("Give store_id or address_id, not both", code="ambiguous_store")
    if address_id is None:
        return store_id
    principal = await current_principal(request, db, access, None)
    store = await products.store_for_address(db, principal.id, address_id)
    return store.id


StoreChoice = Annotated[uuid.UUID | None, Depends(browsing_store)]


async def idempotency_key(
    key: Annotated[
        str,
        Header(
            alias=IDEMPOTENCY_HEADER,
            description="One key per operation (e.g. a UUID); its retries reuse it. 1 to 255 "
            "printable ASCII characters: 400 `idempotency_key_required` without it, "
            "`invalid_idempotency_key` otherwise.",
            pattern=idempotency.KEY_PATTERN.pattern,
        ),
    ],
) -> str:
    """The Idempotency-Key header, declared required (a missing or malformed one is answered
    400 by `_validation_error`, with the codes clients already handle)."""
    return key


IdempotencyKey = Annotated[str, Depends(idempotency_key)]


def require_role(*roles: str) -> Callable[..., Any]:
    """Dependency: the caller must hold one of `roles` (read from the DB, not the token)."""

    async def check(principal: CurrentUser) -> Principal:
        if principal.role not in roles:
            raise Forbidden("You are not allowed to do this", code="forbidden_role")
        return principal

    return check


# ---------------------------------------------------------------- app factory


class Health(BaseModel):
    status: str
    service: str
    checks: dict[str, str]


def create_api(
    service: str,
    *,
    title: str,
    description: str,
    unlimited: APIRouter | None = None,
    rate_limited: bool = True,
    body_limits: dict[str, int] | None = None,
) -> FastAPI:
    """A FastAPI app with the shared behaviour every service has. Routes of `unlimited` skip
    the generic rate limits (machine callers that authenticate otherwise, e.g. signed
    webhooks from a payment gateway that must never be dropped); `rate_limited=False` drops
    them for the whole app (stand-ins of third parties, whose callers are our own services).
    `body_limits` raises the request body limit (MAX_BODY_BYTES) of some paths."""
    api = FastAPI(
        title=title,
        description=description,
        version="0.1.0",
        responses=ERROR_RESPONSES,
    )
    api.add_middleware(RetryReadMiddleware)
    api.add_middleware(RequestTimeoutMiddleware)
    api.add_middleware(BodyLimitMiddleware, limits=body_limits or {})
    api.add_middleware(RequestIdMiddleware)
    api.add_exception_handler(AppError, _app_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    # PostgreSQL and Redis errors (a 503 when the connection was the problem, see unavailable)
    # are answered inside the app: the catch-all's handler re-raises to the server's log.
    for dependency_error in (SQLAlchemyError, RedisError, *_LOST):
        api.add_exception_handler(dependency_error, _unhandled)
    api.add_exception_handler(Exception, _unhandled)

    @api.get("/healthz", tags=["ops"], response_model=Health)
    async def healthz() -> Health | JSONResponse:
        """Liveness and readiness: the service answers and reaches PostgreSQL and Redis."""
        res = resources()
        checks: dict[str, str] = {}

        async def probe(name: str, fn: Callable[[], Any]) -> None:
            try:
                await asyncio.wait_for(fn(), timeout=2)
                checks[name] = "ok"
            except Exception as exc:  # any failure means not ready; say which
                checks[name] = f"error: {type(exc).__name__}"

        async def pg() -> None:
            async with res.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        await asyncio.gather(probe("postgres", pg), probe("redis", res.redis.ping))
        healthy = all(v == "ok" for v in checks.values())
        body = Health(status="ok" if healthy else "degraded", service=service, checks=checks)
        if healthy:
            return body
        return JSONResponse(body.model_dump(), status_code=503)

    if unlimited is not None:
        api.include_router(unlimited)
    # Every route added from here on is rate limited; health probes above are not.
    if rate_limited:
        api.router.dependencies.append(RateLimited)
    return api


# ---------------------------------------------------------------- Serve


class _Ingress:
    def __init__(self, *bound: Any) -> None:
        # Deployments bound into the application (`serve_builder(..., bind=...)`) arrive as
        # handles; the routes reach them by name (serve.get_deployment_handle).
        serve_grpc_on_loopback()
        setup_logging(get_settings().log_level, fmt=get_settings().log_format)
        resources()  # fail the replica at start, not on the first request, if config is bad

    async def __del__(self) -> None:
        if _resources is not None:
            await _resources.close()


INGRESS_DEFAULTS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.1},
    "max_ongoing_requests": 200,
    "logging_config": {"enable_access_log": False},
}


def serve_builder(
    api: FastAPI, name: str, mixin: type | None = None, bind: Sequence[Any] = (), **options: Any
) -> Callable[[dict[str, Any]], Application]:
    """The builder `serve.yaml` imports (`import_path: deployments.<name>:app`). `mixin` adds
    methods other deployments and actors call through handles (e.g. an outbox subscriber's
    `consume`), and may start what the service needs in its `__init__`; `bind` adds
    deployments without routes to the application (e.g. the route optimizer); `options`
    override the deployment defaults."""
    bases = (mixin, _Ingress) if mixin is not None else (_Ingress,)
    ingress_cls = type(f"{name.title().replace('_', '')}Ingress", bases, {"__doc__": api.description})
    deployment = serve.deployment(name=name, **{**INGRESS_DEFAULTS, **options})(
        serve.ingress(api)(ingress_cls)
    )

    def build(args: dict[str, Any] | None = None) -> Application:
        return deployment.bind(*(d.bind() for d in bind))

    return build
