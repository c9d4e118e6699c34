"""The payment gateway adapter: Razorpay's REST API (https://razorpay.com/docs/api/) over httpx.

HTTP basic auth with the key id and secret, JSON bodies, amounts in paise. The same client
talks to the real Razorpay in production and to the sandbox gateway application elsewhere,
which speaks the same protocol. Webhooks are signed the way Razorpay signs them: a hex
HMAC-SHA256 of the raw body with the webhook secret, in `X-Razorpay-Signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from config.settings import Settings
from models.errors import AppError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5.0

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------- errors


class GatewayUnavailable(AppError):
    """The gateway could not be reached, timed out or failed (5xx): the outcome is unknown and
    the call may be retried (refunds with the same idempotency key)."""

    status_code = 503
    code = "gateway_unavailable"
    retryable = True


class GatewayRejected(AppError):
    """The gateway refused the request (4xx): retrying the same request will not help. The
    gateway's own error code and description are in `extra`."""

    status_code = 502
    code = "gateway_rejected"
    retryable = False


# ---------------------------------------------------------------- entities


def _notes(value: Any) -> Any:
    # Razorpay serialises empty notes as a JSON array (`"notes": []`), non-empty ones as an object.
    if isinstance(value, list) and not value:
        return {}
    return value


Notes = Annotated[dict[str, Any], BeforeValidator(_notes)]


class _Entity(BaseModel):
    # The gateway adds fields over time (fee, tax, acquirer_data, ...): keep what it sends.
    model_config = ConfigDict(extra="allow")


class GatewayOrder(_Entity):
    id: str
    entity: Literal["order"] = "order"
    amount: int
    amount_paid: int = 0
    amount_due: int = 0
    currency: str
    receipt: str | None = None
    status: Literal["created", "attempted", "paid"]
    attempts: int = 0
    notes: Notes = {}
    created_at: int


class GatewayPayment(_Entity):
    id: str
    entity: Literal["payment"] = "payment"
    amount: int
    currency: str
    status: Literal["created", "authorized", "captured", "refunded", "failed"]
    order_id: str | None = None
    method: str | None = None
    captured: bool = False
    amount_refunded: int = 0
    refund_status: Literal["partial", "full"] | None = None
    description: str | None = None
    error_code: str | None = None
    error_description: str | None = None
    error_source: str | None = None
    error_step: str | None = None
    error_reason: str | None = None
    notes: Notes = {}
    created_at: int


class GatewayRefund(_Entity):
    id: str
    entity: Literal["refund"] = "refund"
    amount: int
    currency: str
    payment_id: str
    notes: Notes = {}
    receipt: str | None = None
    status: Literal["pending", "processed", "failed"]
    speed_processed: str | None = None
    created_at: int


class PaymentEnvelope(_Entity):
    entity: GatewayPayment


class RefundEnvelope(_Entity):
    entity: GatewayRefund


class OrderEnvelope(_Entity):
    entity: GatewayOrder


class WebhookPayload(_Entity):
    payment: PaymentEnvelope | None = None
    refund: RefundEnvelope | None = None
    order: OrderEnvelope | None = None


class WebhookEvent(_Entity):
    """A webhook body: `{"entity": "event", "event": "payment.captured", "payload": {...}}`."""

    entity: Literal["event"] = "event"
    account_id: str
    event: str
    contains: list[str] = []
    payload: WebhookPayload
    created_at: int


# ---------------------------------------------------------------- webhook signatures


def sign_webhook(secret: str, body: bytes) -> str:
    """The `X-Razorpay-Signature` of a webhook body: hex HMAC-SHA256 of the exact raw bytes."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_webhook(secret: str, body: bytes, signature: str) -> bool:
    """True when `signature` is the body's signature under `secret` (constant-time compare).
    Verify over the raw bytes received, never a re-serialisation of the parsed JSON."""
    if not secret or not signature:
        return False
    expected = sign_webhook(secret, body)
    # compare_digest needs ASCII for str; a non-ASCII "signature" is garbage anyway.
    return hmac.compare_digest(expected.encode(), signature.strip().encode("utf-8", "replace"))


# ---------------------------------------------------------------- the client


def _segment(value: str) -> str:
    # Ids come from webhooks and our DB; quoting keeps a crafted id from changing the path.
    return quote(value, safe="")


class RazorpayClient:
    """Async client for the subset of Razorpay's API the payments service uses."""

    def __init__(
        self,
        base_url: str,
        key_id: str,
        key_secret: str,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(key_id, key_secret)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout))
        self._timeout = timeout

    async def aclose(self) -> None:
        """Close the HTTP client if this adapter created it."""
        if self._owns_client:
            await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One API call. `what` names the operation in logs and errors (never ids' bodies)."""
        try:
            response = await self._client.request(
                method,
                self._base + path,
                json=json,
                headers=headers,
                auth=self._auth,
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            log.warning("gateway %s: unreachable (%s)", what, type(exc).__name__)
            raise GatewayUnavailable(
                "The payment gateway is unreachable; retry shortly", extra={"operation": what}
            ) from None
        if response.status_code >= 500 or 300 <= response.status_code < 400:
            log.warning("gateway %s: HTTP %s", what, response.status_code)
            raise GatewayUnavailable(
                "The payment gateway failed; retry shortly",
                extra={"operation": what, "gateway_status": response.status_code},
            )
        if response.status_code >= 400:
            raise self._rejected(what, response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            log.warning("gateway %s: HTTP %s with a non-JSON body", what, response.status_code)
            raise GatewayUnavailable(
                "The payment gateway answered unexpectedly; retry shortly", extra={"operation": what}
            )
        return body

    @staticmethod
    def _rejected(what: str, response: httpx.Response) -> GatewayRejected:
        error: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                error = body["error"]
        except ValueError:
            pass
        code = str(error.get("code") or "UNKNOWN")
        description = str(error.get("description") or f"HTTP {response.status_code}")
        # The code and description are Razorpay's fixed texts, safe to log; the body is not logged.
        log.warning("gateway %s: HTTP %s %s: %s", what, response.status_code, code, description)
        return GatewayRejected(
            f"The payment gateway refused the request: {description}",
            extra={
                "operation": what,
                "gateway_status": response.status_code,
                "gateway_code": code,
                "gateway_description": description,
                "gateway_reason": error.get("reason"),
                "gateway_field": error.get("field"),
            },
        )

    @staticmethod
    def _parse(model: type[M], body: dict[str, Any], what: str) -> M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            log.warning("gateway %s: unexpected response shape (%d errors)", what, exc.error_count())
            raise GatewayUnavailable(
                "The payment gateway answered unexpectedly; retry shortly", extra={"operation": what}
            ) from None

    async def create_order(
        self, amount: int, currency: str, receipt: str, notes: dict[str, str]
    ) -> GatewayOrder:
        """Create an order (POST /v1/orders); the customer's payment attaches to it."""
        body = await self._call(
            "POST",
            "/v1/orders",
            what="create_order",
            json={"amount": amount, "currency": currency, "receipt": receipt, "notes": notes},
        )
        return self._parse(GatewayOrder, body, "create_order")

    async def fetch_order(self, order_id: str) -> GatewayOrder:
        """GET /v1/orders/{id}."""
        body = await self._call("GET", f"/v1/orders/{_segment(order_id)}", what="fetch_order")
        return self._parse(GatewayOrder, body, "fetch_order")

    async def order_payments(self, order_id: str) -> list[GatewayPayment]:
        """Every payment attempted on an order (GET /v1/orders/{id}/payments)."""
        body = await self._call("GET", f"/v1/orders/{_segment(order_id)}/payments", what="order_payments")
        items = body.get("items")
        if not isinstance(items, list):
            raise GatewayUnavailable(
                "The payment gateway answered unexpectedly; retry shortly",
                extra={"operation": "order_payments"},
            )
        return [self._parse(GatewayPayment, item, "order_payments") for item in items]

    async def fetch_payment(self, payment_id: str) -> GatewayPayment:
        """GET /v1/payments/{id}."""
        body = await self._call("GET", f"/v1/payments/{_segment(payment_id)}", what="fetch_payment")
        return self._parse(GatewayPayment, body, "fetch_payment")

    async def capture(self, payment_id: str, amount: int, currency: str) -> GatewayPayment:
        """Capture an authorized payment for its full amount (POST /v1/payments/{id}/capture)."""
        body = await self._call(
            "POST",
            f"/v1/payments/{_segment(payment_id)}/capture",
            what="capture",
            json={"amount": amount, "currency": currency},
        )
        return self._parse(GatewayPayment, body, "capture")

    async def refund(
        self,
        payment_id: str,
        amount: int,
        *,
        idempotency_key: str,
        notes: dict[str, str] | None = None,
        receipt: str | None = None,
    ) -> GatewayRefund:
        """Refund (part of) a captured payment (POST /v1/payments/{id}/refund). The same
        `idempotency_key` for the same payment yields the same refund, never a second one, so
        a call whose outcome is unknown (timeout, 5xx) is retried with the same key."""
        payload: dict[str, Any] = {"amount": amount}
        if notes is not None:
            payload["notes"] = notes
        if receipt is not None:
            payload["receipt"] = receipt
        body = await self._call(
            "POST",
            f"/v1/payments/{_segment(payment_id)}/refund",
            what="refund",
            json=payload,
            headers={"X-Refund-Idempotency": idempotency_key},
        )
        return self._parse(GatewayRefund, body, "refund")

    async def fetch_refund(self, refund_id: str) -> GatewayRefund:
        """GET /v1/refunds/{id}."""
        body = await self._call("GET", f"/v1/refunds/{_segment(refund_id)}", what="fetch_refund")
        return self._parse(GatewayRefund, body, "fetch_refund")


def make_gateway(settings: Settings) -> RazorpayClient:
    """The adapter configured from settings: the real gateway in production, else the sandbox."""
    return RazorpayClient(
        base_url=settings.gateway_base_url,
        key_id=settings.razorpay_key_id,
        key_secret=settings.razorpay_key_secret.get_secret_value(),
    )
