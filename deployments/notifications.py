"""Notifications service (`/notifications`): push (FCM HTTP v1), SMS and email on order,
payment and delivery events, an in-app inbox, devices, preferences and quiet hours.

The outbox relay hands every subscribed event to `consume`, which records the messages
(once per event, user and channel) and wakes this replica's dispatcher; the dispatcher hands
due sends to the providers, retries what they ask to retry, and falls back to SMS for a
critical push no device took. Outside production it also serves the dev outbox (what was
"sent" on each channel) and a local SMTP server; the FCM stand-in is in the sandbox gateway.
"""

from __future__ import annotations

import asyncio
import html
import logging
import uuid
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import Depends, Query, Response, WebSocket
from fastapi.responses import HTMLResponse

from config import metrics
from config.settings import get_settings
from deployments.common import CurrentUser, Db, create_api, require_role, resources, serve_builder
from deployments.sockets import (
    SOCKETS,
    AuthIn,
    Message,
    PingIn,
    PingOut,
    Socket,
    guard,
    open_socket,
    ping_quiet,
    serve_socket,
    subscribe,
)
from models import notifications as n
from models.channels import DevOutbox, OutboxMessage
from models.db import utcnow
from models.email import DevSmtpServer, make_email
from models.notification_flows import Notifier, Providers, quiet_default
from models.notification_rules import SAMPLE_CONTEXT, TEMPLATES, Content, render
from models.notification_tables import TOKEN_PATH, BroadcastOut, ClockOffset, ContentOut, ReadAll
from models.outbox import Event
from models.push import make_push
from models.users import Language, Phone, Role

log = logging.getLogger("vurksha.notifications")

api = create_api(
    "notifications",
    title="Vurksha notifications",
    description="Push (FCM), SMS, email and an in-app inbox on order and delivery events; "
    "devices, preferences, quiet hours.",
)

OPS = Depends(require_role(Role.admin, Role.ops))
ADMIN = Depends(require_role(Role.admin))
CLOCK_OFFSET_KEY = "dev:notifications:clock-offset"

# ---------------------------------------------------------------- the replica's notifier


class _Clock:
    """utcnow, shifted outside production by an offset developers and tests set (to see
    quiet hours end without waiting for them); refreshed by the dispatch loop."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    async def refresh(self) -> None:
        raw = await resources().redis.get(CLOCK_OFFSET_KEY)
        self.offset = timedelta(seconds=float(raw or 0))


_clock = _Clock()
_notifier: Notifier | None = None
INBOX_CHANNEL = "notifications:inbox"


def notifier() -> Notifier:
    global _notifier
    if _notifier is None:
        res = resources()
        providers = Providers(push=make_push(res.settings), sms=res.sms, email=make_email(res.settings))
        _notifier = Notifier(
            res.sessionmaker,
            res.redis,
            providers,
            res.settings,
            _clock,
            _publish,
            lambda channel, status: metrics.NOTIFICATIONS.inc(channel=str(channel), outcome=status),
        )
    return _notifier


async def _publish(user_id: uuid.UUID, item: n.InboxItemOut) -> None:
    """A new inbox item, to whichever replica holds the user's sockets."""
    message = InboxItemMsg(item=item).model_dump_json()
    await resources().redis.publish(INBOX_CHANNEL, f"{user_id} {item.id} {message}")


class InboxHub:
    """This replica's inbox sockets by user, fed by one Redis subscription for all of them,
    with one heartbeat timer."""

    def __init__(self, redis_url: str, heartbeat_s: float) -> None:
        self.redis_url = redis_url
        self.heartbeat_s = heartbeat_s
        self.sockets: dict[uuid.UUID, set[Socket]] = defaultdict(set)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._heartbeats())]

    async def _listen(self) -> None:
        await subscribe(self.redis_url, INBOX_CHANNEL, self._deliver, "inbox")

    async def _deliver(self, data: str) -> None:
        user, item_id, text = data.split(" ", 2)
        for socket in list(self.sockets.get(uuid.UUID(user), ())):
            socket.post(item_id, text)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s / 3)
            for sockets in list(self.sockets.values()):
                ping_quiet(sockets, self.heartbeat_s)

    def forget(self, user_id: uuid.UUID, socket: Socket) -> None:
        sockets = self.sockets.get(user_id)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self.sockets[user_id]


_hub: InboxHub | None = None


def inbox_hub() -> InboxHub:
    global _hub
    if _hub is None:
        settings = resources().settings
        assert settings.redis_url
        _hub = InboxHub(settings.redis_url, settings.delivery_ws_heartbeat_seconds)
    _hub.start()
    return _hub


class _Subscriber:
    """Consumes order, payment and delivery events (at least once) and runs the dispatcher
    (and, outside production, the local SMTP server) on the replica's event loop."""

    def __init__(self, *bound: object) -> None:
        super().__init__(*bound)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._dispatch())]
        settings = resources().settings
        if settings.dev_endpoints and not settings.smtp_host:
            self._smtp = DevSmtpServer(DevOutbox(resources().redis), port=settings.dev_smtp_port)
            self._tasks.append(loop.create_task(self._smtp_start()))

    async def _smtp_start(self) -> None:
        if not await self._smtp.start():
            log.info("dev SMTP port %d is served by another replica", resources().settings.dev_smtp_port)

    async def _dispatch(self) -> None:
        if resources().settings.dev_endpoints:
            asyncio.get_running_loop().create_task(_refresh_clock())
        await notifier().run()

    async def consume(self, event: Event) -> str:
        return await notifier().consume(event)


async def _refresh_clock() -> None:
    while True:
        try:
            await _clock.refresh()
        except Exception:  # Redis away: keep the last offset
            log.debug("clock offset not refreshed", exc_info=True)
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------- devices


@api.post("/devices", status_code=201, response_model=n.DeviceOut, tags=["devices"])
async def register_device(body: n.DeviceIn, principal: CurrentUser, db: Db) -> n.DeviceOut:
    """Register this app install's push token (again: refreshes its last-seen time). A token
    registered by another account moves to yours; logging out of this session removes it."""
    return await n.register_device(db, principal.id, principal.session_id, body, utcnow())


@api.delete("/devices/{token}", status_code=204, tags=["devices"])
async def forget_device(token: Annotated[str, TOKEN_PATH], principal: CurrentUser, db: Db) -> Response:
    """Stop pushes to one of your devices (404 `device_not_found` if it is not yours)."""
    await n.forget_device(db, principal.id, token)
    return Response(status_code=204)


# ---------------------------------------------------------------- inbox


@api.get("", response_model=n.InboxPage, tags=["inbox"])
async def inbox(
    principal: CurrentUser,
    db: Db,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> n.InboxPage:
    """Your in-app notifications, newest first, with how many are unread."""
    return await n.inbox_page(db, principal.id, cursor, limit)


@api.post("/{item_id}/read", response_model=n.InboxItemOut, tags=["inbox"])
async def read_one(item_id: uuid.UUID, principal: CurrentUser, db: Db) -> n.InboxItemOut:
    """Mark one notification read (404 `notification_not_found` if it is not yours)."""
    return await n.mark_read(db, principal.id, item_id, utcnow())


@api.post("/read-all", response_model=ReadAll, tags=["inbox"])
async def read_all(principal: CurrentUser, db: Db) -> ReadAll:
    """Mark all your notifications read."""
    return ReadAll(updated=await n.mark_all_read(db, principal.id, utcnow()))


@api.websocket("/ws")
async def inbox_socket(ws: WebSocket) -> None:
    """New inbox items live (messages in `websockets.schema.json`): after `auth`, a `ready`
    with the unread count, then a `notification` for each new item of yours."""

    async def run() -> None:
        socket, principal = await open_socket(ws)
        hub = inbox_hub()
        hub.sockets[principal.id].add(socket)  # before counting: nothing falls between
        async with resources().read_sessionmaker() as db:
            socket.post("ready", InboxReadyMsg(unread=await n.unread_count(db, principal.id)))
        await serve_socket(socket, socket.answer_pings, lambda: hub.forget(principal.id, socket))

    await guard(ws, run)


class InboxReadyMsg(Message):
    type: Literal["ready"] = "ready"
    unread: int


class InboxItemMsg(Message):
    type: Literal["notification"] = "notification"
    item: n.InboxItemOut


SOCKETS["/notifications/ws"] = ("Your inbox, live.", AuthIn | PingIn, InboxReadyMsg | InboxItemMsg | PingOut)


# ---------------------------------------------------------------- preferences


@api.get("/preferences", response_model=n.PreferencesOut, tags=["preferences"])
async def get_preferences(principal: CurrentUser, db: Db) -> n.PreferencesOut:
    """Your channels per category (`critical` ones cannot be switched off) and quiet hours."""
    return await n.get_preferences(db, principal.id, quiet_default(resources().settings))


@api.put("/preferences", response_model=n.PreferencesOut, tags=["preferences"])
async def set_preferences(body: n.PreferencesIn, principal: CurrentUser, db: Db) -> n.PreferencesOut:
    """Switch channels per category (promotions are off until you switch them on) and set
    quiet hours, during which promotions wait. 422 `critical_category` for switching off a
    critical category."""
    return await n.set_preferences(db, principal.id, body, utcnow(), quiet_default(resources().settings))


# ---------------------------------------------------------------- ops and admins


@api.get("/deliveries", response_model=list[n.SendOut], tags=["ops"], dependencies=[OPS])
async def deliveries(
    db: Db, user_id: uuid.UUID, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[n.SendOut]:
    """A user's latest sends with every attempt (queued, sent, failed with the provider's
    code, retried): what support reads when a customer says "I got nothing". Ops and admins."""
    return await n.deliveries(db, user_id, limit)


@api.get("/templates/{kind}/preview", response_model=ContentOut, tags=["ops"], dependencies=[OPS])
async def preview(
    kind: Literal[tuple(TEMPLATES)],  # type: ignore[valid-type]
    language: Language = Language.en,
) -> ContentOut:
    """A template rendered with sample values, as push/SMS/inbox text and as the email page.
    Ops and admins."""
    content: Content = render(kind, language, SAMPLE_CONTEXT)
    return ContentOut(**content.as_dict())


@api.post("/broadcasts", status_code=202, response_model=BroadcastOut, tags=["ops"], dependencies=[ADMIN])
async def broadcast(body: n.BroadcastIn, principal: CurrentUser, db: Db) -> n.Broadcast:
    """Send a promotion to a segment (a store's customers, or every customer). It reaches
    only those who opted into promotions, waits out each one's quiet hours, counts against
    their daily caps, and goes after transactional messages. Admins only."""
    return await n.create_broadcast(db, body, principal.id, utcnow())


@api.get("/broadcasts/{broadcast_id}", response_model=BroadcastOut, tags=["ops"], dependencies=[ADMIN])
async def get_broadcast(broadcast_id: uuid.UUID, db: Db) -> n.Broadcast:
    """A broadcast, with how many users it was recorded for once expanded. Admins only."""
    return await n.get_broadcast(db, broadcast_id)


UnsubscribeToken = Annotated[str, Query(min_length=1, max_length=100, description="From the email's link")]


def _unsubscribe_secret() -> bytes:
    return resources().settings.cursor_secret.get_secret_value().encode()


@api.get("/unsubscribe", response_class=HTMLResponse, tags=["preferences"])
async def unsubscribe_page(token: UnsubscribeToken) -> HTMLResponse:
    """Where a promotional email's unsubscribe link leads: a page whose button confirms (a
    GET changes nothing, so a mail scanner that follows links unsubscribes nobody). 422
    `invalid_unsubscribe_link` for a forged link."""
    n.unsubscribed_user(token, _unsubscribe_secret())
    return HTMLResponse(
        "<!doctype html><title>Unsubscribe</title>"
        f'<form method="post" action="?token={html.escape(token)}">'
        "<p>Stop offers by email?</p><button>Unsubscribe</button></form>"
    )


@api.post("/unsubscribe", response_class=HTMLResponse, tags=["preferences"])
async def unsubscribe(token: UnsubscribeToken, db: Db) -> HTMLResponse:
    """Unsubscribe from promotional email: the page's button, or RFC 8058 one-click (mail
    clients POST to the List-Unsubscribe URL). No login: the signed link is the proof. Other
    channels keep their switches. 422 `invalid_unsubscribe_link` for a forged link."""
    await n.unsubscribe(db, n.unsubscribed_user(token, _unsubscribe_secret()), utcnow())
    return HTMLResponse(
        "<!doctype html><title>Unsubscribed</title><p>You will get no more offers by email.</p>"
    )


if get_settings().dev_endpoints:
    # Registered only outside production, so in production the paths are a plain 404.

    @api.get("/dev/outbox", response_model=list[OutboxMessage], tags=["dev"])
    async def dev_outbox(
        to: Annotated[Phone, Query(description="Recipient, any phone format")],
    ) -> list[OutboxMessage]:
        """SMS recorded for a recipient, newest first (development and test only)."""
        return await DevOutbox(resources().redis).read(to)

    @api.get("/dev/mail", response_model=list[OutboxMessage], tags=["dev"])
    async def dev_mail(to: Annotated[str, Query(max_length=254)]) -> list[OutboxMessage]:
        """Email the local SMTP server received for an address, newest first."""
        return await DevOutbox(resources().redis).read(to, "email")

    @api.put("/dev/clock", response_model=ClockOffset, tags=["dev"])
    async def dev_clock(body: ClockOffset) -> ClockOffset:
        """Shift the dispatcher's clock (seconds; 0 resets), e.g. to see quiet hours end."""
        await resources().redis.set(CLOCK_OFFSET_KEY, body.offset_seconds)
        return body


# Every app in the foreground holds an inbox socket (an ongoing request, mostly idle): a
# replica takes thousands, as the delivery replica does.
app = serve_builder(api, "notifications", _Subscriber, max_ongoing_requests=5_000)
