"""The notification rules without a database: who hears what, the switches, quiet hours in
the user's zone, and the templates."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

import pytest
from jinja2 import UndefinedError

from models.notification_rules import (
    CRITICAL,
    EVENTS,
    PROMOTION,
    SAMPLE_CONTEXT,
    TEMPLATES,
    Category,
    Channel,
    enabled,
    events_table,
    not_before,
    quiet_until,
    render,
    rupees,
)
from models.outbox import SUBSCRIBERS
from models.users import Language

NIGHT = (time(22, 0), time(8, 0))


def test_notifications_subscribes_to_exactly_the_events_it_has_rules_for():
    subscribed = {topic for topic, apps in SUBSCRIBERS.items() if "notifications" in apps}
    assert subscribed == {*EVENTS, "promotion.broadcast"}


def test_every_kind_has_every_language_and_renders_with_the_sample():
    kinds = {rule.kind for rules in EVENTS.values() for rule in rules} | {PROMOTION.kind}
    assert kinds == set(TEMPLATES)
    for kind in kinds:
        assert set(TEMPLATES[kind]) == set(Language), kind
        for language in Language:
            content = render(kind, language, SAMPLE_CONTEXT)
            assert content.title and content.body and "{{" not in content.body, (kind, language)


def test_the_customer_hears_of_every_step_of_an_order():
    kinds = {rule.kind for rules in EVENTS.values() for rule in rules if rule.recipient == "customer"}
    assert kinds >= {
        "order_placed",
        "order_confirmed",
        "order_packed",
        "partner_assigned",
        "out_for_delivery",
        "partner_arrived",
        "order_delivered",
        "delivery_failed",
        "order_cancelled",
        "payment_failed",
        "refund_processed",
    }
    assert {r.recipient for r in EVENTS["order.placed"]} == {"customer", "store_staff"}
    assert EVENTS["delivery.offered"][0].recipient == "partner"
    assert EVENTS["delivery.offered"][0].channels == (Channel.push,)
    assert {r.category for r in (*EVENTS["order.payment_failed"], *EVENTS["refund.processed"])} == {
        Category.account
    }


def test_critical_categories_ignore_switches_and_promotions_are_opt_in():
    off = {(c.value, ch.value): False for c in Category for ch in Channel}
    for category in Category:
        for channel in Channel:
            assert enabled(category, channel, off) is (category in CRITICAL)
    assert not enabled(Category.promotions, Channel.push, {})
    assert enabled(Category.promotions, Channel.push, {("promotions", "push"): True})
    assert enabled(Category.orders, Channel.push, {}) and not enabled(Category.orders, Channel.sms, {})


@pytest.mark.parametrize(
    ("utc", "ends"),
    [
        (datetime(2026, 12, 7, 17, 0, tzinfo=UTC), datetime(2026, 12, 8, 2, 30, tzinfo=UTC)),  # 22:30 IST
        (datetime(2026, 12, 7, 20, 0, tzinfo=UTC), datetime(2026, 12, 8, 2, 30, tzinfo=UTC)),  # 01:30 IST
        (datetime(2026, 12, 8, 2, 29, tzinfo=UTC), datetime(2026, 12, 8, 2, 30, tzinfo=UTC)),  # 07:59 IST
        (datetime(2026, 12, 8, 2, 30, tzinfo=UTC), None),  # 08:00 IST: over
        (datetime(2026, 12, 7, 16, 29, tzinfo=UTC), None),  # 21:59 IST: not yet
    ],
)
def test_quiet_hours_span_midnight_in_the_users_zone(utc, ends):
    assert quiet_until(utc, "Asia/Kolkata", *NIGHT) == ends


def test_quiet_hours_end_at_the_wall_clock_time_across_a_dst_change():
    # London leaves summer time at 02:00 on 2026-10-25: 08:00 that morning is 08:00 GMT.
    before = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)  # 23:00 BST
    assert quiet_until(before, "Europe/London", *NIGHT) == datetime(2026, 10, 25, 8, 0, tzinfo=UTC)


def test_only_promotions_wait_for_quiet_hours():
    at_night = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)  # 23:30 IST
    order_update = EVENTS["order.packed"][0]
    assert not_before(order_update, at_night, "Asia/Kolkata", *NIGHT) == at_night
    assert not_before(PROMOTION, at_night, "Asia/Kolkata", *NIGHT) == datetime(2026, 12, 8, 2, 30, tzinfo=UTC)
    assert not_before(PROMOTION, at_night, "Asia/Kolkata", None, None) == at_night
    assert not_before(PROMOTION, at_night, "Asia/Kolkata", time(9), time(9)) == at_night


def test_email_html_is_escaped_and_text_is_not():
    context = {**SAMPLE_CONTEXT, "title": "Fresh <b>mangoes</b>", "body": "Tom & Jerry's <script>x</script>"}
    content = render("promotion", Language.en, context, unsubscribe_url="https://x.example/u?t=a&b=c")
    assert content.body == "Tom & Jerry's <script>x</script>"  # push and SMS are plain text
    assert "<script>" not in content.html and "&lt;script&gt;" in content.html
    assert "Fresh &lt;b&gt;mangoes&lt;/b&gt;" in content.html
    assert 'href="https://x.example/u?t=a&amp;b=c"' in content.html


def test_a_missing_value_is_an_error_not_a_blank():
    with pytest.raises(UndefinedError):
        render("order_placed", Language.en, {"order_ref": "AB12CD34"})


def test_hindi_and_amounts():
    content = render(
        "order_delivered", Language.hi, {**SAMPLE_CONTEXT, "paid": rupees(34_950), "method": "cod"}
    )
    assert "₹349.50" in content.body and "नकद" in content.body
    assert rupees(24_900) == "₹249" and rupees(12_345_600) == "₹123,456"


def test_the_readme_carries_the_event_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert events_table() in readme
