"""The notification channels' shared parts: what a provider answers about one message
(`Outcome`), the dev outbox (in Redis) where development and tests read what was "sent" on
any channel, and SMS (a Twilio-compatible HTTP adapter in production, the dev outbox
elsewhere). Push (FCM HTTP v1) is in `models.push`, email (SMTP) in `models.email`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

import httpx
from pydantic import BaseModel
from redis.asyncio import Redis

from config.settings import Settings
from models.db import utcnow
from models.errors import ServiceUnavailable

log = logging.getLogger(__name__)

OUTBOX_KEEP = 50
OUTBOX_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Outcome:
    """What a provider said about one message. Adapters return it rather than raise for
    anything the provider (or the network to it) decided, so the caller can record it."""

    status: Literal["sent", "retry", "failed"]
    code: str | None = None  # the provider's own code: FCM status, SMTP reply, HTTP status
    provider_id: str | None = None  # the provider's message id, when sent
    retry_after_s: float | None = None  # the provider asked to wait this long (Retry-After)
    drop_address: bool = False  # the token or address is dead: forget it


class OutboxMessage(BaseModel):
    channel: str
    to: str
    body: str
    sent_at: datetime
    # What else the channel carries: a push's title and data, an email's subject and HTML.
    extra: dict[str, object] = {}


class SmsProvider(Protocol):
    async def send(self, to: str, body: str) -> None:
        """Send now or raise 503 `sms_unavailable` (login codes: the caller is waiting)."""

    async def deliver(self, to: str, body: str) -> Outcome:
        """Send and say what happened (notifications: recorded, retried by the caller)."""


class DevOutbox:
    """Records messages instead of sending them; newest first, a bounded list per recipient."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    @staticmethod
    def _key(channel: str, to: str) -> str:
        return f"dev-outbox:{channel}:{to}"

    async def send(self, to: str, body: str) -> None:
        await self.record("sms", to, body)

    async def deliver(self, to: str, body: str) -> Outcome:
        await self.record("sms", to, body)
        return Outcome("sent")

    async def record(self, channel: str, to: str, body: str, extra: dict[str, object] | None = None) -> None:
        msg = OutboxMessage(channel=channel, to=to, body=body, sent_at=utcnow(), extra=extra or {})
        key = self._key(channel, to)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, msg.model_dump_json())
            pipe.ltrim(key, 0, OUTBOX_KEEP - 1)
            pipe.expire(key, OUTBOX_TTL_SECONDS)
            await pipe.execute()

    async def read(self, to: str, channel: str = "sms") -> list[OutboxMessage]:
        raw = await self._redis.lrange(self._key(channel, to), 0, OUTBOX_KEEP - 1)
        return [OutboxMessage.model_validate(json.loads(item)) for item in raw]


class TwilioSms:
    """Speaks Twilio's Messages API (form-encoded POST, HTTP basic auth with the account SID
    and auth token). Any Twilio-compatible gateway works by pointing the base URL at it."""

    def __init__(
        self,
        *,
        base_url: str,
        account_sid: str,
        auth_token: str,
        sender: str,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self._auth = (account_sid, auth_token)
        self._sender = sender
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(5.0))

    async def send(self, to: str, body: str) -> None:
        if (await self.deliver(to, body)).status != "sent":
            raise ServiceUnavailable("SMS could not be sent; retry shortly", code="sms_unavailable")

    async def deliver(self, to: str, body: str) -> Outcome:
        try:
            response = await self._client.post(
                self._url, data={"To": to, "From": self._sender, "Body": body}, auth=self._auth
            )
        except httpx.HTTPError as exc:
            log.warning("SMS provider unreachable: %s", type(exc).__name__)
            return Outcome("retry", code="unreachable")
        if response.status_code < 300:
            sid = (
                response.json().get("sid")
                if response.headers.get("content-type", "").startswith("application/json")
                else None
            )
            return Outcome("sent", provider_id=sid)
        # The provider's error body may echo the recipient, not secrets; log its code only.
        log.warning("SMS provider rejected message: HTTP %s", response.status_code)
        code = f"http_{response.status_code}"
        if response.status_code == 429 or response.status_code >= 500:
            return Outcome("retry", code=code, retry_after_s=retry_after(response.headers.get("Retry-After")))
        # Twilio answers 400 with code 21211/21614 for a number that cannot receive SMS.
        return Outcome("failed", code=code)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds (the HTTP-date form is rare from
    these providers and is treated as absent: the caller's backoff applies)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def make_sms_provider(settings: Settings, redis: Redis) -> SmsProvider:
    if settings.sms_provider == "http":
        return TwilioSms(
            base_url=settings.sms_http_base_url,
            account_sid=settings.sms_account_sid,
            auth_token=settings.sms_auth_token.get_secret_value(),
            sender=settings.sms_from,
        )
    return DevOutbox(redis)


def otp_sms(code: str, ttl_seconds: int) -> str:
    minutes = max(1, ttl_seconds // 60)
    return f"{code} is your Vurksha login code. It expires in {minutes} min. Never share it."
