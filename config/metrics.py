"""Business and health metrics: the catalogue, and thin handles that record them through
`ray.util.metrics`, so they ride Ray's Prometheus export (per node, on loopback unless the
cluster says otherwise) beside Serve's own metrics.

Recorded in deployments and actors, never in `models/` (the domain knows nothing of Ray). Ray
prefixes every name with `ray_` and a series exists only after its first observation and the
next report (~10 s), so a dashboard panel stays empty until the thing happens once. The
dashboard, the alert rules and the test that scrapes a running stack all read `CATALOGUE`.

A handle creates its Ray metric on first use in each process: importing this module costs
nothing where Ray is not running (the CLI, the OpenAPI generator).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]

# Seconds: from a cache hit to a slow payment call.
LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds of a dispatch wait (an order ready until a partner accepts) or a route solve.
WAIT_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class Metric:
    name: str  # as recorded; Prometheus shows it as `ray_<name>`
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    boundaries: Sequence[float] = field(default=())
    _ray: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (histograms add _bucket, _sum and _count to it)."""
        return f"ray_{self.name}"

    def _metric(self) -> Any:
        if not self._ray:
            from ray.util import metrics

            if self.kind == "counter":
                self._ray.append(metrics.Counter(self.name, self.description, tag_keys=self.tags))
            elif self.kind == "gauge":
                self._ray.append(metrics.Gauge(self.name, self.description, tag_keys=self.tags))
            else:
                self._ray.append(
                    metrics.Histogram(
                        self.name, self.description, boundaries=list(self.boundaries), tag_keys=self.tags
                    )
                )
        return self._ray[0]

    def inc(self, value: float = 1.0, **tags: str) -> None:
        self._metric().inc(value, tags=tags or None)

    def set(self, value: float, **tags: str) -> None:
        """Ray exports a gauge's value only for ~20 s after it was set: the value is kept and
        set again every GAUGE_REFRESH_S by this process, so a quiet gauge does not vanish."""
        self._metric().set(value, tags=tags or None)
        with _GAUGES_LOCK:
            _GAUGES[(self.name, tuple(sorted(tags.items())))] = (self, value)
            if not _REFRESHER:
                _REFRESHER.append(threading.Thread(target=_refresh_gauges, name="gauges", daemon=True))
                _REFRESHER[0].start()

    def observe(self, value: float, **tags: str) -> None:
        self._metric().observe(value, tags=tags or None)


GAUGE_REFRESH_S = 5.0
_GAUGES: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Metric, float]] = {}
_GAUGES_LOCK = threading.Lock()
_REFRESHER: list[threading.Thread] = []


def _refresh_gauges() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _GAUGES_LOCK:
            current = list(_GAUGES.items())
        for (_, tags), (metric, value) in current:
            metric._metric().set(value, tags=dict(tags) or None)


def _counter(name: str, description: str, *tags: str) -> Metric:
    return Metric(name, "counter", description, tags)


def _gauge(name: str, description: str, *tags: str) -> Metric:
    return Metric(name, "gauge", description, tags)


def _histogram(name: str, description: str, boundaries: Sequence[float], *tags: str) -> Metric:
    return Metric(name, "histogram", description, tags, boundaries)


# outcome: placed, replayed (an idempotency key seen before), rejected (4xx), failed (5xx);
# code: the error's stable code ("" unless rejected or failed).
CHECKOUTS = _counter(
    "vurksha_checkouts_total", "Checkout requests by outcome and error code", "outcome", "code"
)
CHECKOUT_LATENCY = _histogram(
    "vurksha_checkout_latency_seconds", "Time to answer a checkout, by outcome", LATENCY_S, "outcome"
)
PAYMENTS = _counter("vurksha_payments_total", "Payment outcomes (captured, failed)", "outcome")
REFUNDS = _counter("vurksha_refunds_total", "Refunds by outcome (processed, failed)", "outcome")
OUTBOX_LAG = _gauge("vurksha_outbox_lag_seconds", "Age of the oldest outbox event not yet delivered")
# When the relay last read the two above: the gauges keep their last value when it stops.
OUTBOX_CHECKED = _gauge(
    "vurksha_outbox_checked_timestamp_seconds", "When the outbox relay last read lag and dead letters"
)
OUTBOX_DEAD_LETTERS = _gauge("vurksha_outbox_dead_letters", "Outbox events given up on (dead letters)")
WEBHOOK_FAILURES = _counter(
    "vurksha_webhook_verifications_failed_total", "Webhooks refused for a bad signature", "provider"
)
OTP_SENDS = _counter(
    "vurksha_otp_sends_total", "Login codes requested, by outcome (sent, or the error code)", "outcome"
)
OTP_LOCKOUTS = _counter(
    "vurksha_otp_lockouts_total", "Login requests refused because the phone is locked (too many wrong codes)"
)
RATE_LIMITED = _counter("vurksha_rate_limit_rejections_total", "Requests refused with 429, by limit", "scope")
CART_OPERATIONS = _counter(
    "vurksha_cart_operations_total", "Cart shard operations, by operation", "operation"
)
WEBSOCKETS = _gauge("vurksha_websocket_connections", "Open WebSocket connections, by socket", "socket")
POSITIONS = _counter(
    "vurksha_positions_total", "Partner positions ingested, by outcome (kept, or the drop reason)", "outcome"
)
DISPATCH_WAIT = _histogram(
    "vurksha_dispatch_wait_seconds", "An order ready for dispatch until a partner accepted it", WAIT_S
)
OFFERS = _counter(
    "vurksha_offers_total", "Offers to partners, by outcome (accepted, declined, expired)", "outcome"
)
ROUTE_SOLVE = _histogram(
    "vurksha_route_solve_seconds",
    "Route optimizer requests, arrival to answer, by outcome",
    WAIT_S,
    "outcome",
)
# Its value is the version: replicas that disagree (min < max) have not all swapped yet.
RECOMMENDER_VERSION = _gauge(
    "vurksha_recommender_model_version", "The recommender model version a replica serves"
)
RECOMMENDER_LATENCY = _histogram(
    "vurksha_recommender_latency_seconds", "Time to compute recommendations in the Recommender", LATENCY_S
)
NOTIFICATIONS = _counter(
    "vurksha_notifications_total", "Notification sends finished, by channel and outcome", "channel", "outcome"
)
TRACKING_LATENCY = _histogram(
    "vurksha_tracking_latency_seconds",
    "A tracking update, made by the fleet shard until handed to the watching customers' sockets",
    LATENCY_S,
)

CATALOGUE: tuple[Metric, ...] = tuple(m for m in list(globals().values()) if isinstance(m, Metric))


def record_fact(fact: str) -> None:
    """Count a payment or refund fact the domain applied (`payment.captured`, `refund.failed`...)."""
    kind, _, outcome = fact.partition(".")
    if kind == "payment":
        PAYMENTS.inc(outcome=outcome)
    elif kind == "refund":
        REFUNDS.inc(outcome=outcome)
