"""Notifications' tables and the schemas of its API: devices (push tokens), preferences and
quiet hours, the in-app inbox, broadcasts, and the sends (one row per event, user and channel)
with a row per attempt. The operations on them are in `models.notifications`, which also
exposes these names."""

from __future__ import annotations

import uuid
from datetime import datetime, time
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.bodies import Strict
from models.db import Base, new_id
from models.errors import NotFound, Unprocessable
from models.notification_rules import (
    Category,
    Channel,
)
from models.push import TOKEN_ALPHABET, TOKEN_MAX, TOKEN_MIN
from models.users import Language
from models.users import Text as UserText

Platform = Literal["android", "ios", "web"]
SEND_STATUSES = ("queued", "sending", "sent", "failed", "skipped")

# ---------------------------------------------------------------- tables


class Device(Base):
    """A push token of one app install. A token is one device's: registering it again, as
    anyone, moves it (the phone changed hands or accounts)."""

    __tablename__ = "notification_devices"
    __table_args__ = (CheckConstraint("platform IN ('android', 'ios', 'web')", name="platform"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    token: Mapped[str] = mapped_column(Text, unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The login that registered it: logging out removes it.
    session_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True
    )
    platform: Mapped[str] = mapped_column(String(8))
    app_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]


class Preference(Base):
    """A switch a user set for one category on one channel (absent: the default)."""

    __tablename__ = "notification_preferences"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    category: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(8), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime]


class QuietHours(Base):
    """A user's own quiet window (local time); absent: the default window of the settings."""

    __tablename__ = "notification_quiet_hours"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    # Both null: no quiet hours at all.
    starts: Mapped[time | None]
    ends: Mapped[time | None]


class InboxItem(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("user_id", "event_key", name="uq_notifications_user_event"),
        Index("ix_notifications_user_created", "user_id", "created_at", "id"),
        Index("ix_notifications_unread", "user_id", postgresql_where=text("read_at IS NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    event_key: Mapped[str] = mapped_column(String(80))
    kind: Mapped[str] = mapped_column(String(32))
    category: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, str]] = mapped_column(JSONB)
    created_at: Mapped[datetime]
    read_at: Mapped[datetime | None]


class Send(Base):
    """One message to one user on one provider channel, from recording to its end."""

    __tablename__ = "notification_sends"
    __table_args__ = (
        UniqueConstraint("event_key", "user_id", "channel", name="uq_notification_sends_once"),
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in SEND_STATUSES)})", name="status"),
        CheckConstraint("channel IN ('push', 'sms', 'email')", name="channel"),
        # Due work, transactional (priority 0) before promotions (1).
        Index(
            "ix_notification_sends_due",
            "priority",
            "next_attempt_at",
            postgresql_where=text("status IN ('queued', 'sending')"),
        ),
        Index("ix_notification_sends_user", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_key: Mapped[str] = mapped_column(String(80))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    category: Mapped[str] = mapped_column(String(16))
    critical: Mapped[bool] = mapped_column(Boolean)
    priority: Mapped[int] = mapped_column(SmallInteger)
    status: Mapped[str] = mapped_column(String(12))
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    next_attempt_at: Mapped[datetime]
    content: Mapped[dict[str, Any]] = mapped_column(JSONB)
    last_code: Mapped[str | None] = mapped_column(String(64))
    provider_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Broadcast(Base):
    """An admin's promotion to a segment: customers of one store, or every customer. It goes
    through each recipient's switches, quiet hours and daily caps like any promotion."""

    __tablename__ = "notification_broadcasts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(120))
    body: Mapped[str] = mapped_column(String(500))
    store_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("stores.id", ondelete="CASCADE"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime]
    # How many users it was recorded for, once the service expanded it.
    recipients: Mapped[int | None]


class Attempt(Base):
    """What happened to a send, one row per step: queued, then sent, failed or retry."""

    __tablename__ = "notification_attempts"
    __table_args__ = (Index("ix_notification_attempts_send", "send_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    send_id: Mapped[int] = mapped_column(ForeignKey("notification_sends.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(12))
    code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]


# The tables themselves: the many-row writes of a broadcast go through Core, not the ORM's
# bulk machinery (a tenth of the notifications replica's samples under a broadcast).
SENDS: Table = Send.__table__  # type: ignore[assignment]
ATTEMPTS: Table = Attempt.__table__  # type: ignore[assignment]

# ---------------------------------------------------------------- schemas


class DeviceIn(Strict):
    token: Annotated[
        str, StringConstraints(min_length=TOKEN_MIN, max_length=TOKEN_MAX, pattern=TOKEN_ALPHABET)
    ]
    platform: Platform
    app_version: Annotated[str, StringConstraints(max_length=32, pattern=r"^[A-Za-z0-9.+\-_]+$")] | None = (
        None
    )


class DeviceOut(BaseModel):
    id: int
    platform: Platform
    app_version: str | None
    created_at: datetime
    last_seen_at: datetime


# A device's token in a path (the same alphabet the registration accepts).
TOKEN_PATH = Path(min_length=1, max_length=TOKEN_MAX, pattern=TOKEN_ALPHABET)


class BroadcastIn(Strict):
    """A promotion: who gets it (`store_id`: the store's customers; absent: every customer)
    and what it says (plain text: email escapes it)."""

    title: Annotated[UserText, StringConstraints(max_length=120)]
    body: Annotated[UserText, StringConstraints(max_length=500)]
    store_id: uuid.UUID | None = None


class BroadcastOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    title: str
    body: str
    store_id: uuid.UUID | None
    created_at: datetime
    recipients: int | None = Field(
        description="Users it was recorded for; null until the service expanded it"
    )


class ReadAll(BaseModel):
    updated: int


class ContentOut(BaseModel):
    """A rendered message: `title` and `body` (push, SMS, inbox), `html` (email)."""

    title: str
    body: str
    html: str


class ClockOffset(Strict):
    offset_seconds: float = Field(strict=True, ge=0, le=30 * 24 * 3600)


class ChannelSwitches(Strict):
    push: StrictBool | None = None
    sms: StrictBool | None = None
    email: StrictBool | None = None
    inbox: StrictBool | None = None


# A local wall-clock time, minutes precision (JSON Schema's `time` format wants an offset,
# which a time in "the user's zone" does not have).
ClockTime = Annotated[
    str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), Field(examples=["22:00"])
]


class QuietHoursIO(Strict):
    """Local time (HH:MM) in the user's time zone; `start` after `end` spans midnight."""

    start: ClockTime
    end: ClockTime

    @classmethod
    def of(cls, start: time, end: time) -> QuietHoursIO:
        return cls(start=start.strftime("%H:%M"), end=end.strftime("%H:%M"))

    def times(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)


class PreferencesIn(Strict):
    """Switch channels per category (only what is given changes). Critical categories cannot
    be switched off (422 `critical_category`). `quiet_hours`: your window, or null for none;
    leave it out to keep the current one."""

    categories: dict[Category, ChannelSwitches] = Field(default_factory=dict)
    quiet_hours: QuietHoursIO | None = Field(default=None)


class CategoryPreferences(BaseModel):
    category: Category
    critical: bool
    channels: dict[Channel, bool]


class PreferencesOut(BaseModel):
    categories: list[CategoryPreferences]
    quiet_hours: QuietHoursIO | None
    language: Language
    time_zone: str


class InboxItemOut(BaseModel):
    id: uuid.UUID
    kind: str
    category: Category
    title: str
    body: str
    data: dict[str, str]
    created_at: datetime
    read_at: datetime | None


class InboxPage(BaseModel):
    items: list[InboxItemOut]
    unread: int
    next_cursor: str | None


class AttemptOut(BaseModel):
    status: str
    code: str | None
    at: datetime


class SendOut(BaseModel):
    id: int
    event_key: str
    channel: Channel
    kind: str
    category: Category
    critical: bool
    status: str
    last_code: str | None
    created_at: datetime
    attempts: list[AttemptOut]


SEND_FIELDS = [f for f in SendOut.model_fields if f != "attempts"]


class NoSuchNotification(NotFound):
    code = "notification_not_found"


class CriticalCategory(Unprocessable):
    code = "critical_category"
