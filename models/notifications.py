"""Notification providers. SMS goes out through a provider interface: a Twilio-compatible
HTTP adapter in production, and a dev outbox (in Redis) that development and tests read."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Protocol

import httpx
from pydantic import BaseModel
from redis.asyncio import Redis

from config.settings import Settings
from models.db import utcnow
from models.errors import ServiceUnavailable

log = logging.getLogger(__name__)

OUTBOX_KEEP = 50
OUTBOX_TTL_SECONDS = 24 * 3600


class OutboxMessage(BaseModel):
    channel: str
    to: str
    body: str
    sent_at: datetime


class SmsProvider(Protocol):
    async def send(self, to: str, body: str) -> None: ...


class DevOutbox:
    """Records messages instead of sending them; newest first, a bounded list per recipient."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    @staticmethod
    def _key(channel: str, to: str) -> str:
        return f"dev-outbox:{channel}:{to}"

    async def send(self, to: str, body: str) -> None:
        msg = OutboxMessage(channel="sms", to=to, body=body, sent_at=utcnow())
        key = self._key("sms", to)
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
        try:
            response = await self._client.post(
                self._url, data={"To": to, "From": self._sender, "Body": body}, auth=self._auth
            )
        except httpx.HTTPError as exc:
            log.warning("SMS provider unreachable: %s", type(exc).__name__)
            raise ServiceUnavailable("SMS could not be sent; retry shortly", code="sms_unavailable") from None
        if response.status_code >= 300:
            # The provider's error body may echo the recipient, not secrets; log its code only.
            log.warning("SMS provider rejected message: HTTP %s", response.status_code)
            raise ServiceUnavailable("SMS could not be sent; retry shortly", code="sms_unavailable")


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
