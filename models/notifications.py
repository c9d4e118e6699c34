"""Notifications: devices (push tokens), preferences and quiet hours, the in-app inbox, and
the sends: one row per (event, user, channel), recorded before the message is handed to a
provider, so a duplicated event never sends twice; each attempt leaves a row support can read.

Everything here works inside one session and only flushes; the tables and API schemas are in
`models.notification_tables` (re-exported here). Deciding an event's messages (`plan_event`)
and handing sends to the providers (retrying, falling back) is in `models.notification_flows`;
the rules (who hears what, on which channel, when) are pure, in `models.notification_rules`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import (
    bindparam,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from models import outbox
from models.db import new_id
from models.errors import NotFound, Unprocessable
from models.notification_rules import (
    CRITICAL,
    DEFAULTS,
    Category,
    Channel,
    Content,
    Rule,
    enabled,
    not_before,
)
from models.notification_tables import (
    ATTEMPTS,
    SEND_FIELDS,
    SENDS,
    Attempt,
    AttemptOut,
    Broadcast,
    BroadcastIn,
    CategoryPreferences,
    CriticalCategory,
    Device,
    DeviceIn,
    DeviceOut,
    InboxItem,
    InboxItemOut,
    InboxPage,
    NoSuchNotification,
    Preference,
    PreferencesIn,
    PreferencesOut,
    QuietHours,
    QuietHoursIO,
    Send,
    SendOut,
)
from models.orders import Order
from models.products import Store, decode_time_cursor, encode_cursor
from models.users import Language, Role, User

# ---------------------------------------------------------------- devices


async def register_device(
    session: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID, body: DeviceIn, now: datetime
) -> DeviceOut:
    row = (
        await session.execute(
            insert(Device)
            .values(
                token=body.token,
                user_id=user_id,
                session_id=session_id,
                platform=body.platform,
                app_version=body.app_version,
                created_at=now,
                last_seen_at=now,
            )
            .on_conflict_do_update(
                index_elements=[Device.token],
                set_={
                    "user_id": user_id,
                    "session_id": session_id,
                    "platform": body.platform,
                    "app_version": body.app_version,
                    "last_seen_at": now,
                },
            )
            .returning(Device.id, Device.platform, Device.app_version, Device.created_at, Device.last_seen_at)
        )
    ).one()
    return DeviceOut(**row._mapping)


async def forget_device(session: AsyncSession, user_id: uuid.UUID, token: str) -> None:
    """Remove one of the caller's tokens (404 when it is not theirs: no probing for others')."""
    result = await session.execute(delete(Device).where(Device.token == token, Device.user_id == user_id))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("No such device", code="device_not_found")


async def forget_session_devices(session: AsyncSession, session_id: uuid.UUID) -> None:
    """Logging out (or revoking a session) stops pushes to the devices it registered."""
    await session.execute(delete(Device).where(Device.session_id == session_id))


async def drop_tokens(session: AsyncSession, tokens: Sequence[str]) -> None:
    """Tokens the provider called dead (unregistered, invalid) go at once."""
    if tokens:
        await session.execute(delete(Device).where(Device.token.in_(tokens)))


# ---------------------------------------------------------------- preferences


@dataclass(frozen=True)
class Recipient:
    """What sending to a user needs, read once per event."""

    id: uuid.UUID
    role: str
    phone: str
    email: str | None
    language: Language
    time_zone: str
    quiet: tuple[time | None, time | None]
    switches: dict[tuple[str, str], bool]

    def wants(self, rule: Rule, channel: Channel) -> bool:
        return enabled(rule.category, channel, self.switches)


async def recipients(
    session: AsyncSession, user_ids: Sequence[uuid.UUID], default_quiet: tuple[time, time]
) -> list[Recipient]:
    if not user_ids:
        return []
    users = (
        await session.execute(
            select(
                User.id,
                User.role,
                User.phone,
                User.email,
                User.email_undeliverable_at,
                User.language,
                User.time_zone,
                QuietHours.user_id.label("own_quiet"),
                QuietHours.starts,
                QuietHours.ends,
            )
            .outerjoin(QuietHours, QuietHours.user_id == User.id)
            .where(User.id.in_(user_ids), User.is_active)
        )
    ).all()
    switches: dict[uuid.UUID, dict[tuple[str, str], bool]] = {}
    for p in await session.execute(
        select(Preference.user_id, Preference.category, Preference.channel, Preference.enabled).where(
            Preference.user_id.in_(user_ids)
        )
    ):
        switches.setdefault(p.user_id, {})[(p.category, p.channel)] = p.enabled
    return [
        Recipient(
            id=u.id,
            role=u.role,
            phone=u.phone,
            email=u.email if u.email_undeliverable_at is None else None,
            language=Language(u.language),
            time_zone=u.time_zone,
            quiet=(u.starts, u.ends) if u.own_quiet is not None else default_quiet,
            switches=switches.get(u.id, {}),
        )
        for u in users
    ]


async def get_preferences(
    session: AsyncSession, user_id: uuid.UUID, default_quiet: tuple[time, time]
) -> PreferencesOut:
    (r,) = await recipients(session, [user_id], default_quiet)
    starts, ends = r.quiet
    return PreferencesOut(
        categories=[
            CategoryPreferences(
                category=category,
                critical=category in CRITICAL,
                channels={ch: enabled(category, ch, r.switches) for ch in Channel},
            )
            for category in DEFAULTS
        ],
        quiet_hours=QuietHoursIO.of(starts, ends) if starts is not None and ends is not None else None,
        language=r.language,
        time_zone=r.time_zone,
    )


async def _switch(
    session: AsyncSession, user_id: uuid.UUID, switches: dict[tuple[str, str], bool], now: datetime
) -> None:
    """Set (category, channel) switches of a user, replacing what they set before."""
    if not switches:
        return
    stmt = insert(Preference).values(
        [
            {"user_id": user_id, "category": category, "channel": channel, "enabled": on, "updated_at": now}
            for (category, channel), on in switches.items()
        ]
    )
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Preference.user_id, Preference.category, Preference.channel],
            set_={"enabled": stmt.excluded.enabled, "updated_at": now},
        )
    )


async def set_preferences(
    session: AsyncSession,
    user_id: uuid.UUID,
    body: PreferencesIn,
    now: datetime,
    default_quiet: tuple[time, time],
) -> PreferencesOut:
    switches: dict[tuple[str, str], bool] = {}
    for category, chosen in body.categories.items():
        for channel, on in chosen.model_dump(exclude_none=True).items():
            if category in CRITICAL and not on:
                raise CriticalCategory(
                    f"{category} messages are critical and cannot be switched off",
                    extra={"category": category.value},
                )
            switches[(category.value, channel)] = on
    await _switch(session, user_id, switches, now)
    if "quiet_hours" in body.model_fields_set:
        starts, ends = body.quiet_hours.times() if body.quiet_hours else (None, None)
        values = {"starts": starts, "ends": ends}
        stmt_q = insert(QuietHours).values(user_id=user_id, **values)
        await session.execute(stmt_q.on_conflict_do_update(index_elements=[QuietHours.user_id], set_=values))
    await session.flush()
    return await get_preferences(session, user_id, default_quiet)


# ---------------------------------------------------------------- planning an event's sends


@dataclass(frozen=True)
class Planned:
    rule: Rule
    recipient: Recipient
    content: Content
    data: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)  # email only (List-Unsubscribe)


@dataclass(frozen=True)
class PlanResult:
    sends: list[int]  # new sends, due now or later
    inbox: list[tuple[uuid.UUID, InboxItemOut]]  # new inbox items and whose (for live sockets)


async def record(
    session: AsyncSession, event_key: str, planned: Sequence[Planned], now: datetime
) -> PlanResult:
    """Record the sends and inbox items of one event. Unique keys make a second recording of
    the same event a no-op: what was recorded the first time is not recorded (or sent) again."""
    sends: list[dict[str, Any]] = []
    inbox: list[dict[str, Any]] = []
    for p in planned:
        r, rule = p.recipient, p.rule
        for channel in rule.channels:
            if not r.wants(rule, channel):
                continue
            if channel is Channel.inbox:
                inbox.append(
                    {
                        "id": new_id(),
                        "user_id": r.id,
                        "event_key": event_key,
                        "kind": rule.kind,
                        "category": rule.category.value,
                        "title": p.content.title,
                        "body": p.content.body,
                        "data": p.data,
                        "created_at": now,
                    }
                )
                continue
            if channel is Channel.email and r.email is None:
                continue
            due_at = not_before(rule, now, r.time_zone, *r.quiet)
            content = {**p.content.as_dict(), "data": p.data, "headers": p.headers}
            sends.append(
                send_row(
                    event_key, r.id, channel, rule.kind, rule.category, rule.critical, due_at, content, now
                )
            )
    new_sends = await queue_sends(session, sends, now)
    items: list[tuple[uuid.UUID, InboxItemOut]] = []
    if inbox:
        rows = await session.scalars(
            insert(InboxItem).values(inbox).on_conflict_do_nothing().returning(InboxItem)
        )
        items = [(i.user_id, _item_out(i)) for i in rows]
    await session.flush()
    return PlanResult(sends=new_sends, inbox=items)


def send_row(
    event_key: str,
    user_id: uuid.UUID,
    channel: Channel,
    kind: str,
    category: Category,
    critical: bool,
    due_at: datetime,
    content: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """A new send's row, for `queue_sends`."""
    return dict(
        event_key=event_key, user_id=user_id, channel=channel.value, kind=kind, category=category.value,
        critical=critical, priority=1 if category is Category.promotions else 0, status="queued",
        next_attempt_at=due_at, content=content, created_at=now, updated_at=now,
    )  # fmt: skip


async def queue_sends(session: AsyncSession, sends: list[dict[str, Any]], now: datetime) -> list[int]:
    """Insert sends (those already recorded are skipped) with their `queued` attempt row."""
    if not sends:
        return []
    ids = list(
        (
            await session.scalars(
                insert(SENDS)
                .values(sends)
                .on_conflict_do_nothing(constraint="uq_notification_sends_once")
                .returning(SENDS.c.id)
            )
        ).all()
    )
    if ids:
        await session.execute(
            insert(ATTEMPTS).values(
                [{"send_id": i, "status": "queued", "code": None, "created_at": now} for i in ids]
            )
        )
    return ids


# ---------------------------------------------------------------- the inbox


def _item_out(i: InboxItem) -> InboxItemOut:
    return InboxItemOut.model_validate(i, from_attributes=True)


async def inbox_page(session: AsyncSession, user_id: uuid.UUID, cursor: str | None, limit: int) -> InboxPage:
    """Newest first, keyset-paged on (created_at, id), with the unread count."""
    stmt = (
        select(InboxItem)
        .where(InboxItem.user_id == user_id)
        .order_by(InboxItem.created_at.desc(), InboxItem.id.desc())
        .limit(limit + 1)
    )
    if cursor:
        created, last_id = decode_time_cursor(cursor)
        stmt = stmt.where(tuple_(InboxItem.created_at, InboxItem.id) < tuple_(created, last_id))
    rows = list((await session.scalars(stmt)).all())
    unread = await session.scalar(
        select(func.count())
        .select_from(InboxItem)
        .where(InboxItem.user_id == user_id, InboxItem.read_at.is_(None))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if more else None
    return InboxPage(
        items=[_item_out(i) for i in rows],
        unread=unread,
        next_cursor=encode_cursor(last.created_at.isoformat(), last.id) if last else None,
    )


async def unread_count(session: AsyncSession, user_id: uuid.UUID) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(InboxItem)
        .where(InboxItem.user_id == user_id, InboxItem.read_at.is_(None))
    )
    return int(count or 0)


async def mark_read(
    session: AsyncSession, user_id: uuid.UUID, item_id: uuid.UUID, now: datetime
) -> InboxItemOut:
    """Mark one of the caller's items read (again is a no-op; someone else's is a 404)."""
    item = await session.get(InboxItem, item_id)
    if item is None or item.user_id != user_id:
        raise NoSuchNotification("No such notification")
    if item.read_at is None:
        item.read_at = now
        await session.flush()
    return _item_out(item)


async def mark_all_read(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> int:
    result = await session.execute(
        update(InboxItem).where(InboxItem.user_id == user_id, InboxItem.read_at.is_(None)).values(read_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- sends: claiming and settling


class Due(BaseModel):
    """A claimed send and what handing it over needs."""

    id: int
    event_key: str
    user_id: uuid.UUID
    channel: Channel
    kind: str
    category: Category
    critical: bool
    attempts: int
    content: dict[str, Any]


async def claim(
    session: AsyncSession, *, priority: int, now: datetime, limit: int, lease_seconds: float
) -> list[Due]:
    """Take due sends of one priority (0 transactional, 1 promotions) and lease them: a send
    whose replica dies while handing it over is due again when the lease ends, so it is sent
    at most once more."""
    rows = await session.execute(
        text(
            """
            WITH due AS (
                SELECT id FROM notification_sends
                WHERE status IN ('queued', 'sending') AND priority = :priority AND next_attempt_at <= :now
                ORDER BY next_attempt_at, id LIMIT :limit FOR UPDATE SKIP LOCKED
            )
            UPDATE notification_sends s
            SET status = 'sending', attempts = s.attempts + 1, updated_at = :now,
                next_attempt_at = :now + make_interval(secs => :lease)
            FROM due WHERE s.id = due.id
            RETURNING s.id, s.event_key, s.user_id, s.channel, s.kind, s.category, s.critical,
                      s.attempts, s.content
            """
        ),
        {"priority": priority, "now": now, "limit": limit, "lease": lease_seconds},
    )
    return [Due.model_validate(dict(r._mapping)) for r in sorted(rows, key=lambda r: r.id)]


@dataclass(frozen=True)
class Settled:
    id: int
    attempts: int
    status: Literal["sent", "failed", "skipped", "retry"]
    code: str | None = None
    provider_id: str | None = None
    retry_at: datetime | None = None


_SETTLE = (
    update(SENDS)
    .where(
        SENDS.c.id == bindparam("send_id"),
        SENDS.c.attempts == bindparam("attempt"),
        SENDS.c.status == "sending",
    )
    .values(
        status=bindparam("new_status"),
        last_code=bindparam("code"),
        provider_id=func.coalesce(bindparam("provider_id"), SENDS.c.provider_id),
        next_attempt_at=func.coalesce(bindparam("retry_at"), SENDS.c.next_attempt_at),
        updated_at=bindparam("now"),
    )
)


async def settle(session: AsyncSession, results: Sequence[Settled], now: datetime) -> None:
    """Record what the providers said, in one round trip per statement, fenced on the attempt
    number (a lease that expired and was claimed again is not overwritten by the older
    attempt)."""
    if not results:
        return
    await session.execute(
        _SETTLE,
        [
            {
                "send_id": r.id,
                "attempt": r.attempts,
                "new_status": "queued" if r.status == "retry" else r.status,
                "code": r.code,
                "provider_id": r.provider_id,
                "retry_at": r.retry_at,
                "now": now,
            }
            for r in results
        ],
    )
    await session.execute(
        insert(ATTEMPTS).values(
            [{"send_id": r.id, "status": r.status, "code": r.code, "created_at": now} for r in results]
        )
    )


@dataclass(frozen=True)
class Address:
    phone: str
    email: str | None
    tokens: list[str]


async def addresses(session: AsyncSession, user_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Address]:
    """Where each user can be reached now (tokens as of this moment, not of the event)."""
    tokens: dict[uuid.UUID, list[str]] = {}
    for d in await session.execute(
        select(Device.user_id, Device.token)
        .where(Device.user_id.in_(user_ids))
        .order_by(Device.last_seen_at.desc())
    ):
        tokens.setdefault(d.user_id, []).append(d.token)
    rows = await session.execute(
        select(User.id, User.phone, User.email, User.email_undeliverable_at).where(User.id.in_(user_ids))
    )
    return {
        u.id: Address(
            phone=u.phone,
            email=u.email if u.email_undeliverable_at is None else None,
            tokens=tokens.get(u.id, []),
        )
        for u in rows
    }


async def mark_email_undeliverable(
    session: AsyncSession, user_id: uuid.UUID, email: str, now: datetime
) -> None:
    """A permanent SMTP refusal: stop mailing the address until the user changes it."""
    await session.execute(
        update(User).where(User.id == user_id, User.email == email).values(email_undeliverable_at=now)
    )


# ---------------------------------------------------------------- broadcasts

BROADCAST_TOPIC = "promotion.broadcast"


async def create_broadcast(
    session: AsyncSession, body: BroadcastIn, by: uuid.UUID, now: datetime
) -> Broadcast:
    """Record a broadcast and hand it to the notifications service through the outbox."""
    if body.store_id is not None and await session.get(Store, body.store_id) is None:
        raise NotFound("No such store", code="store_not_found")
    broadcast = Broadcast(
        title=body.title, body=body.body, store_id=body.store_id, created_by=by, created_at=now
    )
    session.add(broadcast)
    await session.flush()
    await outbox.emit(session, BROADCAST_TOPIC, broadcast.id, {"broadcast_id": str(broadcast.id)})
    return broadcast


async def get_broadcast(session: AsyncSession, broadcast_id: uuid.UUID) -> Broadcast:
    broadcast = await session.get(Broadcast, broadcast_id)
    if broadcast is None:
        raise NotFound("No such broadcast", code="broadcast_not_found")
    return broadcast


async def audience(
    session: AsyncSession, broadcast: Broadcast, after: uuid.UUID | None, limit: int
) -> list[uuid.UUID]:
    """The next page (by id) of active customers in the segment who opted into promotions on
    some channel: nobody else could receive it."""
    opted_in = (
        select(Preference.user_id)
        .where(Preference.user_id == User.id, Preference.category == Category.promotions, Preference.enabled)
        .exists()
    )
    stmt = (
        select(User.id)
        .where(User.role == Role.customer, User.is_active, opted_in)
        .order_by(User.id)
        .limit(limit)
    )
    if broadcast.store_id is not None:
        stmt = stmt.where(
            select(Order.id).where(Order.user_id == User.id, Order.store_id == broadcast.store_id).exists()
        )
    if after is not None:
        stmt = stmt.where(User.id > after)
    return list((await session.scalars(stmt)).all())


# ---------------------------------------------------------------- unsubscribing by link


def unsubscribe_token(user_id: uuid.UUID, secret: bytes) -> str:
    """A link's proof that it was mailed to this user (no login needed to unsubscribe)."""
    mac = hmac.new(secret, b"unsubscribe:" + user_id.bytes, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(user_id.bytes + mac).decode().rstrip("=")


def unsubscribed_user(token: str, secret: bytes) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raw = b""
    if len(raw) == 32:
        user_id = uuid.UUID(bytes=raw[:16])
        if hmac.compare_digest(unsubscribe_token(user_id, secret), token):
            return user_id
    raise Unprocessable("This unsubscribe link is not valid", code="invalid_unsubscribe_link")


async def unsubscribe(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> None:
    """Promotional email off (the link's promise); other channels keep their switches."""
    await _switch(session, user_id, {(Category.promotions.value, Channel.email.value): False}, now)


# ---------------------------------------------------------------- retention


async def purge(session: AsyncSession, *, sends_before: datetime, inbox_before: datetime) -> int:
    """Drop finished sends (their attempts go with them) and inbox items older than their
    retention; a send still queued or leased is kept whatever its age."""
    sends = await session.execute(
        delete(Send).where(Send.status.in_(("sent", "failed", "skipped")), Send.updated_at < sends_before)
    )
    inbox = await session.execute(delete(InboxItem).where(InboxItem.created_at < inbox_before))
    return int(sends.rowcount) + int(inbox.rowcount)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- support's view


async def deliveries(session: AsyncSession, user_id: uuid.UUID, limit: int) -> list[SendOut]:
    """A user's latest sends, each with its attempts (ops and support)."""
    sends = list(
        (
            await session.scalars(
                select(Send).where(Send.user_id == user_id).order_by(Send.id.desc()).limit(limit)
            )
        ).all()
    )
    steps: dict[int, list[AttemptOut]] = {}
    if sends:
        for a in await session.scalars(
            select(Attempt).where(Attempt.send_id.in_([s.id for s in sends])).order_by(Attempt.id)
        ):
            steps.setdefault(a.send_id, []).append(AttemptOut(status=a.status, code=a.code, at=a.created_at))
    return [
        SendOut.model_validate({**{f: getattr(s, f) for f in SEND_FIELDS}, "attempts": steps.get(s.id, [])})
        for s in sends
    ]


async def store_staff(session: AsyncSession, store_id: uuid.UUID) -> list[uuid.UUID]:
    return list(
        (
            await session.scalars(
                select(User.id).where(User.role == Role.staff, User.store_id == store_id, User.is_active)
            )
        ).all()
    )
