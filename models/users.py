"""Users: phone OTP login, sessions with rotating refresh tokens, profile and addresses.

Every guarantee here lives in PostgreSQL: advisory locks serialise OTP sends per IP and per
phone, conditional updates make refresh-token rotation single-winner, a partial unique index
keeps one default address per user.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StrictBool,
    StringConstraints,
)
from pydantic_core import PydanticCustomError
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from config.settings import Settings, get_settings
from models.bodies import Strict
from models.db import Base, TimestampMixin, new_id, note_auth_change, patch_changes
from models.errors import (
    AppError,
    Conflict,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
)
from models.tokens import TokenService

MAX_ADDRESSES_PER_USER = 20


class Language(enum.StrEnum):
    """What the user reads their messages in."""

    en = "en"
    hi = "hi"


def _known_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError("unknown_time_zone", "Not an IANA time zone") from None
    return name


TimeZone = Annotated[
    str,
    StringConstraints(max_length=64, pattern=r"^[A-Za-z]+(/[A-Za-z0-9_+\-]+){0,2}$"),
    AfterValidator(_known_zone),
    Field(description="An IANA time zone, e.g. Asia/Kolkata", examples=["Asia/Kolkata"]),
]


class Role(enum.StrEnum):
    customer = "customer"
    partner = "partner"
    staff = "staff"  # works in one dark store (users.store_id): moves its orders along
    ops = "ops"  # operations: every store's orders, refunds
    admin = "admin"


# ---------------------------------------------------------------- tables


class User(TimestampMixin, Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('customer', 'partner', 'staff', 'ops', 'admin')", name="role"),
        CheckConstraint("role <> 'staff' OR store_id IS NOT NULL", name="staff_store"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    phone: Mapped[str] = mapped_column(String(16), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))
    email: Mapped[str | None] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(16), default=Role.customer, server_default="customer")
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # Set by checkout when the first order is placed; first-order-only coupons check it.
    first_order_at: Mapped[datetime | None]
    # The dark store a staff member works in.
    store_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("stores.id", ondelete="SET NULL"))
    language: Mapped[str] = mapped_column(String(8), server_default="en")
    time_zone: Mapped[str] = mapped_column(String(64), server_default="Asia/Kolkata")
    # Set when a mail server refused the address for good; changing the email clears it.
    email_undeliverable_at: Mapped[datetime | None]


class OtpChallenge(Base):
    __tablename__ = "otp_challenges"
    __table_args__ = (
        Index("ix_otp_challenges_phone_created", "phone", "created_at"),
        Index("ix_otp_challenges_ip_created", "requester_ip", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    phone: Mapped[str] = mapped_column(String(16))
    code_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    requester_ip: Mapped[str] = mapped_column(String(45))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(default=0)
    consumed_at: Mapped[datetime | None]
    invalidated_at: Mapped[datetime | None]


class PhoneGuard(Base):
    """Consecutive wrong codes per phone, across challenges, and the lockout they cause."""

    __tablename__ = "otp_phone_guards"

    phone: Mapped[str] = mapped_column(String(16), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[datetime | None]


class AuthSession(Base):
    """A login: the family of refresh tokens that descend from one OTP verification."""

    __tablename__ = "auth_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoke_reason: Mapped[str | None] = mapped_column(String(32))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    ip: Mapped[str | None] = mapped_column(String(45))


class RefreshToken(Base):
    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime]
    rotated_at: Mapped[datetime | None]


class Address(TimestampMixin, Base):
    __tablename__ = "addresses"
    __table_args__ = (
        Index(
            "uq_addresses_one_default",
            "user_id",
            unique=True,
            postgresql_where=text("is_default"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(32))
    line1: Mapped[str] = mapped_column(String(200))
    line2: Mapped[str | None] = mapped_column(String(200))
    landmark: Mapped[str | None] = mapped_column(String(120))
    city: Mapped[str] = mapped_column(String(100))
    pincode: Mapped[str] = mapped_column(String(6))
    lat: Mapped[float] = mapped_column(Float)
    lng: Mapped[float] = mapped_column(Float)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)


# ---------------------------------------------------------------- schemas


def normalize_phone(raw: str) -> str:
    """Parse a phone number (local or international form, in `phone_default_region`) into
    E.164, or raise."""
    region = get_settings().phone_default_region
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_valid_number(number):
        raise PydanticCustomError("invalid_phone", "Not a valid phone number")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    # E.164 caps numbers at 15 digits, but phonenumbers accepts longer ones in some plans
    # (German numbers with appended digits, found by fuzzing): SMS gateways refuse those.
    if len(e164) > 16:
        raise PydanticCustomError("invalid_phone", "Not a valid phone number")
    return e164


# The documented pattern guides clients and fuzzers (no country code starts with 0); validation
# itself is `normalize_phone`, so every malformed number gets the one clear code `invalid_phone`.
Phone = Annotated[
    str,
    Field(max_length=32, json_schema_extra={"pattern": r"^(\+[1-9]|[0-9])[0-9 ().-]{5,30}$"}),
    AfterValidator(normalize_phone),
]


def storable(value: str) -> bool:
    """Whether PostgreSQL can store the string: no NUL, and valid UTF-8 (JSON can smuggle in
    lone surrogates)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def no_nul(value: str) -> str:
    # Rejecting these here keeps them a 422 rather than a database error (500).
    if not storable(value):
        raise ValueError("must not contain NUL characters or lone surrogates")
    return value


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1), AfterValidator(no_nul)]


class OtpRequest(Strict):
    phone: Phone = Field(examples=["+919812345678"])


class OtpChallengeOut(BaseModel):
    challenge_id: uuid.UUID
    expires_in: int = Field(description="Seconds until the code expires")
    resend_after: int = Field(description="Seconds until a new code may be requested")


class OtpVerify(Strict):
    challenge_id: uuid.UUID
    code: str = Field(pattern=r"^[0-9]{6}$")


class RefreshRequest(Strict):
    refresh_token: str = Field(min_length=1, max_length=200)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    phone: str
    name: str | None
    email: str | None
    role: Role
    is_active: bool
    language: Language
    time_zone: str
    created_at: datetime


class AccountStatusIn(Strict):
    """An admin disables an account (every token of it stops working on its next request,
    and it cannot refresh or log in) or enables it again."""

    active: StrictBool


class RoleIn(Strict):
    """An admin sets a user's role; `staff` needs the `store_id` they work in (a partner is
    attached to their store through the delivery service)."""

    role: Role
    store_id: uuid.UUID | None = None


class UserUpdate(Strict):
    """Only these fields are writable; anything else (role, phone, id) is a 422."""

    name: Annotated[Text, StringConstraints(max_length=100)] | None = None
    email: EmailStr | None = None
    language: Language | None = None
    time_zone: TimeZone | None = None


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "Bearer"  # noqa: S105 (a scheme name, not a secret)
    expires_in: int
    user: UserOut


class SessionOut(BaseModel):
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    user_agent: str | None
    ip: str | None
    current: bool


Label = Annotated[Text, StringConstraints(max_length=32)]
Line = Annotated[Text, StringConstraints(max_length=200)]
Landmark = Annotated[Text, StringConstraints(max_length=120)]
City = Annotated[Text, StringConstraints(max_length=100)]
Pincode = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{5}$")]


# Strict: a number, never a numeric string (the documented type is a number).
def round_coordinate(degrees: float) -> float:
    """Degrees to 7 decimals (about 1 cm): finer is noise, and PostgreSQL's float arithmetic
    raises "underflow" where a distance formula squares a subnormal difference (a store at
    latitude 1e-160 made every nearby search there a 500)."""
    return round(degrees, 7)


Lat = Annotated[float, Field(strict=True, ge=-90, le=90), AfterValidator(round_coordinate)]
Lng = Annotated[float, Field(strict=True, ge=-180, le=180), AfterValidator(round_coordinate)]


class AddressIn(Strict):
    label: Label = "home"
    line1: Line
    line2: Line | None = None
    landmark: Landmark | None = None
    city: City
    pincode: Pincode
    lat: Lat
    lng: Lng
    is_default: StrictBool = False


class AddressPatch(Strict):
    label: Label | None = None
    line1: Line | None = None
    line2: Line | None = None
    landmark: Landmark | None = None
    city: City | None = None
    pincode: Pincode | None = None
    lat: Lat | None = None
    lng: Lng | None = None
    is_default: StrictBool | None = None


class AddressOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    label: str
    line1: str
    line2: str | None
    landmark: str | None
    city: str
    pincode: str
    lat: float
    lng: float
    is_default: bool


# ---------------------------------------------------------------- OTP


class OtpRejected(AppError):
    """A failed verification whose bookkeeping (attempts, lockout) must be committed."""

    keep_changes = True


def otp_hash(pepper: str, challenge_id: uuid.UUID, code: str) -> bytes:
    """Keyed hash of the code, bound to its challenge so equal codes never hash alike."""
    return hmac.new(pepper.encode(), f"{challenge_id}:{code}".encode(), hashlib.sha256).digest()


async def _advisory_lock(session: AsyncSession, key: str) -> None:
    await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, int((moment - now).total_seconds() + 0.999))


async def _locked_until(session: AsyncSession, phone: str, now: datetime) -> datetime | None:
    guard = await session.get(PhoneGuard, phone)
    if guard and guard.locked_until and guard.locked_until > now:
        return guard.locked_until
    return None


async def request_otp(
    session: AsyncSession, *, phone: str, ip: str, settings: Settings, now: datetime
) -> tuple[OtpChallenge, str]:
    """Create a challenge and return it with the plain code, which the caller sends by SMS
    after commit and never stores or logs."""
    # Always IP first, then phone: one lock order means no deadlock between requests.
    await _advisory_lock(session, f"otp-ip:{ip}")
    await _advisory_lock(session, f"otp-phone:{phone}")

    if (until := await _locked_until(session, phone, now)) is not None:
        raise TooManyRequests(
            "Too many failed attempts for this phone; try later",
            code="otp_locked",
            retry_after=_seconds_until(until, now),
        )
    hour_ago = now - timedelta(hours=1)
    recent = (
        await session.scalars(
            select(OtpChallenge.created_at)
            .where(OtpChallenge.phone == phone, OtpChallenge.created_at > hour_ago)
            .order_by(OtpChallenge.created_at.desc())
        )
    ).all()
    if recent and (resend_at := recent[0] + timedelta(seconds=settings.otp_resend_after_seconds)) > now:
        raise TooManyRequests(
            "A code was sent moments ago; wait before asking again",
            code="otp_resend_too_soon",
            retry_after=_seconds_until(resend_at, now),
        )
    if len(recent) >= settings.otp_max_sends_per_phone_per_hour:
        raise TooManyRequests(
            "Too many codes sent to this phone in the last hour",
            code="otp_phone_limit",
            retry_after=_seconds_until(recent[-1] + timedelta(hours=1), now),
        )
    ip_sends = await session.scalar(
        select(func.count())
        .select_from(OtpChallenge)
        .where(OtpChallenge.requester_ip == ip, OtpChallenge.created_at > hour_ago)
    )
    if (ip_sends or 0) >= settings.otp_max_sends_per_ip_per_hour:
        raise TooManyRequests(
            "Too many codes requested from this network in the last hour",
            code="otp_ip_limit",
            retry_after=3600,
        )

    # A resend supersedes every earlier code for this phone.
    await session.execute(
        update(OtpChallenge)
        .where(
            OtpChallenge.phone == phone,
            OtpChallenge.consumed_at.is_(None),
            OtpChallenge.invalidated_at.is_(None),
        )
        .values(invalidated_at=now)
    )
    challenge_id = new_id()
    code = f"{secrets.randbelow(10**6):06d}"
    challenge = OtpChallenge(
        id=challenge_id,
        phone=phone,
        code_hash=otp_hash(settings.otp_pepper.get_secret_value(), challenge_id, code),
        requester_ip=ip,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.otp_ttl_seconds),
        attempts=0,
    )
    session.add(challenge)
    await session.flush()
    return challenge, code


async def _record_failure(
    session: AsyncSession, phone: str, settings: Settings, now: datetime
) -> datetime | None:
    """Count a wrong code against the phone; returns the lockout end if this one locks it."""
    stmt = (
        insert(PhoneGuard)
        .values(phone=phone, consecutive_failures=1)
        .on_conflict_do_update(
            index_elements=[PhoneGuard.phone],
            set_={"consecutive_failures": PhoneGuard.consecutive_failures + 1},
        )
        .returning(PhoneGuard.consecutive_failures)
    )
    failures = (await session.execute(stmt)).scalar_one()
    if failures < settings.otp_max_consecutive_failures:
        return None
    until = now + timedelta(seconds=settings.otp_lockout_seconds)
    await session.execute(
        update(PhoneGuard).where(PhoneGuard.phone == phone).values(consecutive_failures=0, locked_until=until)
    )
    return until


async def verify_otp(
    session: AsyncSession,
    *,
    challenge_id: uuid.UUID,
    code: str,
    ip: str,
    user_agent: str | None,
    settings: Settings,
    tokens: TokenService,
    now: datetime,
) -> TokenPair:
    challenge = await session.get(OtpChallenge, challenge_id, with_for_update=True)
    if challenge is None:
        raise NotFound("Unknown challenge", code="otp_challenge_not_found")
    if (until := await _locked_until(session, challenge.phone, now)) is not None:
        raise TooManyRequests(
            "Too many failed attempts for this phone; try later",
            code="otp_locked",
            retry_after=_seconds_until(until, now),
        )
    if challenge.consumed_at or challenge.invalidated_at:
        raise OtpRejected("This code is no longer valid; request a new one", code="otp_inactive")
    if challenge.expires_at <= now:
        raise OtpRejected("The code has expired; request a new one", code="otp_expired")

    expected = otp_hash(settings.otp_pepper.get_secret_value(), challenge.id, code)
    if not hmac.compare_digest(expected, challenge.code_hash):
        challenge.attempts += 1
        attempts_left = settings.otp_max_attempts - challenge.attempts
        if attempts_left <= 0:
            challenge.invalidated_at = now
        locked = await _record_failure(session, challenge.phone, settings, now)
        await session.flush()
        if locked is not None:
            raise TooManyRequests(
                "Too many failed attempts for this phone; try later",
                code="otp_locked",
                retry_after=_seconds_until(locked, now),
            ).with_kept_changes()
        if attempts_left <= 0:
            raise OtpRejected("Too many wrong codes; request a new one", code="otp_attempts_exceeded")
        raise OtpRejected("Wrong code", code="otp_invalid", extra={"attempts_left": attempts_left})

    challenge.consumed_at = now
    await session.execute(
        update(PhoneGuard).where(PhoneGuard.phone == challenge.phone).values(consecutive_failures=0)
    )
    user = await _get_or_create_user(session, challenge.phone)
    if not user.is_active:
        raise Forbidden("This account is disabled", code="user_disabled")
    auth_session = AuthSession(
        id=new_id(),
        user_id=user.id,
        created_at=now,
        last_used_at=now,
        expires_at=now + timedelta(seconds=settings.refresh_token_ttl_seconds),
        user_agent=(user_agent or "")[:256] or None,
        ip=ip,
    )
    session.add(auth_session)
    await session.flush()
    await _cap_sessions(session, user.id, settings.max_sessions_per_user, now)
    return await _issue_pair(session, user, auth_session, tokens, now)


async def _get_or_create_user(session: AsyncSession, phone: str) -> User:
    await session.execute(
        insert(User).values(id=new_id(), phone=phone).on_conflict_do_nothing(index_elements=[User.phone])
    )
    return (await session.scalars(select(User).where(User.phone == phone))).one()


async def ensure_admin(session: AsyncSession, phone: str) -> User:
    """Make the user with this phone an admin (creating it if needed). Idempotent."""
    user = await _get_or_create_user(session, normalize_phone(phone))
    user.role = Role.admin
    note_auth_change(session, user.id)
    await session.flush()
    return user


# ---------------------------------------------------------------- sessions and tokens


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _issue_pair(
    session: AsyncSession, user: User, auth_session: AuthSession, tokens: TokenService, now: datetime
) -> TokenPair:
    refresh = "rt_" + secrets.token_urlsafe(32)
    session.add(RefreshToken(session_id=auth_session.id, token_hash=_token_hash(refresh), created_at=now))
    await session.flush()
    access = tokens.issue(user_id=user.id, session_id=auth_session.id, role=user.role, now=now)
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        expires_in=tokens.ttl,
        user=UserOut.model_validate(user),
    )


async def _cap_sessions(session: AsyncSession, user_id: uuid.UUID, cap: int, now: datetime) -> None:
    """Keep at most `cap` live sessions per user by revoking the least recently used."""
    live = (
        await session.scalars(
            select(AuthSession.id)
            .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
            .order_by(AuthSession.last_used_at.desc())
            .offset(cap)
        )
    ).all()
    if live:
        await session.execute(
            update(AuthSession)
            .where(AuthSession.id.in_(live))
            .values(revoked_at=now, revoke_reason="session_limit")
        )
        note_auth_change(session, user_id)


async def refresh_tokens(
    session: AsyncSession, *, refresh_token: str, tokens: TokenService, settings: Settings, now: datetime
) -> TokenPair:
    """Rotate a refresh token. Presenting an already-rotated token means it leaked (or a
    client raced itself): the whole session is revoked."""
    row = (
        await session.scalars(
            select(RefreshToken).where(RefreshToken.token_hash == _token_hash(refresh_token))
        )
    ).one_or_none()
    if row is None:
        raise Unauthorized("Invalid refresh token", code="invalid_refresh_token")
    auth_session = await session.get(AuthSession, row.session_id, with_for_update=True)
    assert auth_session is not None  # FK
    if auth_session.revoked_at is not None:
        raise session_ended()
    if auth_session.expires_at <= now:
        raise Unauthorized("This session has expired; log in again", code="session_expired")
    rotated = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.rotated_at.is_(None))
        .values(rotated_at=now)
    )
    if rotated.rowcount == 0:  # type: ignore[attr-defined]
        auth_session.revoked_at, auth_session.revoke_reason = now, "refresh_token_reuse"
        note_auth_change(session, auth_session.user_id)
        await session.flush()
        raise Unauthorized(
            "Refresh token was already used; the session is revoked", code="refresh_token_reused"
        ).with_kept_changes()
    user = await session.get(User, auth_session.user_id)
    assert user is not None
    if not user.is_active:
        raise Forbidden("This account is disabled", code="user_disabled")
    auth_session.last_used_at = now
    auth_session.expires_at = now + timedelta(seconds=settings.refresh_token_ttl_seconds)
    return await _issue_pair(session, user, auth_session, tokens, now)


@dataclass(frozen=True)
class Caller:
    """Who a request acts as: what authorization decisions need, and all the authentication
    cache keeps (not the whole user row)."""

    id: uuid.UUID
    role: Role
    store_id: uuid.UUID | None  # the store a staff member works in


# Built once: every authenticated request that misses the cache runs it, and building the
# statement and its cache key on each call cost ~0.09 ms of CPU.
_AUTHENTICATE = (
    select(User.role, User.store_id, AuthSession.expires_at)
    .join(AuthSession, AuthSession.user_id == User.id)
    .where(
        AuthSession.id == bindparam("session_id"),
        User.id == bindparam("user_id"),
        AuthSession.revoked_at.is_(None),
        AuthSession.expires_at > bindparam("now"),
        User.is_active,
    )
)


async def authenticate(
    session: AsyncSession, *, user_id: uuid.UUID, session_id: uuid.UUID, now: datetime
) -> tuple[Caller, datetime]:
    """Resolve a verified access token to its caller and its session's expiry, in one query:
    a revoked session, a disabled user or a deleted user all end access at once, not when the
    token expires."""
    params = {"session_id": session_id, "user_id": user_id, "now": now}
    row = (await session.execute(_AUTHENTICATE, params)).one_or_none()
    if row is None:
        raise session_ended()
    return Caller(id=user_id, role=Role(row.role), store_id=row.store_id), row.expires_at


def session_ended() -> Unauthorized:
    return Unauthorized("This session has ended; log in again", code="session_revoked")


async def revoke_session(
    session: AsyncSession, *, user_id: uuid.UUID, session_id: uuid.UUID, reason: str, now: datetime
) -> None:
    result = await session.execute(
        update(AuthSession)
        .where(
            AuthSession.id == session_id,
            AuthSession.user_id == user_id,
            AuthSession.revoked_at.is_(None),
        )
        .values(revoked_at=now, revoke_reason=reason)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("No such session", code="session_not_found")
    note_auth_change(session, user_id)


async def list_sessions(
    session: AsyncSession, *, user_id: uuid.UUID, current: uuid.UUID, now: datetime
) -> list[SessionOut]:
    rows = await session.scalars(
        select(AuthSession)
        .where(
            AuthSession.user_id == user_id,
            AuthSession.revoked_at.is_(None),
            AuthSession.expires_at > now,
        )
        .order_by(AuthSession.last_used_at.desc())
    )
    return [
        SessionOut(
            id=s.id,
            created_at=s.created_at,
            last_used_at=s.last_used_at,
            expires_at=s.expires_at,
            user_agent=s.user_agent,
            ip=s.ip,
            current=s.id == current,
        )
        for s in rows
    ]


# ---------------------------------------------------------------- profile


async def _lock_for_admin_change(session: AsyncSession, user_id: uuid.UUID) -> tuple[User, bool]:
    """The user, locked, and whether they are the last active admin. The active admins' rows
    are locked first, in id order, so role and status changes that could leave no admin
    serialise on them: two admins demoting each other at once cannot leave none."""
    admins = list(
        await session.scalars(
            select(User.id).where(User.role == Role.admin, User.is_active).order_by(User.id).with_for_update()
        )
    )
    user = await session.get(User, user_id, with_for_update=True)
    if user is None:
        raise NotFound("No such user", code="user_not_found")
    return user, admins == [user.id]


def _last_admin() -> Conflict:
    return Conflict("This is the last admin: make another admin first", code="last_admin")


async def set_role(session: AsyncSession, user_id: uuid.UUID, data: RoleIn) -> User:
    """Grant or revoke a role (admins only, checked by the caller): the last active admin
    cannot lose the role (409 `last_admin`, see `_lock_for_admin_change`). Takes effect on the user's next
    request (roles are read from the database, not the token)."""
    user, last_admin = await _lock_for_admin_change(session, user_id)
    if data.role == Role.staff and data.store_id is None:
        raise Unprocessable("Staff work in a store: give its store_id", code="store_required")
    if data.role != Role.staff and data.store_id is not None:
        raise Unprocessable("Only staff are bound to a store here", code="store_not_allowed")
    if last_admin and data.role != Role.admin:
        raise _last_admin()
    if data.store_id is not None and not await session.scalar(
        text("SELECT EXISTS (SELECT 1 FROM stores WHERE id = :id)"), {"id": data.store_id}
    ):
        raise NotFound("No such store", code="store_not_found")
    user.role = data.role
    user.store_id = data.store_id
    note_auth_change(session, user.id)
    await session.flush()
    return user


async def set_status(session: AsyncSession, user_id: uuid.UUID, data: AccountStatusIn) -> User:
    """Disable or enable an account (admins only, checked by the caller); the last active
    admin cannot be disabled (409 `last_admin`), under the same lock as `set_role`."""
    user, last_admin = await _lock_for_admin_change(session, user_id)
    if last_admin and not data.active:
        raise _last_admin()
    user.is_active = data.active
    note_auth_change(session, user.id)
    await session.flush()
    return user


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:  # deleted since its token was checked
        raise session_ended()
    return user


async def update_profile(session: AsyncSession, user: User, patch: UserUpdate) -> User:
    changes = patch_changes(patch, required=("language", "time_zone"))
    if "email" in changes and changes["email"] != user.email:
        user.email_undeliverable_at = None  # a new address gets a new chance
    for field, value in changes.items():
        setattr(user, field, value)
    await session.flush()
    await session.refresh(user)
    return user


# ---------------------------------------------------------------- addresses


async def _lock_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Serialise a user's address writes so the default-address rule holds under races."""
    await session.execute(select(User.id).where(User.id == user_id).with_for_update())


async def list_addresses(session: AsyncSession, user_id: uuid.UUID) -> list[Address]:
    rows = await session.scalars(
        select(Address)
        .where(Address.user_id == user_id)
        .order_by(Address.is_default.desc(), Address.created_at, Address.id)
    )
    return list(rows)


async def _owned_address(session: AsyncSession, user_id: uuid.UUID, address_id: uuid.UUID) -> Address:
    address = await session.get(Address, address_id)
    # Someone else's address is indistinguishable from a missing one.
    if address is None or address.user_id != user_id:
        raise NotFound("No such address", code="address_not_found")
    return address


async def _clear_default(session: AsyncSession, user_id: uuid.UUID) -> None:
    await session.execute(
        update(Address).where(Address.user_id == user_id, Address.is_default).values(is_default=False)
    )


async def create_address(session: AsyncSession, user_id: uuid.UUID, data: AddressIn) -> Address:
    await _lock_user(session, user_id)
    count = await session.scalar(select(func.count()).select_from(Address).where(Address.user_id == user_id))
    if (count or 0) >= MAX_ADDRESSES_PER_USER:
        raise Conflict(f"At most {MAX_ADDRESSES_PER_USER} addresses per account", code="address_limit")
    make_default = data.is_default or count == 0
    if make_default:
        await _clear_default(session, user_id)
        await session.flush()
    address = Address(user_id=user_id, **data.model_dump(exclude={"is_default"}), is_default=make_default)
    session.add(address)
    await session.flush()
    await session.refresh(address)
    return address


async def update_address(
    session: AsyncSession, user_id: uuid.UUID, address_id: uuid.UUID, patch: AddressPatch
) -> Address:
    await _lock_user(session, user_id)
    address = await _owned_address(session, user_id, address_id)
    changes = patch_changes(patch, required=("label", "line1", "city", "pincode", "lat", "lng", "is_default"))
    if changes.pop("is_default", None) is False and address.is_default:
        raise Conflict("Make another address the default instead", code="default_address_required")
    elif patch.is_default and not address.is_default:
        await _clear_default(session, user_id)
        await session.flush()
        address.is_default = True
    for field, value in changes.items():
        setattr(address, field, value)
    await session.flush()
    await session.refresh(address)
    return address


async def delete_address(session: AsyncSession, user_id: uuid.UUID, address_id: uuid.UUID) -> None:
    await _lock_user(session, user_id)
    address = await _owned_address(session, user_id, address_id)
    await session.delete(address)
    await session.flush()
    if address.is_default:  # promote the most recently added remaining address
        successor = await session.scalar(
            select(Address)
            .where(Address.user_id == user_id)
            .order_by(Address.created_at.desc(), Address.id)
            .limit(1)
        )
        if successor is not None:
            successor.is_default = True
            await session.flush()
