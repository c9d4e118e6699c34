"""Delivery through the real stack: roles, partners, positions, dispatch rounds on the fleet
shards, offers, the delivery lifecycle driving the order, PINs, cash on delivery, failed
deliveries, recalls, and a shard killed with offers and positions in flight."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
import ray
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from config.settings import get_settings
from deployments.openapi import WEBSOCKETS_FILE
from tests.conftest import Live, Session
from tests.service.shop import Shop, add, add_address, make_product, make_shop
from tests.service.test_orders import checkout, pay, status_becomes, wait_for

pytestmark = pytest.mark.usefixtures("live")

KM_LAT = 1 / 111.0  # degrees of latitude per km


@pytest.fixture
def shop(live: Live) -> Shop:
    """Stores of the test's own, so no other test's partners or queued orders are near."""
    return make_shop(live, "delivery-test")


@pytest.fixture(scope="module")
def ops(live: Live) -> Session:
    session = live.login()
    live.sql("UPDATE users SET role = 'ops' WHERE id = :id", id=session.user_id)
    return session


def staff_of(live: Live, store: dict[str, Any]) -> Session:
    session = live.login()
    live.sql(
        "UPDATE users SET role = 'staff', store_id = :s WHERE id = :id", s=store["id"], id=session.user_id
    )
    return session


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text
    return dict(response.json())


def partner_at(
    live: Live, ops: Session, store: dict[str, Any], *, km_north: float | None = 0.5, vehicle: str = "scooter"
) -> Session:
    """A new partner of `store`, online, with a fresh position `km_north` of it (None: none yet)."""
    phone = "+9197" + uuid.uuid4().int.__str__()[:8]
    ok(
        ops.request(
            "POST", "/delivery/partners", json={"phone": phone, "store_id": store["id"], "vehicle": vehicle}
        ),
        201,
    )
    partner = live.login(phone)
    ok(partner.request("POST", "/delivery/partners/me/shift", json={"online": True}))
    if km_north is not None:
        move_to(partner, store["lat"] + km_north * KM_LAT, store["lng"])
    return partner


# Each test partner's last fix: a move is timestamped at a believable 15 m/s from it (at
# most a minute ahead, within the future tolerance), or the speed filter rightly drops it.
LAST_FIX: dict[str, tuple[float, float, float]] = {}


def move_to(partner: Session, lat: float, lng: float) -> dict[str, Any]:
    ts = time.time()
    if partner.user_id in LAST_FIX:
        last_lat, last_lng, last_ts = LAST_FIX[partner.user_id]
        metres = ((lat - last_lat) ** 2 + (lng - last_lng) ** 2) ** 0.5 * 111_000
        ts = max(ts, last_ts + metres / 15 + 1)
    LAST_FIX[partner.user_id] = (lat, lng, ts)
    point = {"lat": lat, "lng": lng, "ts": ts, "accuracy_m": 8.0, "speed_mps": 4.0}
    ack = ok(partner.request("POST", "/delivery/partners/me/positions", json={"points": [point]}))
    assert ack["accepted"] == 1, ack
    return dict(ack)


def confirmed_order(
    live: Live, shop: Shop, method: str = "cod", quantity: int = 1, *, north_m: float = 0, east_m: float = 0
) -> tuple[Session, dict[str, Any], str]:
    """A customer's order at store A (delivered at the store, or `north_m` / `east_m` metres
    from it), confirmed by the store: the fleet queues it."""
    rice = make_product(live, shop, price=12_000, stock_a=20)
    user = live.login()
    add_address(user, shop.store_a, default=True, north_m=north_m, east_m=east_m)
    assert add(user, rice, quantity).status_code == 200
    placed = ok(checkout(user, user_address(user), method), 201)
    if method == "online":
        pay(live, placed["payment"]["razorpay_order_id"])
        status_becomes(live, user, placed["id"], "placed")
    staff = staff_of(live, shop.store_a)
    ok(staff.request("POST", f"/orders/{placed['id']}/transitions", json={"to": "confirmed"}))
    return user, placed, rice


def user_address(user: Session) -> str:
    return str(ok(user.request("GET", "/users/me/addresses"))[0]["id"])


def offer_for(partner: Session, timeout: float = 20) -> dict[str, Any]:
    return dict(
        wait_for(lambda: ok(partner.request("GET", "/delivery/partners/me/offers")), timeout, "an offer")[0]
    )


def advance(who: Session, delivery_id: str, to: str, **extra: Any) -> httpx.Response:
    return who.request("POST", f"/delivery/deliveries/{delivery_id}/status", json={"to": to, **extra})


def round_now(ops: Session, store: dict[str, Any]) -> int:
    return int(ok(ops.request("POST", f"/delivery/stores/{store['id']}/round")))


def stock(live: Live, store: dict[str, Any], pid: str) -> tuple[int, int]:
    row = live.sql(
        "SELECT on_hand, reserved FROM inventory WHERE store_id = :s AND product_id = :p",
        s=store["id"],
        p=pid,
    )[0]
    return int(row.on_hand), int(row.reserved)


def _pid(shard: Any) -> int | None:
    """The process a fleet shard runs in now; None while it is down or restarting."""
    try:
        return int(ray.get(shard.__ray_call__.remote(lambda _: os.getpid()), timeout=5))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def kill_fleet(ops: Session, store: dict[str, Any]) -> None:
    """Kill every fleet shard (they restart: `max_restarts=-1`) and wait until every shard
    runs again in a new process (the next test may use a store of the other shard) and the
    store's board answers."""
    shards = [
        ray.get_actor(f"fleet-shard-{i}", namespace="vurksha") for i in range(get_settings().fleet_shards)
    ]
    before = [_pid(shard) for shard in shards]
    for shard in shards:
        ray.kill(shard, no_restart=False)
    wait_for(
        lambda: all(_pid(shard) not in (None, pid) for shard, pid in zip(shards, before, strict=True)),
        60,
        "the fleet shards",
    )
    wait_for(
        lambda: ops.request("GET", f"/delivery/stores/{store['id']}/board").status_code == 200,
        60,
        "the fleet",
    )


def test_unknown_stores_and_unissued_phones_are_4xx(ops: Session, shop: Shop):
    unknown = uuid.uuid4()
    problem(ops.request("GET", f"/delivery/stores/{unknown}/board"), 404, "store_not_found")
    problem(ops.request("POST", f"/delivery/stores/{unknown}/round"), 404, "store_not_found")
    problem(ops.request("POST", f"/delivery/stores/{unknown}/routes/plan"), 404, "store_not_found")
    body = {"phone": "0000000000000000000000000000000", "store_id": shop.store_a["id"]}
    problem(ops.request("POST", "/delivery/partners", json=body), 422, "invalid_phone")


def test_admins_grant_and_revoke_roles_but_never_the_last_admin(live: Live, shop: Shop):
    admin = live.login()
    live.sql("UPDATE users SET role = 'admin' WHERE id = :id", id=admin.user_id)
    user = live.login()
    problem(user.request("PUT", f"/users/{user.user_id}/role", json={"role": "admin"}), 403, "forbidden_role")
    problem(
        admin.request("PUT", f"/users/{user.user_id}/role", json={"role": "staff"}), 422, "store_required"
    )
    problem(
        admin.request(
            "PUT", f"/users/{user.user_id}/role", json={"role": "staff", "store_id": str(uuid.uuid4())}
        ),
        404,
        "store_not_found",
    )
    staff = ok(
        admin.request(
            "PUT", f"/users/{user.user_id}/role", json={"role": "staff", "store_id": shop.store_a["id"]}
        )
    )
    assert staff["role"] == "staff"
    # The new role holds on the very next request: the store's queue opens up.
    ok(user.request("GET", f"/orders/stores/{shop.store_a['id']}"))
    ok(admin.request("PUT", f"/users/{user.user_id}/role", json={"role": "customer"}))
    problem(user.request("GET", f"/orders/stores/{shop.store_a['id']}"), 403, "forbidden_role")
    problem(admin.request("PUT", f"/users/{uuid.uuid4()}/role", json={"role": "ops"}), 404, "user_not_found")

    # Two admins demoting each other at once cannot leave none.
    live.sql("UPDATE users SET role = 'customer' WHERE role = 'admin' AND id <> :id", id=admin.user_id)
    other = live.login()
    ok(admin.request("PUT", f"/users/{other.user_id}/role", json={"role": "admin"}))
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(admin.request, "PUT", f"/users/{other.user_id}/role", json={"role": "customer"})
        b = pool.submit(other.request, "PUT", f"/users/{admin.user_id}/role", json={"role": "customer"})
        results = sorted([a.result().status_code, b.result().status_code])
    assert results in ([200, 403], [200, 409]), results
    assert live.sql("SELECT count(*) AS n FROM users WHERE role = 'admin' AND is_active")[0].n == 1
    last = live.sql("SELECT id FROM users WHERE role = 'admin'")[0].id
    last_admin = admin if str(last) == admin.user_id else other
    problem(last_admin.request("PUT", f"/users/{last}/role", json={"role": "ops"}), 409, "last_admin")
    problem(last_admin.request("PUT", f"/users/{last}/status", json={"active": False}), 409, "last_admin")
    live.sql("UPDATE users SET role = 'admin' WHERE phone = '+919000000001'")  # the seeded admin back


# ---------------------------------------------------------------- the whole path


@pytest.mark.parametrize("method", ["cod", "online"])
def test_order_to_doorstep(live: Live, shop: Shop, ops: Session, method: str):
    store = shop.store_a
    partner = partner_at(live, ops, store)
    user, placed, rice = confirmed_order(live, shop, method, quantity=2)
    staff = staff_of(live, store)

    # The confirmed order reaches the fleet through the outbox; the round offers it.
    offer = offer_for(partner)
    assert offer["order_ids"] == [placed["id"]]
    board = ok(staff.request("GET", f"/delivery/stores/{store['id']}/board"))
    assert {(o["id"], o["state"]) for o in board["orders"]} >= {(placed["id"], "offered")}
    problem(user.request("GET", f"/delivery/stores/{store['id']}/board"), 403, "forbidden_role")

    trip = ok(partner.request("POST", f"/delivery/offers/{offer['id']}/accept"))
    assert [(d["order_id"], d["status"], d["seq"]) for d in trip] == [(placed["id"], "assigned", 0)]
    (job,) = trip
    due = placed["totals"]["total_paise"] if method == "cod" else 0
    assert job["amount_due_paise"] == due and job["drop"]["lat"] == store["lat"]
    problem(partner.request("POST", f"/delivery/offers/{offer['id']}/accept"), 409, "offer_closed")
    problem(
        partner.request("POST", "/delivery/partners/me/shift", json={"online": False}), 409, "active_delivery"
    )

    tracking = ok(user.request("GET", f"/delivery/orders/{placed['id']}/tracking"))
    assert tracking["delivery_status"] == "assigned" and tracking["partner"]["vehicle"] == "scooter"
    assert tracking["position"] is not None and tracking["eta_s"] > 0 and tracking["pin"] is None
    stranger = live.login()
    problem(stranger.request("GET", f"/delivery/orders/{placed['id']}/tracking"), 404, "order_not_found")

    ok(advance(partner, job["id"], "at_store"))
    problem(advance(partner, job["id"], "picked_up"), 409, "order_not_packed")
    ok(staff.request("POST", f"/orders/{placed['id']}/transitions", json={"to": "packed"}))
    assert ok(advance(partner, job["id"], "picked_up"))["order_status"] == "out_for_delivery"
    assert stock(live, store, rice) == (18, 0)  # off the shelf

    # Moving towards the customer: the tracking follows, the ETA shrinks.
    far = ok(user.request("GET", f"/delivery/orders/{placed['id']}/tracking"))
    # (100 m: a jump faster than partner_position_max_speed_mps would be filtered out.)
    move_to(partner, store["lat"] + 0.4 * KM_LAT, store["lng"])
    near = wait_for(
        lambda: (
            (t := ok(user.request("GET", f"/delivery/orders/{placed['id']}/tracking")))["eta_s"]
            < far["eta_s"]
            and t
        ),
        what="a shorter ETA",
    )
    assert near["position"]["lat"] == pytest.approx(store["lat"] + 0.4 * KM_LAT)

    ok(advance(partner, job["id"], "arrived"))
    pin = ok(user.request("GET", f"/delivery/orders/{placed['id']}/tracking"))["pin"]
    assert pin is not None and len(pin) == 4
    wrong = f"{(int(pin) + 1) % 10_000:04d}"
    assert (
        problem(advance(partner, job["id"], "delivered", pin=wrong), 422, "wrong_pin")["attempts_left"] == 4
    )
    if method == "cod":
        mismatch = problem(
            advance(partner, job["id"], "delivered", pin=pin, cash_collected_paise=due - 100),
            422,
            "cash_mismatch",
        )
        assert mismatch["amount_due_paise"] == due
        done = ok(advance(partner, job["id"], "delivered", pin=pin, cash_collected_paise=due))
    else:
        done = ok(advance(partner, job["id"], "delivered", pin=pin))
    assert done["status"] == "delivered" and done["order_status"] == "delivered"
    final = ok(user.request("GET", f"/orders/{placed['id']}"))
    assert final["status"] == "delivered"
    assert [e["to_status"] for e in final["events"]][-2:] == ["out_for_delivery", "delivered"]
    assert final["payment"]["status"] == "captured"
    me = ok(partner.request("GET", "/delivery/partners/me"))
    assert me["cash_in_hand_paise"] == due
    assert ok(partner.request("GET", "/delivery/partners/me/trip")) == []
    history = live.sql(
        "SELECT to_status FROM delivery_events WHERE delivery_id = :d ORDER BY id", d=job["id"]
    )
    assert [h.to_status for h in history] == ["assigned", "at_store", "picked_up", "arrived", "delivered"]
    with pytest.raises(Exception, match="append-only"):
        live.sql("DELETE FROM delivery_events WHERE delivery_id = :d", d=job["id"])

    if method == "cod":
        key = {"Idempotency-Key": uuid.uuid4().hex}
        url = f"/delivery/partners/{partner.user_id}/deposits"
        problem(
            ops.request("POST", url, json={"amount_paise": due + 1}, headers=key), 409, "deposit_exceeds_cash"
        )
        assert (
            ok(ops.request("POST", url, json={"amount_paise": due}, headers=key))["cash_in_hand_paise"] == 0
        )
        assert (
            ok(ops.request("POST", url, json={"amount_paise": due}, headers=key))["cash_in_hand_paise"] == 0
        )
        problem(partner.request("POST", url, json={"amount_paise": 1}, headers=key), 403, "forbidden_role")


def test_declined_and_expired_offers_go_to_someone_else_never_back(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    first = partner_at(live, ops, store, km_north=0.2)
    _, placed, _ = confirmed_order(live, shop)
    offer = offer_for(first)
    assert ok(first.request("POST", f"/delivery/offers/{offer['id']}/decline")) == []
    second = partner_at(live, ops, store, km_north=1.5)
    assert offer_for(second)["order_ids"] == [placed["id"]]
    # The nearer first partner never sees it again, round after round.
    for _ in range(3):
        round_now(ops, store)
        assert ok(first.request("GET", "/delivery/partners/me/offers")) == []
    # The second lets it expire: it moves on, and three expiries in a row set a partner offline.
    live.sql(
        "UPDATE delivery_offers SET expires_at = now() WHERE partner_id = :p AND status = 'open'",
        p=second.user_id,
    )
    kill_fleet(ops, store)  # the live view reloads the expiry from the database
    round_now(ops, store)
    assert (
        live.sql("SELECT status FROM delivery_offers WHERE partner_id = :p", p=second.user_id)[0].status
        == "expired"
    )
    assert ok(second.request("GET", "/delivery/partners/me/offers")) == []
    third = partner_at(live, ops, store, km_north=2.5)
    assert offer_for(third)["order_ids"] == [placed["id"]]
    live.sql("UPDATE partners SET expiries_in_a_row = 2 WHERE user_id = :p", p=third.user_id)
    live.sql(
        "UPDATE delivery_offers SET expires_at = now() WHERE partner_id = :p AND status = 'open'",
        p=third.user_id,
    )
    kill_fleet(ops, store)
    round_now(ops, store)
    assert ok(third.request("GET", "/delivery/partners/me"))["online"] is False
    offered = live.sql("SELECT partner_id FROM delivery_offers WHERE :o = ANY(order_ids)", o=placed["id"])
    assert sorted(str(r.partner_id) for r in offered) == sorted(
        [first.user_id, second.user_id, third.user_id]
    )


def test_two_partners_accepting_at_once_get_one_order(live: Live, shop: Shop, ops: Session):
    """Offers are made one per order by the shard; if two ever shared an order (a second
    shard after a split brain, say), the database still hands it to one."""
    store = shop.store_a
    a = partner_at(live, ops, store)
    b = partner_at(live, ops, store)
    live.sql("UPDATE partners SET online = false WHERE user_id IN (:a, :b)", a=a.user_id, b=b.user_id)
    kill_fleet(ops, store)
    _, placed, _ = confirmed_order(live, shop)
    offers = {}
    for p in (a, b):
        oid = str(uuid.uuid4())
        live.sql(
            "INSERT INTO delivery_offers (id, store_id, partner_id, order_ids, status, created_at, expires_at)"
            " VALUES (:id, :s, :p, ARRAY[CAST(:o AS uuid)], 'open', now(), now() + interval '1 minute')",
            id=oid,
            s=store["id"],
            p=p.user_id,
            o=placed["id"],
        )
        offers[p.user_id] = oid
    kill_fleet(ops, store)
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda p: p.request("POST", f"/delivery/offers/{offers[p.user_id]}/accept"), (a, b))
        )
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409], [r.text for r in results]
    assert next(r for r in results if r.status_code == 409).json()["code"] == "order_taken"
    assert live.sql("SELECT count(*) AS n FROM deliveries WHERE order_id = :o", o=placed["id"])[0].n == 1
    # No partner holds two open offers: the database refuses a second.
    with pytest.raises(Exception, match="uq_delivery_offers_open_partner"):
        for _ in range(2):
            live.sql(
                "INSERT INTO delivery_offers (id, store_id, partner_id, order_ids, status, created_at, expires_at)"
                " VALUES (gen_random_uuid(), :s, :p, ARRAY[CAST(:o AS uuid)], 'open', now(), now())",
                s=store["id"],
                p=a.user_id,
                o=placed["id"],
            )


def test_a_failed_delivery_comes_back_to_the_shelf_and_is_refunded(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    partner = partner_at(live, ops, store)
    _, placed, rice = confirmed_order(live, shop, "online", quantity=3)
    staff = staff_of(live, store)
    ok(staff.request("POST", f"/orders/{placed['id']}/transitions", json={"to": "packed"}))
    offer = offer_for(partner)
    (job,) = ok(partner.request("POST", f"/delivery/offers/{offer['id']}/accept"))
    for to in ("at_store", "picked_up", "arrived"):
        ok(advance(partner, job["id"], to))
    assert stock(live, store, rice) == (17, 0)
    problem(advance(partner, job["id"], "failed"), 422, "reason_required")
    failed = ok(advance(partner, job["id"], "failed", reason="customer unreachable"))
    assert failed["order_status"] == "delivery_failed"
    problem(advance(partner, job["id"], "returned"), 403, "forbidden_transition")
    other_store_staff = staff_of(live, shop.store_b)
    problem(advance(other_store_staff, job["id"], "returned"), 404, "delivery_not_found")
    assert ok(advance(staff, job["id"], "returned"))["order_status"] == "returned"
    assert stock(live, store, rice) == (20, 0)  # back on the shelf
    wait_for(
        lambda: (
            live.sql("SELECT status FROM payments WHERE order_id = :o", o=placed["id"])[0].status
            == "refunded"
        ),
        what="the refund",
    )
    # The partner is free again.
    assert (
        ok(partner.request("POST", "/delivery/partners/me/shift", json={"online": False}))["online"] is False
    )


def test_cancelling_recalls_the_partner_and_suspending_recalls_the_offer(
    live: Live, shop: Shop, ops: Session
):
    store = shop.store_a
    partner = partner_at(live, ops, store)
    user, placed, _ = confirmed_order(live, shop)
    offer = offer_for(partner)
    (job,) = ok(partner.request("POST", f"/delivery/offers/{offer['id']}/accept"))
    ok(user.request("POST", f"/orders/{placed['id']}/cancel", json={"reason": "changed my mind"}))
    wait_for(
        lambda: live.sql("SELECT status FROM deliveries WHERE id = :d", d=job["id"])[0].status == "cancelled",
        what="the recall",
    )
    assert ok(partner.request("GET", "/delivery/partners/me/trip")) == []
    problem(advance(partner, job["id"], "picked_up"), 409, "invalid_transition")

    _, second, _ = confirmed_order(live, shop)
    offer = offer_for(partner)
    assert offer["order_ids"] == [second["id"]]
    ok(ops.request("POST", f"/delivery/partners/{partner.user_id}/suspend"))
    assert live.sql("SELECT status FROM delivery_offers WHERE id = :o", o=offer["id"])[0].status == "recalled"
    problem(partner.request("GET", "/delivery/partners/me/offers"), 403, "partner_suspended")
    ok(ops.request("POST", f"/delivery/partners/{partner.user_id}/reinstate"))
    ok(partner.request("POST", "/delivery/partners/me/shift", json={"online": True}))
    move_to(partner, store["lat"], store["lng"] + 0.001)
    assert offer_for(partner)["order_ids"] == [second["id"]]


def test_positions_are_filtered_and_survive_a_shard_restart(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    partner = partner_at(live, ops, store, km_north=None)
    now = time.time()
    lat, lng = store["lat"] + 0.3 * KM_LAT, store["lng"]
    points = [
        {"lat": lat, "lng": lng, "ts": now, "accuracy_m": 5.0},  # kept
        {"lat": 91.0, "lng": lng, "ts": now + 1},  # invalid
        {"lat": 0.0, "lng": 0.0, "ts": now + 2},  # invalid: no fix
        {"lat": lat, "lng": lng, "ts": now + 3600},  # future
        {"lat": lat, "lng": lng, "ts": now + 3, "accuracy_m": 500.0},  # accuracy
        {"lat": lat, "lng": lng, "ts": now + 0.1},  # min_period
        {"lat": lat + 1.0, "lng": lng, "ts": now + 4},  # speed: 111 km in 4 s
        {"lat": lat + 0.0001, "lng": lng, "ts": now + 5, "accuracy_m": 5.0},  # kept: the live position
    ]
    ack = ok(partner.request("POST", "/delivery/partners/me/positions", json={"points": points}))
    assert (ack["accepted"], ack["late"]) == (2, 0)
    assert ack["dropped"] == {"invalid": 2, "future": 1, "accuracy": 1, "min_period": 1, "speed": 1}
    # An older point sent afterwards (an offline buffer) joins the trail, not the live position.
    late = {"lat": lat, "lng": lng, "ts": now - 10, "accuracy_m": 5.0}
    ack = ok(partner.request("POST", "/delivery/partners/me/positions", json={"points": [late]}))
    assert (ack["accepted"], ack["late"]) == (1, 1)
    problem(
        partner.request("POST", "/delivery/partners/me/positions", json={"points": [points[0]] * 101}),
        422,
        "validation_error",
    )
    problem(
        partner.request(
            "POST", "/delivery/partners/me/positions", json={"points": [{"lat": "12", "lng": 1, "ts": 1}]}
        ),
        422,
        "validation_error",
    )

    def where() -> Any:
        board = ok(ops.request("GET", f"/delivery/stores/{store['id']}/board"))
        return next(p for p in board["partners"] if p["id"] == partner.user_id)

    before = where()
    assert before["position"]["lat"] == pytest.approx(lat + 0.0001)
    assert [round(p["ts"] - now) for p in before["trail"]][-3:] == [-10, 0, 5]
    time.sleep(get_settings().partner_position_flush_seconds + 1)  # written through to Redis
    kill_fleet(ops, store)
    after = where()
    assert after["position"] == before["position"] and after["trail"] == before["trail"]
    assert after["state"] == "idle"


# ---------------------------------------------------------------- WebSockets

SCHEMAS = json.loads(WEBSOCKETS_FILE.read_text())["sockets"]
CODES = json.loads(WEBSOCKETS_FILE.read_text())["close_codes"]


def ws_url(live: Live, path: str) -> str:
    return live.base_url.replace("http://", "ws://") + path


class Client:
    """A real WebSocket client whose every message, both ways, must match the committed schema."""

    def __init__(self, live: Live, path: str, schema_path: str) -> None:
        self.ws = connect(
            ws_url(live, path), open_timeout=30, additional_headers={"X-Forwarded-For": "2001:db8::77"}
        )
        schema = SCHEMAS[schema_path]
        self.incoming = jsonschema.Draft202012Validator(schema["server_to_client"])
        self.outgoing = jsonschema.Draft202012Validator(schema["client_to_server"])

    def send(self, message: dict[str, Any]) -> None:
        self.outgoing.validate(message)
        self.ws.send(json.dumps(message))

    def recv(self, kind: str | None = None, timeout: float = 20) -> dict[str, Any]:
        """The next message (of `kind`, skipping heartbeats and others)."""
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.incoming.validate(message)
            if kind is None or message["type"] == kind:
                return dict(message)

    def closed_with(self, timeout: float = 20) -> int:
        with pytest.raises(ConnectionClosed) as closed:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.recv(timeout=deadline - time.monotonic())
        assert closed.value.rcvd is not None
        return int(closed.value.rcvd.code)


def test_partner_and_customer_sockets_carry_a_delivery(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    partner = partner_at(live, ops, store)
    app = Client(live, "/delivery/ws/partner", "/delivery/ws/partner")
    app.send({"type": "auth", "token": partner.tokens["access_token"]})
    ready = app.recv("ready")
    assert ready["partner"]["user_id"] == partner.user_id and ready["offers"] == [] and ready["trip"] == []
    # The client offered permessage-deflate (the library's default); the replica declines it.
    assert "Sec-WebSocket-Extensions" not in app.ws.response.headers

    user, placed, _ = confirmed_order(live, shop)
    watch = Client(live, f"/delivery/ws/orders/{placed['id']}", "/delivery/ws/orders/{order_id}")
    watch.send({"type": "auth", "token": user.tokens["access_token"]})
    first = watch.recv("tracking")["tracking"]
    assert first["order_id"] == placed["id"] and first["partner"] is None

    offer = app.recv("offer")
    assert offer["offer"]["order_ids"] == [placed["id"]] and offer["pickup_eta_s"] > 0
    app.send({"type": "accept", "offer_id": offer["offer"]["id"]})
    trip = app.recv("trip")["deliveries"]
    assert [d["order_id"] for d in trip] == [placed["id"]]
    assigned = watch.recv("tracking")["tracking"]
    assert assigned["delivery_status"] == "assigned" and assigned["partner"]["vehicle"] == "scooter"

    # Positions over the socket reach the customer's socket (batched by the replica).
    lat = store["lat"] + 0.45 * KM_LAT
    app.send({"type": "position", "lat": lat, "lng": store["lng"], "ts": time.time() + 5, "accuracy_m": 6.0})
    moved = watch.recv("tracking")["tracking"]
    assert moved["position"]["lat"] == pytest.approx(lat)
    app.send({"type": "ping"})
    assert app.recv("pong")["type"] == "pong"
    # A late answer gets an error message, not a closed socket.
    app.send({"type": "decline", "offer_id": offer["offer"]["id"]})
    assert app.recv("error")["code"] == "offer_closed"

    # The delivery ends: the customer's socket gets the last state and is closed normally.
    (job,) = ok(partner.request("GET", "/delivery/partners/me/trip"))
    staff = staff_of(live, store)
    ok(staff.request("POST", f"/orders/{placed['id']}/transitions", json={"to": "packed"}))
    for to in ("at_store", "picked_up", "arrived"):
        ok(advance(partner, job["id"], to))
    pin = watch.recv("tracking")["tracking"]
    while pin["delivery_status"] != "arrived":
        pin = watch.recv("tracking")["tracking"]
    due = placed["totals"]["total_paise"]
    ok(advance(partner, job["id"], "delivered", pin=pin["pin"], cash_collected_paise=due))
    assert watch.closed_with() == CODES["finished"]

    # Reconnecting gets the snapshot again (delivered now), then the same close.
    again = Client(live, f"/delivery/ws/orders/{placed['id']}", "/delivery/ws/orders/{order_id}")
    again.send({"type": "auth", "token": user.tokens["access_token"]})
    assert again.recv("tracking")["tracking"]["order_status"] == "delivered"
    assert again.closed_with() == CODES["finished"]

    # Ops suspend the partner: their socket is closed with 4403.
    ok(ops.request("POST", f"/delivery/partners/{partner.user_id}/suspend"))
    assert app.recv("error")["code"] == "partner_suspended"
    assert app.closed_with() == CODES["forbidden"]


def test_sockets_authenticate_first_and_bound_what_they_read(live: Live, shop: Shop, ops: Session):
    user, placed, _ = confirmed_order(live, shop)
    order_path = f"/delivery/ws/orders/{placed['id']}"
    schema = "/delivery/ws/orders/{order_id}"

    silent = Client(live, order_path, schema)
    assert (
        silent.closed_with(timeout=get_settings().delivery_ws_auth_timeout_seconds + 10)
        == CODES["unauthenticated"]
    )
    forged = Client(live, order_path, schema)
    forged.ws.send(json.dumps({"type": "auth", "token": "eyJhbGciOiJub25lIn0.e30."}))
    assert forged.closed_with() == CODES["unauthenticated"]
    query = Client(live, order_path + f"?token={user.tokens['access_token']}", schema)
    query.ws.send(json.dumps({"type": "ping"}))
    assert query.closed_with() == CODES["unauthenticated"]  # a token in the URL is not read
    for path, who in ((order_path, live.login()), (f"/delivery/ws/orders/{uuid.uuid4()}", user)):
        other = Client(live, path, schema)
        other.send({"type": "auth", "token": who.tokens["access_token"]})
        assert other.closed_with() == CODES["not_found"]  # someone else's looks like a missing one
    customer_on_partner_socket = Client(live, "/delivery/ws/partner", "/delivery/ws/partner")
    customer_on_partner_socket.send({"type": "auth", "token": user.tokens["access_token"]})
    assert customer_on_partner_socket.closed_with() == CODES["forbidden"]

    def authed() -> Client:
        client = Client(live, order_path, schema)
        client.send({"type": "auth", "token": user.tokens["access_token"]})
        client.recv("tracking")
        return client

    big = authed()
    big.ws.send(json.dumps({"type": "ping", "pad": "x" * get_settings().delivery_ws_max_message_bytes}))
    assert big.closed_with() == CODES["too_large"]
    garbled = authed()
    garbled.ws.send("{not json")
    assert garbled.closed_with() == CODES["malformed"]
    flood = authed()
    with contextlib.suppress(ConnectionClosed):
        for _ in range(int(get_settings().delivery_ws_max_messages_per_second * 10)):
            flood.ws.send(json.dumps({"type": "pong"}))
    assert flood.closed_with() == CODES["flood"]


# ---------------------------------------------------------------- the dispatcher's map


class Chromium:
    """Headless Chromium (Debian's package) driven over its DevTools protocol."""

    def __init__(self, tmp: Any) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is missing: `make test` installs it (apt-get install chromium)"
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={tmp}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = tmp / "DevToolsActivePort"
        wait_for(port_file.exists, 30, "chromium")
        port = port_file.read_text().split()[0]
        targets = wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/json/list").json(), 10, "a tab")
        page = next(t for t in targets if t["type"] == "page")
        self.cdp = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = 0

    def send(self, method: str, **params: Any) -> Any:
        self.ids += 1
        self.cdp.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            reply = json.loads(self.cdp.recv(timeout=30))
            if reply.get("id") == self.ids:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.cdp.close()
        self.proc.terminate()
        self.proc.wait(10)


def test_the_dispatch_map_shows_partners_moving(live: Live, shop: Shop, ops: Session, tmp_path):
    store = shop.store_a
    page = httpx.get(f"{live.base_url}/delivery/map")
    assert page.status_code == 200 and "script-src 'sha256-" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside
    partner = partner_at(live, ops, store, km_north=0.2)
    browser = Chromium(tmp_path)
    try:
        token = ops.tokens["access_token"]
        browser.send("Page.navigate", url=f"{live.base_url}/delivery/map#token={token}&store={store['id']}")
        row = f"document.querySelector('tr[data-partner=\"{partner.user_id}\"] td:nth-child(3)')?.textContent"
        first = wait_for(lambda: browser.js(row), 30, "the partner on the map")
        assert first.startswith(f"{store['lat'] + 0.2 * KM_LAT:.5f}")
        move_to(partner, store["lat"] + 0.6 * KM_LAT, store["lng"])
        moved = wait_for(lambda: (text := browser.js(row)) != first and text, 30, "the partner moving")
        assert moved.startswith(f"{store['lat'] + 0.6 * KM_LAT:.5f}")
        assert browser.js("document.getElementById('status').textContent") == "connected"
        # The canvas drew something (the store and the partner), not a blank page.
        painted = (
            "[...document.getElementById('map').getContext('2d').getImageData(0,0,300,300).data].some(v => v)"
        )
        assert browser.js(painted) is True
    finally:
        browser.close()


# ---------------------------------------------------------------- crashes


def test_a_shard_killed_mid_round_loses_and_doubles_nothing(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    partners = [partner_at(live, ops, store, km_north=0.2 + i / 10) for i in range(3)]
    orders = [confirmed_order(live, shop)[1]["id"] for _ in range(4)]
    for _ in range(3):  # rounds racing the kills
        with ThreadPoolExecutor(2) as pool:
            pool.submit(ops.request, "POST", f"/delivery/stores/{store['id']}/round")
            pool.submit(kill_fleet, ops, store)

    def settled() -> Any:
        rows = live.sql(
            "SELECT o.id, (SELECT count(*) FROM delivery_offers f WHERE f.status = 'open' AND f.expires_at > now() AND o.id = ANY(f.order_ids)) AS open,"
            " (SELECT count(*) FROM deliveries d WHERE d.order_id = o.id AND d.status <> 'cancelled') AS carried"
            " FROM orders o WHERE o.id = ANY(CAST(:ids AS uuid[]))",
            ids=orders,
        )
        return rows if all(r.open + r.carried == 1 for r in rows) and len(rows) == len(orders) else None

    # Partners keep streaming (their positions must be fresh to be offered anything).
    for i, partner in enumerate(partners):
        move_to(partner, store["lat"] + (0.2 + i / 10) * KM_LAT, store["lng"] + 0.0001)

    # Every order ends up offered or carried, exactly once; no partner holds two open offers.
    # "Open" as the partner app sees it: an offer past its expiry reads 'open' until the
    # shard's next round closes it (the first offers, made before the kills, can expire while
    # the restarted shards reload), and GET /partners/me/offers leaves it out.
    def round_then_settled() -> Any:
        ops.request("POST", f"/delivery/stores/{store['id']}/round")  # a restarting shard may say 503
        time.sleep(0.3)  # within the ops user's rate limit
        return settled()

    offered = wait_for(round_then_settled, 60, "every order offered once")
    assert sum(r.open + r.carried for r in offered) == len(orders)
    holders = live.sql(
        "SELECT partner_id, count(*) AS n FROM delivery_offers WHERE status = 'open' AND expires_at > now()"
        " AND partner_id = ANY(CAST(:p AS uuid[]))"
        " GROUP BY partner_id",
        p=[p.user_id for p in partners],
    )
    assert all(h.n == 1 for h in holders)
    # The offers the database holds are the ones the partners see after the restarts.
    for p in partners:
        seen = ok(p.request("GET", "/delivery/partners/me/offers"))
        mine = [h for h in holders if str(h.partner_id) == p.user_id]
        assert len(seen) == len(mine)


def test_tracking_clients_reconnect_after_a_replica_restart(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    partner = partner_at(live, ops, store)
    user, placed, _ = confirmed_order(live, shop)
    assert len(ok(partner.request("POST", f"/delivery/offers/{offer_for(partner)['id']}/accept"))) == 1
    path, schema = f"/delivery/ws/orders/{placed['id']}", "/delivery/ws/orders/{order_id}"
    watch = Client(live, path, schema)
    watch.send({"type": "auth", "token": user.tokens["access_token"]})
    assert watch.recv("tracking")["tracking"]["delivery_status"] == "assigned"

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA::delivery#" in a["name"]
    ]
    assert names
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    with pytest.raises(ConnectionClosed):  # the socket went with its replica (no close frame)
        while True:
            watch.recv(timeout=60)

    def reconnected() -> Client | None:
        try:
            client = Client(live, path, schema)
            client.send({"type": "auth", "token": user.tokens["access_token"]})
            client.recv("tracking", timeout=10)
            return client
        except Exception:
            return None

    again = wait_for(reconnected, 90, "a new delivery replica")
    move_to(partner, store["lat"] + 0.3 * KM_LAT, store["lng"])  # the live view survived
    moved = again.recv("tracking")["tracking"]
    assert moved["delivery_status"] == "assigned"
    assert moved["position"]["lat"] == pytest.approx(store["lat"] + 0.3 * KM_LAT)
