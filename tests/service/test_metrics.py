"""Metrics through the real stack: one journey that does each kind of thing once (log in, fail
a code, add to a cart, check out and pay, refund, forge a webhook, stream positions, accept an
offer, watch the order, plan routes, rank recommendations), then a scrape of the local cluster's
Prometheus endpoint (Ray's, on loopback) until every metric of the catalogue is there with the
labels the journey must have produced, and every metric a dashboard panel or an alert rule
uses is exported."""

from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict

import httpx
import pytest

from config.metrics import CATALOGUE
from config.settings import get_settings
from tests.conftest import Live, fake_phone
from tests.service.shop import Shop, make_shop
from tests.service.test_delivery import KM_LAT, Client, advance, confirmed_order, ok, partner_at, staff_of
from tests.service.test_recommendations import production, promote, register, serving
from tests.service.test_routes import optimize, store_batch

pytestmark = pytest.mark.usefixtures("live")

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# Ray reports every 10 s by default; a series shows up after its first report.
SCRAPE_TIMEOUT_S = 60


def scrape() -> dict[str, list[dict[str, str]]]:
    """Metric name -> the label sets of its samples, from the local Prometheus endpoint."""
    text = httpx.get(f"http://127.0.0.1:{get_settings().metrics_port}/metrics", timeout=10).text
    series: dict[str, list[dict[str, str]]] = defaultdict(list)
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            series[match.group(1)].append(dict(LABEL.findall(match.group(2) or "")))
    return series


def exported(series: dict[str, list[dict[str, str]]]) -> set[str]:
    """Names as a query uses them: a histogram `x` is there when `x_bucket` is."""
    names = set(series)
    return names | {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")}


def label_values(series: dict[str, list[dict[str, str]]], name: str, label: str) -> set[str]:
    return {s[label] for s in series.get(name, ()) if label in s}


# What the journey must have produced, beyond each name being there.
EXPECTED_LABELS = {
    ("ray_vurksha_checkouts_total", "outcome"): {"placed"},
    ("ray_vurksha_payments_total", "outcome"): {"captured"},
    ("ray_vurksha_refunds_total", "outcome"): {"processed"},
    ("ray_vurksha_webhook_verifications_failed_total", "provider"): {"razorpay"},
    ("ray_vurksha_otp_sends_total", "outcome"): {"sent", "otp_resend_too_soon"},
    ("ray_vurksha_rate_limit_rejections_total", "scope"): {"otp_resend_too_soon", "otp_locked"},
    ("ray_vurksha_cart_operations_total", "operation"): {"add_item"},
    ("ray_vurksha_websocket_connections", "socket"): {"/ws/partner", "/ws/orders/{order_id}"},
    ("ray_vurksha_positions_total", "outcome"): {"kept", "accuracy"},
    ("ray_vurksha_offers_total", "outcome"): {"accepted"},
    ("ray_vurksha_route_solve_seconds_bucket", "outcome"): {"solved"},
    ("ray_vurksha_notifications_total", "channel"): {"push"},
}


def _lock_out(live: Live) -> None:
    """A phone one wrong code away from its lockout, then that wrong code: 429 otp_locked."""
    client = live.client()
    phone = fake_phone()
    challenge = live.request_otp(client, phone)
    limit = get_settings().otp_max_consecutive_failures
    live.sql(
        "INSERT INTO otp_phone_guards (phone, consecutive_failures) VALUES (:p, :n)", p=phone, n=limit - 1
    )
    code = live.outbox_code(client, phone)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    locked = client.post("/users/auth/verify", json={"challenge_id": challenge["challenge_id"], "code": wrong})
    assert locked.status_code == 429 and locked.json()["code"] == "otp_locked", locked.text


def test_every_metric_is_exported_after_one_journey(live: Live) -> None:
    shop: Shop = make_shop(live, "metrics-test")
    store = shop.store_a
    ops = live.login()
    live.sql("UPDATE users SET role = 'admin' WHERE id = :id", id=ops.user_id)

    # Auth: a code sent, a resend too soon (429), a lockout.
    again = ops.client.post("/users/auth/otp", json={"phone": ops.phone})
    assert again.status_code == 429 and again.json()["code"] == "otp_resend_too_soon", again.text
    _lock_out(live)

    # A partner online with a socket, a kept and a dropped position.
    partner = partner_at(live, ops, store)
    blurry = {"lat": store["lat"], "lng": store["lng"], "ts": time.time() + 1, "accuracy_m": 5000.0}
    dropped = ok(partner.request("POST", "/delivery/partners/me/positions", json={"points": [blurry]}))
    assert dropped["dropped"] == {"accuracy": 1}, dropped
    app = Client(live, "/delivery/ws/partner", "/delivery/ws/partner")
    app.send({"type": "auth", "token": partner.tokens["access_token"]})
    app.recv("ready")

    # A customer's paid order (cart, checkout, payment, notifications), watched live.
    user, placed, _ = confirmed_order(live, shop, "online")
    watch = Client(live, f"/delivery/ws/orders/{placed['id']}", "/delivery/ws/orders/{order_id}")
    watch.send({"type": "auth", "token": user.tokens["access_token"]})
    watch.recv("tracking")
    offer = app.recv("offer")
    app.send({"type": "accept", "offer_id": offer["offer"]["id"]})
    app.recv("trip")
    lat = store["lat"] + 0.4 * KM_LAT
    app.send({"type": "position", "lat": lat, "lng": store["lng"], "ts": time.time() + 5, "accuracy_m": 6.0})
    while not watch.recv("tracking")["tracking"].get("position"):
        pass  # the assignment's update may come first
    (job,) = ok(partner.request("GET", "/delivery/partners/me/trip"))
    ok(staff_of(live, store).request("POST", f"/orders/{placed['id']}/transitions", json={"to": "packed"}))
    ok(advance(partner, job["id"], "at_store"))

    # A partial refund (the gateway sandbox processes it), a forged webhook.
    refund = ops.request(
        "POST",
        "/payments/refunds",
        json={"order_id": placed["id"], "amount_paise": 100, "reason": "metrics test"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert refund.status_code == 201, refund.text
    forged = live.client().post(
        "/payments/webhooks/razorpay",
        content=b'{"event": "payment.captured"}',
        headers={"X-Razorpay-Signature": "0" * 64, "X-Razorpay-Event-Id": "evt_forged"},
    )
    assert forged.status_code == 401, forged.text

    # Routes planned, recommendations ranked by a model.
    assert optimize(ops, store_batch(1, 4, 2)).status_code == 200
    before = production(live)
    items = [str(uuid.uuid4()) for _ in range(3)]
    version = register(live, items, [(1.0, 0.0), (0.9, 0.1), (0.0, 1.0)])
    promote(live, version)
    try:
        serving(live, version, items[0], store)
    finally:
        if before is not None:
            promote(live, before)

    wanted = {m.exported + ("_bucket" if m.kind == "histogram" else "") for m in CATALOGUE}
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        series = scrape()
        missing = sorted(wanted - set(series))
        unlabelled = {
            f"{name}{{{label}}}": sorted(values - label_values(series, name, label))
            for (name, label), values in EXPECTED_LABELS.items()
            if values - label_values(series, name, label)
        }
        if not missing and not unlabelled:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}; labels missing: {unlabelled}"
        time.sleep(2)

    from config.slo import referenced_metrics

    unknown = sorted(referenced_metrics() - exported(series))
    assert not unknown, f"dashboard panels or alert rules use metrics nobody exports: {unknown}"


def test_the_metrics_endpoint_listens_on_loopback_only(live: Live) -> None:
    port = get_settings().metrics_port
    import psutil

    listening = [
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
