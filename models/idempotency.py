"""Idempotency keys, with the semantics payment gateways give them (Stripe, Razorpay):

- the same key and the same body within the window replays the first response, byte for
  byte (the caller marks it replayed);
- the same key while the first request is still running is a 409 `idempotency_in_flight`;
- the same key with a different body is a 422 `idempotency_key_reused`.

A request goes through atomic phases (each its own transaction). `claim` takes the key (or
finds a result to replay) and commits at once, so concurrent requests see it. The work then
records a recovery point (`resource_id`: what it created) in the same transaction as the
thing it created, and finally the response. A request that fails with an expected error
releases the key (nothing was done, so the client may retry with it); one that fails after a
recovery point unlocks the key, so a retry resumes from there instead of doing the work twice.
A request that died holding the lock (a crashed replica) is taken over after `LOCK_TIMEOUT`.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Index, LargeBinary, SmallInteger, String, Table, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base
from models.errors import Conflict, Unprocessable

# Longer than any request may run (Serve's request timeout is 30 s).
LOCK_TIMEOUT = timedelta(seconds=60)
# What an Idempotency-Key header may be (the ingress declares and enforces it).
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created", "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime]
    locked_at: Mapped[datetime | None]
    resource_id: Mapped[uuid.UUID | None]
    response_status: Mapped[int | None] = mapped_column(SmallInteger)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)


@dataclass(frozen=True)
class Claim:
    """The key, held by this request, or the stored response to replay."""

    user_id: uuid.UUID
    scope: str
    key: str
    locked_at: datetime
    resource_id: uuid.UUID | None = None
    replay_status: int | None = None
    replay_body: bytes | None = None

    @property
    def is_replay(self) -> bool:
        return self.replay_body is not None


def fingerprint(canonical_body: bytes) -> bytes:
    return hashlib.sha256(canonical_body).digest()


async def claim(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    scope: str,
    key: str,
    body_fingerprint: bytes,
    now: datetime,
    ttl: timedelta,
) -> Claim:
    """Take the key for this request, or say why not. The caller commits straight after."""
    table = IdempotencyKey.__table__
    assert isinstance(table, Table)
    inserted = (
        await session.execute(
            insert(table)
            .values(
                user_id=user_id,
                scope=scope,
                key=key,
                fingerprint=body_fingerprint,
                created_at=now,
                locked_at=now,
            )
            .on_conflict_do_nothing()
            .returning(table.c.key)
        )
    ).first()
    if inserted is not None:
        return Claim(user_id=user_id, scope=scope, key=key, locked_at=now)
    row = (
        await session.scalars(select(IdempotencyKey).where(*_row(user_id, scope, key)).with_for_update())
    ).one()
    if row.created_at <= now - ttl:
        # Outside the window the key is new again.
        await session.execute(
            update(IdempotencyKey)
            .where(*_row(user_id, scope, key))
            .values(
                fingerprint=body_fingerprint,
                created_at=now,
                locked_at=now,
                resource_id=None,
                response_status=None,
                response_body=None,
            )
        )
        return Claim(user_id=user_id, scope=scope, key=key, locked_at=now)
    if row.fingerprint != body_fingerprint:
        raise Unprocessable(
            "This Idempotency-Key was used with a different request body", code="idempotency_key_reused"
        )
    if row.response_body is not None:
        return Claim(
            user_id=user_id,
            scope=scope,
            key=key,
            locked_at=row.locked_at or now,
            resource_id=row.resource_id,
            replay_status=row.response_status,
            replay_body=row.response_body,
        )
    if row.locked_at is not None and row.locked_at > now - LOCK_TIMEOUT:
        raise Conflict(
            "A request with this Idempotency-Key is still being processed; retry shortly",
            code="idempotency_in_flight",
            headers={"Retry-After": "1"},
        )
    await session.execute(update(IdempotencyKey).where(*_row(user_id, scope, key)).values(locked_at=now))
    return Claim(user_id=user_id, scope=scope, key=key, locked_at=now, resource_id=row.resource_id)


def _row(user_id: uuid.UUID, scope: str, key: str) -> list[ColumnElement[bool]]:
    return [IdempotencyKey.user_id == user_id, IdempotencyKey.scope == scope, IdempotencyKey.key == key]


def _mine(c: Claim) -> list[ColumnElement[bool]]:
    # Fenced on locked_at: a request whose lock was taken over must not write.
    return [*_row(c.user_id, c.scope, c.key), IdempotencyKey.locked_at == c.locked_at]


async def record(session: AsyncSession, c: Claim, resource_id: uuid.UUID) -> None:
    """The recovery point, in the same transaction as the resource it names."""
    await session.execute(update(IdempotencyKey).where(*_mine(c)).values(resource_id=resource_id))


async def complete(session: AsyncSession, c: Claim, status: int, body: bytes) -> None:
    await session.execute(
        update(IdempotencyKey)
        .where(*_mine(c))
        .values(response_status=status, response_body=body, locked_at=None)
    )


async def release(session: AsyncSession, c: Claim) -> None:
    """After a failed attempt: forget the key when nothing was created, else unlock it so a
    retry resumes from the recovery point."""
    if c.resource_id is None:
        await session.execute(delete(IdempotencyKey).where(*_mine(c), IdempotencyKey.resource_id.is_(None)))
    await session.execute(update(IdempotencyKey).where(*_mine(c)).values(locked_at=None))


async def purge(session: AsyncSession, older_than: datetime) -> int:
    result = await session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than))
    return int(result.rowcount)  # type: ignore[attr-defined]
