"""Notifications through the real stack: outbox events from real orders and deliveries, the
FCM stand-in and the local SMTP server over real sockets, the inbox and preferences."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import pytest

from tests.conftest import Live, Session
from tests.service.shop import Shop, add, add_address, make_product, make_shop
from tests.service.test_delivery import (
    Client,
    advance,
    offer_for,
    ok,
    partner_at,
    problem,
    staff_of,
    user_address,
)
from tests.service.test_orders import checkout, wait_for

pytestmark = pytest.mark.usefixtures("live")

FCM = "/sandbox-gateway/fcm/sandbox"


@pytest.fixture
def shop(live: Live) -> Shop:
    return make_shop(live, "notifications-test")


@pytest.fixture(scope="module")
def ops(live: Live) -> Session:
    session = live.login()
    live.sql("UPDATE users SET role = 'ops' WHERE id = :id", id=session.user_id)
    return session


def device(who: Session, token: str | None = None) -> str:
    token = token or "tok_" + secrets.token_urlsafe(24)
    ok(who.request("POST", "/notifications/devices", json={"token": token, "platform": "android"}), 201)
    return token


def control(live: Live, path: str, **body: Any) -> None:
    """Tell the FCM stand-in how a token behaves from now on."""
    response = live.client().post(f"{FCM}/{path}", json=body or None)
    assert response.is_success, response.text


def pushes(live: Live, token: str) -> list[dict[str, Any]]:
    return list(live.client().get(f"{FCM}/messages", params={"token": token}).json())


def events_pushed(live: Live, token: str) -> list[str]:
    return sorted(m["extra"]["data"]["event"] for m in pushes(live, token))


def sms_to(live: Live, phone: str) -> list[str]:
    sent = live.client().get("/notifications/dev/outbox", params={"to": phone}).json()
    return [m["body"] for m in sent if "login code" not in m["body"]]


def sends(ops: Session, user: Session) -> list[dict[str, Any]]:
    return list(ok(ops.request("GET", "/notifications/deliveries", params={"user_id": user.user_id})))


def inject(live: Live, topic: str, payload: dict[str, Any]) -> int:
    """An outbox event as the domain would write it, for the events a test cannot easily
    cause (a failed payment, a refund): the relay delivers it like any other."""
    (row,) = live.sql(
        "INSERT INTO outbox (topic, aggregate_id, payload, status, pending)"
        " VALUES (:t, :a, CAST(:p AS jsonb), 'pending', '{notifications}') RETURNING id",
        t=topic,
        a=payload.get("order_id"),
        p=json.dumps(payload),
    )
    live.sql("SELECT pg_notify('vurksha_outbox', '')")
    return int(row.id)


def delivered(live: Live, event_id: int) -> None:
    wait_for(
        lambda: (
            live.sql("SELECT status FROM outbox WHERE id = :i", announce=False, i=event_id)[0].status
            == "delivered"
        ),
        what=f"outbox event {event_id} delivered",
    )


def settled(live: Live, user: Session) -> bool:
    return not live.sql(
        "SELECT 1 FROM notification_sends WHERE user_id = :u AND status IN ('queued', 'sending')",
        announce=False,
        u=user.user_id,
    )


def placed_order(live: Live, shop: Shop, user: Session) -> dict[str, Any]:
    """A COD order of the user's, once the messages of its placing are all handed over (so a
    device registered next hears only of what the test does)."""
    rice = make_product(live, shop, price=12_000, stock_a=20)
    add_address(user, shop.store_a, default=True)
    assert add(user, rice, 1).status_code == 200
    placed = dict(ok(checkout(user, user_address(user), "cod"), 201))
    (event,) = live.sql(
        "SELECT id FROM outbox WHERE aggregate_id = :o AND topic = 'order.placed'", o=placed["id"]
    )
    delivered(live, event.id)
    wait_for(lambda: settled(live, user), what="the placing's messages handed over")
    return placed


def push_of(ops: Session, user: Session, kind: str) -> dict[str, Any]:
    """The user's one push of a kind ({} until it is recorded)."""
    found = [s for s in sends(ops, user) if s["channel"] == "push" and s["kind"] == kind]
    assert len(found) <= 1, found
    return found[0] if found else {}


def test_an_order_from_checkout_to_doorstep_tells_each_party_once(live: Live, shop: Shop, ops: Session):
    store = shop.store_a
    partner = partner_at(live, ops, store)
    partner_token = device(partner)
    staff = staff_of(live, store)
    staff_token = device(staff)
    user = live.login()
    email = f"c{uuid.uuid4().hex[:10]}@example.com"
    ok(
        user.request(
            "PATCH", "/users/me", json={"email": email, "language": "hi", "time_zone": "Asia/Kolkata"}
        )
    )
    token = device(user)

    placed = placed_order(live, shop, user)
    ok(staff.request("POST", f"/orders/{placed['id']}/transitions", json={"to": "confirmed"}))
    offer = offer_for(partner)
    wait_for(lambda: events_pushed(live, partner_token) == ["delivery.offered"], what="the offer's push")
    (job,) = ok(partner.request("POST", f"/delivery/offers/{offer['id']}/accept"))
    ok(advance(partner, job["id"], "at_store"))
    ok(staff.request("POST", f"/orders/{placed['id']}/transitions", json={"to": "packed"}))
    ok(advance(partner, job["id"], "picked_up"))
    ok(advance(partner, job["id"], "arrived"))
    pin = ok(user.request("GET", f"/delivery/orders/{placed['id']}/tracking"))["pin"]
    due = placed["totals"]["total_paise"]
    ok(advance(partner, job["id"], "delivered", pin=pin, cash_collected_paise=due))

    expected = [
        "delivery.arrived",
        "delivery.assigned",
        "delivery.picked_up",
        "order.confirmed",
        "order.delivered",
        "order.packed",
        "order.placed",
    ]
    wait_for(lambda: events_pushed(live, token) == expected, what="a push for every step")
    by_event = {m["extra"]["data"]["event"]: m for m in pushes(live, token)}
    assert by_event["order.placed"]["extra"]["title"] == "ऑर्डर मिल गया"  # in the customer's language
    assert pin in by_event["delivery.arrived"]["body"]
    assert "मिनट" in by_event["delivery.picked_up"]["body"]  # with an ETA in minutes
    assert events_pushed(live, staff_token) == ["order.placed"]
    assert events_pushed(live, partner_token) == ["delivery.offered"]

    # The inbox holds the same steps, unread; the SMS carries the PIN; email the bookends.
    page = ok(user.request("GET", "/notifications"))
    assert page["unread"] == 7 and len(page["items"]) == 7
    assert sorted(i["data"]["event"] for i in page["items"]) == expected
    wait_for(lambda: [b for b in sms_to(live, user.phone) if pin in b], what="the PIN by SMS")
    mail = wait_for(
        lambda: (
            len(m := live.client().get("/notifications/dev/mail", params={"to": email}).json()) == 2 and m
        ),
        what="two emails",
    )
    assert all(m["extra"]["html"].startswith("<!doctype html>") for m in mail)

    # Delivering the placed event again (at least once means it can happen) sends nothing new.
    (event,) = live.sql(
        "SELECT id FROM outbox WHERE aggregate_id = :o AND topic = 'order.placed'", o=placed["id"]
    )
    live.sql(
        "UPDATE outbox SET status = 'pending', pending = '{notifications}', attempts = 0,"
        " next_attempt_at = now() WHERE id = :i",
        i=event.id,
    )
    live.sql("SELECT pg_notify('vurksha_outbox', '')")
    delivered(live, event.id)
    assert events_pushed(live, token) == expected and events_pushed(live, staff_token) == ["order.placed"]
    assert ok(user.request("GET", "/notifications"))["unread"] == 7
    assert len(live.client().get("/notifications/dev/mail", params={"to": email}).json()) == 2


def test_fcm_errors_take_their_documented_action(live: Live, shop: Shop, ops: Session):
    # An uninstalled app's token is forgotten at once; the message is not retried.
    gone = live.login()
    placed = placed_order(live, shop, gone)
    dead = device(gone)
    control(live, f"tokens/{dead}/unregister")
    delivered(live, inject(live, "order.confirmed", {"order_id": placed["id"], "status": "confirmed"}))
    wait_for(lambda: settled(live, gone), what="the push handed over")
    assert live.sql("SELECT count(*) AS n FROM notification_devices WHERE token = :t", t=dead)[0].n == 0
    push = push_of(ops, gone, "order_confirmed")
    assert push["last_code"] == "UNREGISTERED" and [a["status"] for a in push["attempts"]] == [
        "queued",
        "failed",
    ]

    # Transient errors are retried after Retry-After, then sent.
    for status in ("UNAVAILABLE", "QUOTA_EXCEEDED", "INTERNAL"):
        user = live.login()
        placed = placed_order(live, shop, user)
        token = device(user)
        control(live, "faults", token=token, status=status, times=1, retry_after_seconds=1)
        inject(live, "order.packed", {"order_id": placed["id"], "status": "packed"})
        wait_for(lambda user=user: push_of(ops, user, "order_packed").get("status") == "sent", what=status)
        push = push_of(ops, user, "order_packed")
        assert [(a["status"], a["code"]) for a in push["attempts"]] == [
            ("queued", None),
            ("retry", status),
            ("sent", None),
        ], status

    # INVALID_ARGUMENT is not retried, and the token stays.
    user = live.login()
    placed = placed_order(live, shop, user)
    token = device(user)
    control(live, "faults", token=token, status="INVALID_ARGUMENT", times=1)
    delivered(live, inject(live, "order.packed", {"order_id": placed["id"], "status": "packed"}))
    wait_for(lambda: settled(live, user) and push_of(ops, user, "order_packed"), what="INVALID_ARGUMENT")
    push = push_of(ops, user, "order_packed")
    assert [a["status"] for a in push["attempts"]] == ["queued", "failed"]
    assert live.sql("SELECT count(*) AS n FROM notification_devices WHERE token = :t", t=token)[0].n == 1


def test_a_critical_push_no_device_takes_goes_by_sms(live: Live, shop: Shop, ops: Session):
    user = live.login()
    placed = placed_order(live, shop, user)
    dead = device(user)
    control(live, f"tokens/{dead}/unregister")
    inject(live, "order.payment_failed", {"order_id": placed["id"], "status": "payment_failed"})
    wait_for(lambda: [b for b in sms_to(live, user.phone) if "Payment failed" in b], what="the SMS fallback")
    wait_for(lambda: settled(live, user), what="the sends recorded")
    channels = {(s["channel"], s["status"]) for s in sends(ops, user)}
    assert ("push", "failed") in channels and ("sms", "sent") in channels
    # Not critical: an order update with no device just does not go out by push.
    quiet = live.login()
    placed = placed_order(live, shop, quiet)
    delivered(live, inject(live, "order.confirmed", {"order_id": placed["id"], "status": "confirmed"}))
    assert not sms_to(live, quiet.phone)


def test_tokens_move_between_accounts_and_leave_with_the_session(live: Live, shop: Shop):
    first, second = live.login(), live.login()
    token = device(first)
    device(second, token)  # the phone changed hands
    problem(first.request("DELETE", f"/notifications/devices/{token}"), 404, "device_not_found")
    (row,) = live.sql("SELECT user_id FROM notification_devices WHERE token = :t", t=token)
    assert str(row.user_id) == second.user_id
    assert second.request("POST", "/users/auth/logout").status_code == 204
    assert live.sql("SELECT count(*) AS n FROM notification_devices WHERE token = :t", t=token)[0].n == 0
    other = device(first)
    assert first.request("DELETE", f"/notifications/devices/{other}").status_code == 204


def test_preferences_switch_channels_but_never_critical_ones(live: Live, shop: Shop, ops: Session):
    user = live.login()
    prefs = ok(user.request("GET", "/notifications/preferences"))
    by = {c["category"]: c for c in prefs["categories"]}
    assert by["account"]["critical"] and not by["orders"]["critical"]
    assert not any(by["promotions"]["channels"].values())  # opt-in
    assert prefs["quiet_hours"] == {"start": "22:00", "end": "08:00"}
    problem(
        user.request("PUT", "/notifications/preferences", json={"categories": {"account": {"push": False}}}),
        422,
        "critical_category",
    )
    body = {"categories": {"orders": {"push": False}}, "quiet_hours": None}
    prefs = ok(user.request("PUT", "/notifications/preferences", json=body))
    assert not {c["category"]: c for c in prefs["categories"]}["orders"]["channels"]["push"]
    assert prefs["quiet_hours"] is None

    placed = placed_order(live, shop, user)
    token = device(user)
    delivered(live, inject(live, "order.confirmed", {"order_id": placed["id"], "status": "confirmed"}))
    assert not pushes(live, token)  # switched off
    assert [i["kind"] for i in ok(user.request("GET", "/notifications"))["items"]] == [
        "order_confirmed",
        "order_placed",
    ]
    # A critical message ignores the switches.
    ok(user.request("PUT", "/notifications/preferences", json={"categories": {"account": {"push": True}}}))
    inject(live, "order.payment_failed", {"order_id": placed["id"], "status": "payment_failed"})
    wait_for(lambda: events_pushed(live, token) == ["order.payment_failed"], what="the critical push")


def test_the_inbox_is_paged_marked_read_and_private(live: Live, shop: Shop):
    user, stranger = live.login(), live.login()
    placed = placed_order(live, shop, user)
    for status in ("confirmed", "packed"):
        delivered(live, inject(live, f"order.{status}", {"order_id": placed["id"], "status": status}))
    first = ok(user.request("GET", "/notifications", params={"limit": 2}))
    assert first["unread"] == 3 and len(first["items"]) == 2 and first["next_cursor"]
    rest = ok(user.request("GET", "/notifications", params={"limit": 2, "cursor": first["next_cursor"]}))
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    newest = first["items"][0]
    problem(stranger.request("POST", f"/notifications/{newest['id']}/read"), 404, "notification_not_found")
    assert ok(stranger.request("GET", "/notifications"))["items"] == []
    assert ok(user.request("POST", f"/notifications/{newest['id']}/read"))["read_at"]
    assert ok(user.request("GET", "/notifications"))["unread"] == 2
    assert ok(user.request("POST", "/notifications/read-all")) == {"updated": 2}
    assert ok(user.request("GET", "/notifications"))["unread"] == 0


def test_language_and_time_zone_are_validated(live: Live):
    user = live.login()
    problem(user.request("PATCH", "/users/me", json={"time_zone": "Mars/Olympus"}), 422, "unknown_time_zone")
    problem(user.request("PATCH", "/users/me", json={"language": "fr"}), 422, "validation_error")
    problem(user.request("PATCH", "/users/me", json={"language": None}), 422, "validation_error")
    me = ok(user.request("PATCH", "/users/me", json={"language": "hi", "time_zone": "Europe/London"}))
    assert (me["language"], me["time_zone"]) == ("hi", "Europe/London")


def test_admins_preview_templates(live: Live, ops: Session):
    page = ok(
        ops.request("GET", "/notifications/templates/partner_arrived/preview", params={"language": "hi"})
    )
    assert "4821" in page["body"] and page["html"].startswith("<!doctype html>")
    problem(
        live.login().request("GET", "/notifications/templates/order_placed/preview"), 403, "forbidden_role"
    )


@pytest.fixture(scope="module")
def admin(live: Live) -> Session:
    session = live.login()
    live.sql("UPDATE users SET role = 'admin' WHERE id = :id", id=session.user_id)
    return session


def opted_in(live: Live, user: Session, *, quiet: dict[str, str] | None) -> None:
    body = {"categories": {"promotions": {"push": True, "email": True}}, "quiet_hours": quiet}
    ok(user.request("PUT", "/notifications/preferences", json=body))


def broadcast(admin: Session, live: Live, store: dict[str, Any], title: str) -> dict[str, Any]:
    body = {"title": title, "body": "Alphonso mangoes <b>20% off</b> today", "store_id": store["id"]}
    made = ok(admin.request("POST", "/notifications/broadcasts", json=body), 202)
    return dict(
        wait_for(
            lambda: (
                (b := ok(admin.request("GET", f"/notifications/broadcasts/{made['id']}")))["recipients"]
                is not None
                and b
            ),
            what="the broadcast expanded",
        )
    )


def promotions(ops: Session, user: Session) -> list[tuple[str, str, str | None]]:
    return sorted(
        (s["channel"], s["status"], s["last_code"]) for s in sends(ops, user) if s["category"] == "promotions"
    )


def test_a_broadcast_respects_opt_in_quiet_hours_and_daily_caps(
    live: Live, shop: Shop, ops: Session, admin: Session
):
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    awake, sleeping, silent = live.login(), live.login(), live.login()
    email = f"p{uuid.uuid4().hex[:10]}@example.com"
    ok(awake.request("PATCH", "/users/me", json={"email": email}))
    local = datetime.now(ZoneInfo("Asia/Kolkata"))
    window = {
        "start": (local - timedelta(hours=1)).strftime("%H:%M"),
        "end": (local + timedelta(hours=1)).strftime("%H:%M"),
    }
    tokens = {}
    for who in (awake, sleeping, silent):
        placed_order(live, shop, who)  # a customer of the store: in the segment
        tokens[who.user_id] = device(who)
    opted_in(live, awake, quiet=None)
    opted_in(live, sleeping, quiet=window)
    problem(
        awake.request("POST", "/notifications/broadcasts", json={"title": "x", "body": "y"}),
        403,
        "forbidden_role",
    )

    first = broadcast(admin, live, shop.store_a, "Mangoes are in")
    assert first["recipients"] == 2  # the silent customer never opted in
    wait_for(lambda: events_pushed(live, tokens[awake.user_id]) == ["promotion.broadcast"], what="the push")
    (mail,) = wait_for(
        lambda: [
            m
            for m in live.client().get("/notifications/dev/mail", params={"to": email}).json()
            if m["extra"]["subject"] == "Mangoes are in"
        ],
        what="the promotion's email",
    )
    assert "&lt;b&gt;20% off&lt;/b&gt;" in mail["extra"]["html"]  # the admin's text, escaped
    link = mail["extra"]["headers"]["List-Unsubscribe"].strip("<>")
    assert mail["extra"]["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert link in mail["extra"]["html"].replace("&amp;", "&")
    assert not pushes(live, tokens[sleeping.user_id]) and not pushes(live, tokens[silent.user_id])
    assert promotions(ops, sleeping)[0][:2] == ("push", "queued")  # held back, not dropped

    # Three a day at most: the fourth is skipped, not queued for tomorrow.
    for n in (2, 3, 4):
        broadcast(admin, live, shop.store_a, f"Offer {n}")
    wait_for(
        lambda: len(events_pushed(live, tokens[awake.user_id])) == 3 and settled(live, awake), what="3 pushes"
    )
    pushed = [p for p in promotions(ops, awake) if p[0] == "push"]
    assert pushed == [("push", "sent", None)] * 3 + [("push", "skipped", "rate_capped")]

    # When the quiet hours end, what waited goes out.
    try:
        ok(live.client().put("/notifications/dev/clock", json={"offset_seconds": 2.5 * 3600}))
        wait_for(lambda: pushes(live, tokens[sleeping.user_id]), what="the held-back push")
    finally:
        ok(live.client().put("/notifications/dev/clock", json={"offset_seconds": 0}))

    # The link unsubscribes from promotional email without a login (a GET changes nothing).
    client = live.client()
    assert client.get(link).status_code == 200
    assert promotions(ops, awake).count(("email", "sent", None)) == 3
    assert client.post(link).status_code == 200
    prefs = {c["category"]: c for c in ok(awake.request("GET", "/notifications/preferences"))["categories"]}
    assert prefs["promotions"]["channels"] == {"push": True, "sms": False, "email": False, "inbox": False}
    forged = link[: -len(link.split("token=")[1])] + "A" * 43
    problem(client.post(forged), 422, "invalid_unsubscribe_link")


def test_the_inbox_socket_pushes_new_items_to_their_owner_only(live: Live, shop: Shop):
    user, stranger = live.login(), live.login()
    placed = placed_order(live, shop, user)
    mine, theirs = (Client(live, "/notifications/ws", "/notifications/ws") for _ in range(2))
    try:
        mine.send({"type": "auth", "token": user.tokens["access_token"]})
        theirs.send({"type": "auth", "token": stranger.tokens["access_token"]})
        assert mine.recv("ready")["unread"] == 1  # the placing
        assert theirs.recv("ready")["unread"] == 0
        inject(live, "order.packed", {"order_id": placed["id"], "status": "packed"})
        item = mine.recv("notification")["item"]
        assert item["kind"] == "order_packed" and item["data"]["order_id"] == placed["id"]
        with pytest.raises(TimeoutError):
            theirs.recv("notification", timeout=2)
    finally:
        mine.ws.close()
        theirs.ws.close()
    late = Client(live, "/notifications/ws", "/notifications/ws")
    late.send({"type": "auth", "token": "not-a-token"})
    assert late.closed_with() == 4401


def test_a_mail_server_refusing_an_address_for_good_stops_mail_to_it(live: Live, shop: Shop, ops: Session):
    user = live.login()
    bad = f"bounce{uuid.uuid4().hex[:8]}@example.com"  # the local SMTP server refuses bounce*
    ok(user.request("PATCH", "/users/me", json={"email": bad}))
    placed_order(live, shop, user)  # the placing's email is refused: 550
    (mail,) = [s for s in sends(ops, user) if s["channel"] == "email"]
    assert (mail["status"], mail["last_code"]) == ("failed", "smtp_550")
    (row,) = live.sql("SELECT email_undeliverable_at FROM users WHERE id = :u", u=user.user_id)
    assert row.email_undeliverable_at is not None
    delivered(live, inject(live, "order.cancelled", {"order_id": placed_order(live, shop, user)["id"]}))
    assert [s["kind"] for s in sends(ops, user) if s["channel"] == "email"] == ["order_placed"]
    # A new address gets a new chance.
    good = f"c{uuid.uuid4().hex[:8]}@example.com"
    ok(user.request("PATCH", "/users/me", json={"email": good}))
    placed_order(live, shop, user)
    assert len(live.client().get("/notifications/dev/mail", params={"to": good}).json()) == 1


def test_the_janitor_purges_finished_sends_and_old_inbox_items(live: Live, shop: Shop, ops: Session):
    import ray

    from actors.jobs import janitor

    user = live.login()
    placed = placed_order(live, shop, user)
    device(user)
    delivered(live, inject(live, "order.packed", {"order_id": placed["id"]}))
    wait_for(lambda: settled(live, user), what="the sends handed over")
    live.sql(
        "UPDATE notification_sends SET updated_at = now() - interval '31 days'"
        " WHERE user_id = :u AND kind = 'order_placed'",
        u=user.user_id,
    )
    live.sql(
        "UPDATE notifications SET created_at = now() - interval '91 days' WHERE user_id = :u AND kind = 'order_placed'",
        u=user.user_id,
    )
    # A send still due is kept whatever its age.
    live.sql(
        "UPDATE notification_sends SET status = 'queued', next_attempt_at = now() + interval '1 day',"
        " updated_at = now() - interval '60 days' WHERE user_id = :u AND kind = 'order_packed' AND channel = 'push'",
        u=user.user_id,
    )
    assert ray.get(janitor().run.remote("purge")) >= 2
    kinds = {(s["kind"], s["channel"]) for s in sends(ops, user)}
    assert ("order_placed", "push") not in kinds and ("order_packed", "push") in kinds
    assert (
        live.sql(
            "SELECT count(*) AS n FROM notification_attempts a JOIN notification_sends s ON s.id = a.send_id"
            " WHERE s.user_id = :u AND s.kind = 'order_placed'",
            u=user.user_id,
        )[0].n
        == 0
    )
    assert [i["kind"] for i in ok(user.request("GET", "/notifications"))["items"]] == ["order_packed"]
