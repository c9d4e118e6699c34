"""The sandbox payment gateway: a stand-in for Razorpay that development and tests run against.

It speaks the subset of Razorpay's API that `models.gateway.RazorpayClient` uses, with
Razorpay's rules and wire format (entities, error bodies, signed webhooks), so the payments
service cannot tell it from the real gateway. Its rules live here, not in the deployment, and
its state in Redis under `sbx:` keys that expire after a few days. Operations that read and
then write (paying an order, capturing, refunding) run in WATCH/MULTI transactions, so
concurrent replicas can neither pay an order twice nor refund past the captured amount, and an
idempotency key can never produce a second refund.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from models.errors import AppError
from models.gateway import sign_webhook

log = logging.getLogger(__name__)

TTL_SECONDS = 3 * 24 * 3600
ACCOUNT_ID = "acc_sandbox"
MIN_ORDER_AMOUNT = 100  # paise: Razorpay's minimum order is INR 1.00
CURRENCIES = frozenset({"INR"})
MAX_RECEIPT = 40
MAX_NOTES = 15
MAX_NOTE_LENGTH = 256
MAX_IDEMPOTENCY_KEY = 128
# Webhook retries: waits between the attempts (so six attempts in all).
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
WEBHOOK_TIMEOUT_SECONDS = 5.0

_ALPHABET = string.ascii_letters + string.digits
_ID = re.compile(r"^(order|pay|rfnd)_[A-Za-z0-9]{14}$")

Entity = dict[str, Any]
T = TypeVar("T")


def new_id(prefix: str) -> str:
    """A Razorpay-style id: the entity prefix and 14 base62 characters."""
    return f"{prefix}_" + "".join(secrets.choice(_ALPHABET) for _ in range(14))


# ---------------------------------------------------------------- Razorpay's errors


class RazorpayError(AppError):
    """An error the sandbox answers in Razorpay's format (`{"error": {...}}`), not ours."""

    code = "razorpay_error"

    def __init__(
        self,
        description: str,
        *,
        status_code: int = 400,
        error_code: str = "BAD_REQUEST_ERROR",
        field: str | None = None,
        source: str = "business",
        step: str = "payment_initiation",
        reason: str = "input_validation_failed",
    ) -> None:
        super().__init__(
            description,
            status_code=status_code,
            extra={
                "code": error_code,
                "description": description,
                "source": source,
                "step": step,
                "reason": reason,
                "metadata": {},
                "field": field,
            },
        )

    def body(self) -> dict[str, Any]:
        """The response body, exactly as Razorpay shapes it."""
        return {"error": dict(self.extra)}


def not_found() -> RazorpayError:
    # Razorpay answers an unknown id with a 400, not a 404.
    return RazorpayError("The id provided does not exist", field="id")


def auth_failed() -> RazorpayError:
    return RazorpayError("Authentication failed", status_code=401, source="NA", step="NA", reason="NA")


def check_auth(authorization: str | None, key_id: str, key_secret: str) -> None:
    """HTTP basic auth with the API key id and secret, as Razorpay checks it."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise auth_failed()
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise auth_failed() from None
    # Both compared in full (no short-circuit) and in constant time.
    ok_user = hmac.compare_digest(user.encode(), key_id.encode())
    ok_password = hmac.compare_digest(password.encode(), key_secret.encode())
    if not (sep and ok_user and ok_password):
        raise auth_failed()


def validation_error(errors: Sequence[Mapping[str, Any]]) -> RazorpayError:
    """The first of pydantic's validation errors, worded and shaped the way Razorpay reports
    bad input (one field at a time). The input itself is never echoed."""
    if not errors:
        return RazorpayError("The request is invalid")
    error = errors[0]
    names = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    name = names[0] if names else None
    kind = error.get("type", "")
    if kind == "json_invalid" or name is None:
        return RazorpayError("The request body is not valid JSON")
    if kind == "missing":
        message = f"The {name} field is required."
    elif kind == "extra_forbidden":
        message = f"{name} is/are not required and should not be sent"
    elif kind.startswith("int_"):
        message = f"The {name} must be an integer."
    elif kind.startswith("string_"):
        message = f"The {name} must be a string."
    else:
        message = f"The {name} is invalid."
    return RazorpayError(message, field=name)


# ---------------------------------------------------------------- request bodies

NoteValue = str | int | float | bool | None


class _Body(BaseModel):
    # Razorpay refuses fields it does not know rather than ignoring them.
    model_config = ConfigDict(extra="forbid")


def _check_notes(value: dict[str, NoteValue] | list[Any]) -> dict[str, NoteValue]:
    if isinstance(value, list):
        if value:
            raise ValueError("notes must be an object")
        return {}
    if len(value) > MAX_NOTES:
        raise ValueError("too many notes")
    if any(len(k) > MAX_NOTE_LENGTH or len(str(v)) > MAX_NOTE_LENGTH for k, v in value.items()):
        raise ValueError("note too long")
    return value


class SandboxCreateOrder(_Body):
    """POST /v1/orders."""

    amount: StrictInt
    currency: str
    receipt: str | None = None
    notes: dict[str, NoteValue] | list[Any] = Field(default_factory=dict)
    partial_payment: bool = False

    _notes = field_validator("notes")(_check_notes)


class SandboxCapture(_Body):
    """POST /v1/payments/{id}/capture."""

    amount: StrictInt
    currency: str


class SandboxRefund(_Body):
    """POST /v1/payments/{id}/refund; the amount defaults to what is left unrefunded."""

    amount: StrictInt | None = None
    speed: Literal["normal", "optimum"] = "normal"
    notes: dict[str, NoteValue] | list[Any] = Field(default_factory=dict)
    receipt: str | None = None

    _notes = field_validator("notes")(_check_notes)


class SandboxWebhooks(_Body):
    """How the webhooks of one sandbox action are delivered (switches for tests)."""

    deliver: bool = Field(True, description="False drops the webhooks (reconciliation tests)")
    duplicates: int = Field(1, ge=1, le=10, description="Deliver each event this many times")
    reverse: bool = Field(False, description="Deliver the action's events in reverse order")
    shuffle: bool = Field(False, description="Deliver the action's events in random order")
    url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://",
        description="Deliver here instead of the configured webhook URL",
    )


class SandboxPay(_Body):
    """What the customer's checkout does: pay the order, successfully or not."""

    outcome: Literal["success", "failure"] = "success"
    method: Literal["upi", "card", "netbanking", "wallet"] = "upi"
    auto_capture: bool = Field(
        True, description="Capture at once (Razorpay's auto-capture); False leaves it authorized"
    )
    webhooks: SandboxWebhooks = Field(default_factory=SandboxWebhooks)


class RazorpayErrorDetail(BaseModel):
    code: str
    description: str
    source: str
    step: str
    reason: str
    metadata: dict[str, Any]
    field: str | None


class RazorpayErrorBody(BaseModel):
    """Razorpay's error response (documents the sandbox's 400 and 401 answers)."""

    error: RazorpayErrorDetail


class SandboxEvent(BaseModel):
    id: str = Field(description="X-Razorpay-Event-Id, the same on every delivery of the event")
    event: str


class SandboxPayResult(BaseModel):
    payment: dict[str, Any]
    events: list[SandboxEvent] = Field(description="The events the action raised, in the order raised")
    webhooks_delivered: bool


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """One webhook event; its body bytes are fixed once, so every delivery is identical."""

    id: str
    name: str
    body: bytes


def make_event(name: str, entities: Mapping[str, Entity], now: int) -> Event:
    body = {
        "entity": "event",
        "account_id": ACCOUNT_ID,
        "event": name,
        "contains": list(entities),
        "payload": {kind: {"entity": entity} for kind, entity in entities.items()},
        "created_at": now,
    }
    return Event(id=new_id("evt"), name=name, body=json.dumps(body, separators=(",", ":")).encode())


# ---------------------------------------------------------------- state


def _key(entity_id: str) -> str:
    return f"sbx:{entity_id}"


def _idempotency_key(payment_id: str, key: str) -> str:
    # Hashed: the caller's key is arbitrary text of any length.
    return f"sbx:{payment_id}:idem:{hashlib.sha256(key.encode()).hexdigest()}"


def _notes_out(notes: Mapping[str, Any]) -> dict[str, Any] | list[Any]:
    # Razorpay's quirk, kept so adapters are tested against it: empty notes are `[]`.
    return dict(notes) if notes else []


@dataclass
class _Writes:
    values: dict[str, str] = field(default_factory=dict)
    appends: list[tuple[str, str]] = field(default_factory=list)

    def put(self, entity: Entity) -> None:
        self.values[_key(entity["id"])] = json.dumps(entity)


class SandboxGateway:
    """The gateway's state and rules over one Redis connection pool."""

    MAX_TRANSACTION_RETRIES = 50

    def __init__(self, redis: Redis, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock = clock

    def _now(self) -> int:
        return int(self._clock())

    # -- reading

    @staticmethod
    def _check_id(entity_id: str, prefix: str) -> None:
        if not _ID.match(entity_id) or not entity_id.startswith(prefix + "_"):
            raise not_found()

    async def _load(self, reader: Redis | Pipeline, entity_id: str, prefix: str) -> Entity:
        self._check_id(entity_id, prefix)
        raw = await reader.get(_key(entity_id))
        if raw is None:
            raise not_found()
        entity: Entity = json.loads(raw)
        return entity

    async def _load_list(self, list_key: str) -> list[Entity]:
        ids = await self._redis.lrange(list_key, 0, -1)
        if not ids:
            return []
        raws = await self._redis.mget([_key(str(i)) for i in ids])
        return [json.loads(raw) for raw in raws if raw is not None]

    async def order(self, order_id: str) -> Entity:
        return await self._load(self._redis, order_id, "order")

    async def payment(self, payment_id: str) -> Entity:
        return await self._load(self._redis, payment_id, "pay")

    async def refund_entity(self, refund_id: str) -> Entity:
        return await self._load(self._redis, refund_id, "rfnd")

    async def order_payments(self, order_id: str) -> list[Entity]:
        await self.order(order_id)  # an unknown order is an error, not an empty list
        return await self._load_list(f"sbx:{order_id}:payments")

    async def payment_refunds(self, payment_id: str) -> list[Entity]:
        await self.payment(payment_id)
        return await self._load_list(f"sbx:{payment_id}:refunds")

    async def webhook_options(self, payment_id: str) -> SandboxWebhooks:
        """The webhook switches given when the payment was made; later events of the payment
        (capture, refunds) are delivered the same way."""
        raw = await self._redis.get(f"sbx:{payment_id}:hooks")
        return SandboxWebhooks.model_validate_json(raw) if raw else SandboxWebhooks()

    # -- writing

    async def _transact(self, plan: Callable[[Pipeline], Awaitable[tuple[T, _Writes]]]) -> T:
        """Run `plan` (which WATCHes the keys it reads) and apply its writes atomically;
        start again if a watched key changed meanwhile."""
        for _ in range(self.MAX_TRANSACTION_RETRIES):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    result, writes = await plan(pipe)
                    pipe.multi()
                    for key, value in writes.values.items():
                        pipe.set(key, value, ex=TTL_SECONDS)
                    for key, value in writes.appends:
                        pipe.rpush(key, value)
                        pipe.expire(key, TTL_SECONDS)
                    await pipe.execute()
                    return result
                except WatchError:
                    continue
        raise RazorpayError(
            "The request could not be completed; retry", status_code=500, error_code="SERVER_ERROR"
        )

    async def create_order(self, request: SandboxCreateOrder) -> Entity:
        """Create an order in status `created`."""
        if request.amount < MIN_ORDER_AMOUNT:
            raise RazorpayError("The amount must be atleast INR 1.00", field="amount")
        if request.currency not in CURRENCIES:
            raise RazorpayError("Currency is not supported", field="currency")
        if request.receipt is not None and len(request.receipt) > MAX_RECEIPT:
            raise RazorpayError("The receipt may not be greater than 40 characters.", field="receipt")
        order: Entity = {
            "id": new_id("order"),
            "entity": "order",
            "amount": request.amount,
            "amount_paid": 0,
            "amount_due": request.amount,
            "currency": request.currency,
            "receipt": request.receipt,
            "offer_id": None,
            "status": "created",
            "attempts": 0,
            "notes": _notes_out(request.notes if isinstance(request.notes, dict) else {}),
            "partial_payment": request.partial_payment,
            "created_at": self._now(),
        }
        await self._redis.set(_key(order["id"]), json.dumps(order), ex=TTL_SECONDS)
        return order

    async def pay(self, order_id: str, request: SandboxPay) -> tuple[Entity, list[Event]]:
        """A customer's payment attempt on an order. Success authorizes the payment and, with
        auto-capture, captures it and marks the order paid; failure leaves the order attempted.
        An order takes several attempts, but once paid it takes no more."""
        self._check_id(order_id, "order")

        async def plan(pipe: Pipeline) -> tuple[tuple[Entity, list[Event]], _Writes]:
            await pipe.watch(_key(order_id))
            order = await self._load(pipe, order_id, "order")
            if order["status"] == "paid":
                raise RazorpayError("This order has already been paid", field="order_id")
            now = self._now()
            payment = self._new_payment(order, request.method, now)
            order["attempts"] += 1
            order["status"] = "attempted"
            events: list[Event] = []
            if request.outcome == "failure":
                payment.update(
                    status="failed",
                    error_code="BAD_REQUEST_ERROR",
                    error_description="Payment failed",
                    error_source="customer",
                    error_step="payment_authorization",
                    error_reason="payment_failed",
                )
                events.append(make_event("payment.failed", {"payment": dict(payment)}, now))
            else:
                payment["status"] = "authorized"
                events.append(make_event("payment.authorized", {"payment": dict(payment)}, now))
                if request.auto_capture:
                    events += self._capture(payment, order, now)
            writes = _Writes()
            writes.put(order)
            writes.put(payment)
            writes.appends.append((f"sbx:{order_id}:payments", payment["id"]))
            writes.values[f"sbx:{payment['id']}:hooks"] = request.webhooks.model_dump_json()
            return (payment, events), writes

        return await self._transact(plan)

    @staticmethod
    def _new_payment(order: Entity, method: str, now: int) -> Entity:
        return {
            "id": new_id("pay"),
            "entity": "payment",
            "amount": order["amount_due"],
            "currency": order["currency"],
            "status": "created",
            "order_id": order["id"],
            "invoice_id": None,
            "international": False,
            "method": method,
            "amount_refunded": 0,
            "refund_status": None,
            "captured": False,
            "description": None,
            "card_id": None,
            "bank": "HDFC" if method == "netbanking" else None,
            "wallet": "paytm" if method == "wallet" else None,
            "vpa": "success@razorpay" if method == "upi" else None,
            "email": "void@razorpay.com",
            "contact": "+919000090000",
            "notes": [],
            "fee": None,
            "tax": None,
            "error_code": None,
            "error_description": None,
            "error_source": None,
            "error_step": None,
            "error_reason": None,
            "acquirer_data": {},
            "created_at": now,
        }

    @staticmethod
    def _capture(payment: Entity, order: Entity, now: int) -> list[Event]:
        """Capture an authorized payment in place; the order is paid. Returns the events."""
        # Razorpay's fee is 2% plus 18% GST on it, both deducted from the settlement.
        fee = payment["amount"] * 2 // 100
        tax = fee * 18 // 100
        payment.update(status="captured", captured=True, fee=fee + tax, tax=tax)
        order.update(status="paid", amount_paid=order["amount"], amount_due=0)
        return [
            make_event("payment.captured", {"payment": dict(payment)}, now),
            make_event("order.paid", {"payment": dict(payment), "order": dict(order)}, now),
        ]

    async def capture(self, payment_id: str, request: SandboxCapture) -> tuple[Entity, list[Event]]:
        """Capture an authorized payment; the amount must be the authorized amount."""
        self._check_id(payment_id, "pay")

        async def plan(pipe: Pipeline) -> tuple[tuple[Entity, list[Event]], _Writes]:
            await pipe.watch(_key(payment_id))
            payment = await self._load(pipe, payment_id, "pay")
            if payment["captured"]:
                raise RazorpayError("This payment has already been captured")
            if payment["status"] != "authorized":
                raise RazorpayError(
                    "Only payments which have been authorized and not yet captured can be captured"
                )
            if request.amount != payment["amount"]:
                raise RazorpayError("Capture amount must be equal to the amount authorized", field="amount")
            if request.currency != payment["currency"]:
                raise RazorpayError("Currency should be same as that of the payment", field="currency")
            await pipe.watch(_key(payment["order_id"]))
            order = await self._load(pipe, payment["order_id"], "order")
            if order["status"] == "paid":
                # Another payment of the order was captured first: this one must not be.
                raise RazorpayError("This order has already been paid", field="order_id")
            events = self._capture(payment, order, self._now())
            writes = _Writes()
            writes.put(order)
            writes.put(payment)
            return (payment, events), writes

        return await self._transact(plan)

    async def refund(
        self, payment_id: str, request: SandboxRefund, idempotency_key: str | None
    ) -> tuple[Entity, list[Event]]:
        """Refund (part of) a captured payment; processed at once. The same idempotency key on
        the same payment returns the refund it made first (and raises no events)."""
        self._check_id(payment_id, "pay")
        if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise RazorpayError("The idempotency key is too long", field="X-Refund-Idempotency")

        async def plan(pipe: Pipeline) -> tuple[tuple[Entity, list[Event]], _Writes]:
            idem = _idempotency_key(payment_id, idempotency_key) if idempotency_key else None
            await pipe.watch(_key(payment_id), *([idem] if idem else []))
            if idem and (existing := await pipe.get(idem)):
                return (await self._load(pipe, str(existing), "rfnd"), []), _Writes()
            payment = await self._load(pipe, payment_id, "pay")
            if payment["status"] == "refunded":
                raise RazorpayError("The payment has been fully refunded already")
            if payment["status"] != "captured":
                raise RazorpayError("Payment not captured. Only captured payments can be refunded")
            remainder = payment["amount"] - payment["amount_refunded"]
            amount = remainder if request.amount is None else request.amount
            if amount <= 0:
                raise RazorpayError("The refund amount must be greater than zero", field="amount")
            if amount > remainder:
                raise RazorpayError(
                    "The refund amount provided is greater than amount captured", field="amount"
                )
            now = self._now()
            refund: Entity = {
                "id": new_id("rfnd"),
                "entity": "refund",
                "amount": amount,
                "currency": payment["currency"],
                "payment_id": payment_id,
                "notes": _notes_out(request.notes if isinstance(request.notes, dict) else {}),
                "receipt": request.receipt,
                "acquirer_data": {"arn": None},
                "created_at": now,
                "batch_id": None,
                "status": "processed",
                "speed_processed": "instant" if request.speed == "optimum" else "normal",
                "speed_requested": request.speed,
            }
            payment["amount_refunded"] += amount
            full = payment["amount_refunded"] == payment["amount"]
            payment["refund_status"] = "full" if full else "partial"
            if full:
                payment["status"] = "refunded"
            writes = _Writes()
            writes.put(refund)
            writes.put(payment)
            writes.appends.append((f"sbx:{payment_id}:refunds", refund["id"]))
            if idem:
                writes.values[idem] = refund["id"]
            event = make_event("refund.processed", {"refund": dict(refund), "payment": dict(payment)}, now)
            return (refund, [event]), writes

        return await self._transact(plan)


# ---------------------------------------------------------------- webhook delivery


class WebhookSender:
    """Delivers webhooks the way Razorpay does: a signed JSON POST per event, retried with
    backoff on network errors and non-2xx answers. Delivery runs in background tasks so the
    action that raised the events does not wait; the events of one action go out in order
    (or the order the test switches ask for), each delivery of an event with the same bytes
    and the same event id. One HTTP client per process."""

    def __init__(
        self,
        *,
        secret: str,
        default_url: str,
        backoff: Sequence[float] = BACKOFF_SECONDS,
        timeout: float = WEBHOOK_TIMEOUT_SECONDS,
    ) -> None:
        self._secret = secret
        self._default_url = default_url
        self._backoff = tuple(backoff)
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        # Strong references: the event loop keeps only weak ones to tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, events: Sequence[Event], options: SandboxWebhooks) -> bool:
        """Start delivering `events` in the background; False when the options drop them."""
        if not options.deliver or not events:
            return False
        ordered = list(events)
        if options.shuffle:
            random.shuffle(ordered)
        if options.reverse:
            ordered.reverse()
        task = asyncio.create_task(
            self._deliver_all(ordered, options.url or self._default_url, options.duplicates)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def drain(self) -> None:
        """Wait for every delivery in flight (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        # Created on first use, inside the event loop that will use it.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self._timeout))
        return self._client

    async def _deliver_all(self, events: Sequence[Event], url: str, duplicates: int) -> None:
        try:
            for event in events:
                for _ in range(duplicates):
                    await self._deliver(event, url)
        except Exception:  # a background task has no one to raise to
            log.exception("webhook delivery failed unexpectedly")

    async def _deliver(self, event: Event, url: str) -> bool:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Razorpay-Webhook/v1",
            "X-Razorpay-Signature": sign_webhook(self._secret, event.body),
            "X-Razorpay-Event-Id": event.id,
        }
        attempts = len(self._backoff) + 1
        for attempt in range(attempts):
            try:
                response = await self._http().post(url, content=event.body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            if attempt < len(self._backoff):
                log.info("webhook %s %s: %s; retrying", event.name, event.id, reason)
                await asyncio.sleep(self._backoff[attempt])
        log.warning(
            "webhook %s %s undelivered after %d attempts (%s)", event.name, event.id, attempts, reason
        )
        return False
