"""Notification flows that span transactions or call a provider: turning an outbox event
into recorded sends (`Notifier.consume`) and handing due sends to push, SMS and email
(`Notifier.dispatch`), with retries, token clean-up and the SMS fallback of critical pushes.

Once per (event, user, channel): the send row is committed before its hand-off. A duplicated
event finds the row and sends nothing. A replica that dies after handing a message over but
before recording the outcome leaves the row leased; when the lease ends it is claimed again,
so such a crash can send that message once more (never more per crash).
"""

from __future__ import annotations

import asyncio
import html
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config.settings import Settings
from models import notifications as n
from models.channels import Outcome, SmsProvider
from models.delivery import Delivery, Partner
from models.delivery_rules import LatLng, Vehicle, eta_s
from models.email import SmtpEmail
from models.notification_rules import (
    EVENTS,
    FALLBACK,
    PROMOTION,
    Category,
    Channel,
    Content,
    Rule,
    order_ref,
    render,
    rupees,
)
from models.orders import Order, OrderLine
from models.outbox import Event, backoff_seconds
from models.products import Store
from models.push import FcmPush
from models.users import Language, User

log = logging.getLogger("vurksha.notifications")

BATCH = 200
CONCURRENCY = 64
PRIORITIES = (0, 1)  # transactional, promotions (`notification_sends.priority`)
# Two promotional loops: one claims and hands over its batch while the other waits for the
# slowest sends of its own (a broadcast's pace is set by that overlap).
LOOPS = (0, 1, 1)


@dataclass
class Providers:
    push: FcmPush
    sms: SmsProvider
    email: SmtpEmail


# ---------------------------------------------------------------- what an event says


async def _order_context(session: AsyncSession, order_id: uuid.UUID) -> tuple[Order, dict[str, Any]]:
    order = await session.get(Order, order_id)
    if order is None:
        raise LookupError(f"order {order_id} not found")
    items = await session.scalar(
        select(func.coalesce(func.sum(OrderLine.quantity), 0)).where(OrderLine.order_id == order_id)
    )
    return order, {
        "order_ref": order_ref(order.id),
        "total": rupees(order.total_paise),
        "paid": rupees(order.total_paise - order.refunded_paise),
        "method": order.payment_method,
        "items": int(items or 0),
        "reason": order.cancel_reason or "",
        "refund": order.payment_method == "online",
    }


async def _delivery_context(
    session: AsyncSession, delivery_id: uuid.UUID, order: Order, settings: Settings
) -> dict[str, Any]:
    row = (
        await session.execute(
            select(Delivery.pin, Partner.vehicle, User.name, Store.lat, Store.lng)
            .join(Partner, Partner.user_id == Delivery.partner_id)
            .join(User, User.id == Delivery.partner_id)
            .join(Store, Store.id == Delivery.store_id)
            .where(Delivery.id == delivery_id)
        )
    ).one()
    drop = LatLng(float(order.delivery_address["lat"]), float(order.delivery_address["lng"]))
    eta = eta_s(LatLng(row.lat, row.lng), drop, Vehicle(row.vehicle), settings)
    return {
        "pin": row.pin,
        "partner": row.name or "Your delivery partner",
        "eta_minutes": max(1, -(-eta // 60)),
    }


async def plan_event(
    session: AsyncSession, event: Event, settings: Settings, now: datetime
) -> list[n.Planned]:
    """Who hears of an event, in their language, and what each is told."""
    rules = EVENTS.get(event.topic)
    if rules is None:
        raise ValueError(f"notifications does not subscribe to {event.topic}")
    p = event.payload
    context: dict[str, Any] = {"reason": p.get("reason") or ""}
    customer = store_id = None
    if "order_id" in p:
        order, order_ctx = await _order_context(session, uuid.UUID(str(p["order_id"])))
        context |= order_ctx | ({"reason": p["reason"]} if p.get("reason") else {})
        customer, store_id = order.user_id, order.store_id
        if "delivery_id" in p:
            context |= await _delivery_context(session, uuid.UUID(str(p["delivery_id"])), order, settings)
    if event.topic == "refund.processed":
        context["amount"] = rupees(int(p["amount_paise"]))
    if event.topic == "delivery.offered":
        expires = datetime.fromisoformat(str(p["expires_at"]))
        context |= {"orders": int(p["orders"]), "seconds": max(0, int((expires - now).total_seconds()))}
    data: dict[str, str] = {
        "event": event.topic,
        **{k: str(p[k]) for k in ("order_id", "offer_id", "delivery_id") if k in p},
    }
    by_rule: list[tuple[Rule, list[uuid.UUID]]] = []
    for rule in rules:
        if rule.recipient == "customer":
            ids = [customer] if customer else []
        elif rule.recipient == "store_staff":
            ids = await n.store_staff(session, store_id) if store_id else []
        else:
            ids = [uuid.UUID(str(p["partner_id"]))]
        by_rule.append((rule, [i for i in ids if i is not None]))
    everyone = {i for _, ids in by_rule for i in ids}
    found = {r.id: r for r in await n.recipients(session, list(everyone), quiet_default(settings))}
    return [
        n.Planned(
            rule=rule, recipient=found[i], content=render(rule.kind, found[i].language, context), data=data
        )
        for rule, ids in by_rule
        for i in ids
        if i in found
    ]


BROADCAST_PAGE = 1000


_LINK = "UNSUBSCRIBE-LINK"  # where each recipient's own link goes into the shared page


class _Promotion:
    """A broadcast's message, rendered once per language (not once per recipient: the page
    differs only by each one's unsubscribe link, put in by replacement)."""

    def __init__(self, context: dict[str, Any], base_url: str, secret: bytes) -> None:
        self._context, self._base, self._secret = context, base_url, secret
        self._rendered: dict[Language, Content] = {}

    def planned(self, r: n.Recipient) -> n.Planned:
        shared = self._rendered.get(r.language)
        if shared is None:
            shared = self._rendered[r.language] = render(PROMOTION.kind, r.language, self._context, _LINK)
        link = f"{self._base}/notifications/unsubscribe?token={n.unsubscribe_token(r.id, self._secret)}"
        content = replace(shared, html=shared.html.replace(_LINK, html.escape(link)))
        headers = {"List-Unsubscribe": f"<{link}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
        return n.Planned(
            rule=PROMOTION, recipient=r, content=content, data={"event": n.BROADCAST_TOPIC}, headers=headers
        )


def quiet_default(settings: Settings) -> tuple[Any, Any]:
    return settings.notification_quiet_start, settings.notification_quiet_end


# ---------------------------------------------------------------- the notifier


@dataclass
class Handed:
    """What handing one send over came to, and its side effects to record."""

    settled: n.Settled
    dead_tokens: list[str] = field(default_factory=list)
    undeliverable: str | None = None
    fallback: Channel | None = None


class Notifier:
    """One per notifications replica: records events' sends and hands due ones over. Several
    replicas share the work through the database (claims skip what another has leased)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        redis: Redis,
        providers: Providers,
        settings: Settings,
        clock: Callable[[], datetime],
        on_inbox: Callable[[uuid.UUID, n.InboxItemOut], Awaitable[None]] | None = None,
        on_settled: Callable[[Channel, str], None] = lambda channel, status: None,
    ) -> None:
        self._sessions = sessions
        self._redis = redis
        self.providers = providers
        self._settings = settings
        self._clock = clock
        self._on_inbox = on_inbox
        self._on_settled = on_settled  # each send handed over: its channel and status (metrics)
        self._wake = {priority: asyncio.Event() for priority in PRIORITIES}
        # Sends in flight, per priority: promotions never take a transactional send's slot.
        self._gates = {priority: asyncio.Semaphore(CONCURRENCY) for priority in PRIORITIES}

    async def consume(self, event: Event) -> str:
        """Record an outbox event's messages (a second delivery of it records nothing), then
        hand over what is due now."""
        if event.topic == n.BROADCAST_TOPIC:
            return await self._broadcast(uuid.UUID(str(event.payload["broadcast_id"])))
        now = self._clock()
        async with self._sessions() as session:
            planned = await plan_event(session, event, self._settings, now)
            result = await n.record(session, f"outbox:{event.id}", planned, now)
            await session.commit()
        await self._after_record(result)
        return f"{len(result.sends)} sends, {len(result.inbox)} inbox items"

    async def _broadcast(self, broadcast_id: uuid.UUID) -> str:
        """Record a broadcast for its audience, a page (one transaction) at a time: a relay
        retry after a failure records only the pages that were not yet recorded."""
        key, after, total, sends = f"broadcast:{broadcast_id}", None, 0, 0
        async with self._sessions() as session:
            broadcast = await n.get_broadcast(session, broadcast_id)
        secret = self._settings.cursor_secret.get_secret_value().encode()
        promotion = _Promotion(
            {"title": broadcast.title, "body": broadcast.body}, self._settings.public_url, secret
        )
        while True:
            now = self._clock()
            async with self._sessions() as session:
                page = await n.audience(session, broadcast, after, BROADCAST_PAGE)
                if not page:
                    await session.execute(
                        update(n.Broadcast).where(n.Broadcast.id == broadcast_id).values(recipients=total)
                    )
                    await session.commit()
                    break
                people = await n.recipients(session, page, quiet_default(self._settings))
                planned = [promotion.planned(r) for r in people]
                result = await n.record(session, key, planned, now)
                await session.commit()
            await self._after_record(result)
            total, sends, after = total + len(page), sends + len(result.sends), page[-1]
        return f"broadcast to {total} users: {sends} sends"

    async def _after_record(self, result: n.PlanResult) -> None:
        if self._on_inbox is not None:
            for user_id, item in result.inbox:
                await self._on_inbox(user_id, item)
        if result.sends:
            self._wake_all()

    def _wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    async def run(self) -> None:
        """Hand over due sends until cancelled, transactional and promotional ones in loops of
        their own: a broadcast's batches never stand between an order update and its push."""
        await asyncio.gather(*(self._loop(priority) for priority in LOOPS))

    async def _loop(self, priority: int) -> None:
        wake = self._wake[priority]
        while True:
            try:
                if await self.dispatch(priority):
                    continue
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=self._settings.notification_poll_seconds)
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notification dispatch failed; retrying")
                await asyncio.sleep(1)

    async def dispatch(self, priority: int) -> int:
        """Claim a batch of due sends of a priority, hand them over, record the outcomes."""
        async with self._sessions() as session:
            due = await n.claim(
                session,
                priority=priority,
                now=self._clock(),
                limit=BATCH,
                lease_seconds=self._settings.notification_lease_seconds,
            )
            await session.commit()
        if not due:
            return 0
        async with self._sessions() as session:
            where = await n.addresses(session, list({d.user_id for d in due}))
        capped = await self._over_cap(due)
        handed = await asyncio.gather(*(self._hand_over(d, where.get(d.user_id), capped) for d in due))
        now = self._clock()
        async with self._sessions() as session:
            await n.settle(session, [h.settled for h in handed], now)
            await n.drop_tokens(session, [t for h in handed for t in h.dead_tokens])
            for d, h in zip(due, handed, strict=True):
                if h.undeliverable:
                    await n.mark_email_undeliverable(session, d.user_id, h.undeliverable, now)
            fallbacks = await n.queue_sends(session, list(_fallbacks(due, handed, now)), now)
            await session.commit()
        for d, h in zip(due, handed, strict=True):
            self._on_settled(d.channel, h.settled.status)
        if fallbacks:
            self._wake_all()
        return len(due)

    async def _hand_over(self, d: n.Due, to: n.Address | None, capped: set[int]) -> Handed:
        async with self._gates[1 if d.category is Category.promotions else 0]:
            if to is None:
                return Handed(n.Settled(d.id, d.attempts, "failed", "no_recipient"))
            if d.id in capped:
                return Handed(n.Settled(d.id, d.attempts, "skipped", "rate_capped"))
            c = d.content
            if d.channel is Channel.push:
                return await self._push(d, to.tokens)
            if d.channel is Channel.sms:
                return Handed(
                    self._settled(d, await self.providers.sms.deliver(to.phone, f"{c['title']}: {c['body']}"))
                )
            if to.email is None:
                return Handed(n.Settled(d.id, d.attempts, "failed", "no_address"))
            outcome = await self.providers.email.send(
                to.email, subject=c["title"], text=c["body"], html=c["html"], headers=c.get("headers") or None
            )
            return Handed(self._settled(d, outcome), undeliverable=to.email if outcome.drop_address else None)

    async def _push(self, d: n.Due, tokens: list[str]) -> Handed:
        """To every device of the user: sent when any took it. A critical message no device
        took for good goes by SMS instead."""
        c = d.content
        outcomes = [
            (token, await self.providers.push.send(token, title=c["title"], body=c["body"], data=c["data"]))
            for token in tokens
        ]
        dead = [token for token, o in outcomes if o.drop_address]
        sent = [o for _, o in outcomes if o.status == "sent"]
        retry = [o for _, o in outcomes if o.status == "retry"]
        if sent:
            return Handed(n.Settled(d.id, d.attempts, "sent", provider_id=sent[0].provider_id), dead)
        if retry:
            return Handed(self._settled(d, retry[0]), dead)
        code = outcomes[-1][1].code if outcomes else "no_device"
        return Handed(
            n.Settled(d.id, d.attempts, "failed", code),
            dead,
            fallback=FALLBACK.get(d.channel) if d.critical else None,
        )

    def _settled(self, d: n.Due, o: Outcome) -> n.Settled:
        if o.status != "retry":
            return n.Settled(d.id, d.attempts, o.status, o.code, o.provider_id)
        s = self._settings
        if d.attempts >= s.notification_max_attempts:
            return n.Settled(d.id, d.attempts, "failed", f"gave_up:{o.code}"[:64])
        wait = max(
            backoff_seconds(
                d.attempts, s.notification_backoff_base_seconds, s.notification_backoff_max_seconds
            ),
            o.retry_after_s or 0.0,
        )
        return n.Settled(d.id, d.attempts, "retry", o.code, retry_at=self._clock() + timedelta(seconds=wait))

    async def _over_cap(self, due: list[n.Due]) -> set[int]:
        """The promotional sends of a batch that would pass their user's daily cap on their
        channel (counted in Redis, one round trip for the batch)."""
        promotions = [d for d in due if d.category is Category.promotions]
        if not promotions:
            return set()
        day = self._clock().strftime("%Y%m%d")
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in promotions:
                key = f"notify:cap:{d.user_id}:{d.channel.value}:{day}"
                pipe.incr(key)
                pipe.expire(key, 2 * 24 * 3600)
            counts = (await pipe.execute())[::2]
        cap = self._settings.notification_promotions_per_day
        return {d.id for d, count in zip(promotions, counts, strict=True) if int(count) > cap}


def _fallbacks(due: Iterable[n.Due], handed: Iterable[Handed], now: datetime) -> Iterable[dict[str, Any]]:
    for d, h in zip(due, handed, strict=True):
        if h.fallback is not None:
            yield n.send_row(
                d.event_key, d.user_id, h.fallback, d.kind, d.category, d.critical, now, d.content, now
            )
