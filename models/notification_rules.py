"""What the notification service sends, to whom, on which channels, and when (pure: no
database, no providers).

`EVENTS` is the one table of event -> recipient -> category -> channels -> critical (the
README shows it). A category's channels are switched per user (`Preferences`); a critical
category ignores the switches, promotions are off until the user opts in. Quiet hours, in the
user's time zone, hold promotions back until the window ends; everything else goes at once.
Templates are Jinja2 per kind and language: the text environment renders push, SMS and inbox
bodies; email HTML is rendered with autoescaping.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from models.users import Language

if TYPE_CHECKING:
    from jinja2 import Template


class Category(enum.StrEnum):
    account = "account"  # login codes, payment failures, refunds: critical
    orders = "orders"  # an order's progress at the store
    delivery = "delivery"  # the partner's progress, live
    promotions = "promotions"  # offers: opt-in, quiet hours, daily caps


class Channel(enum.StrEnum):
    push = "push"
    sms = "sms"
    email = "email"
    inbox = "inbox"


CRITICAL = frozenset({Category.account})
Recipient = Literal["customer", "store_staff", "partner"]
C, Ch = Category, Channel


@dataclass(frozen=True)
class Rule:
    kind: str  # the template
    recipient: Recipient
    category: Category
    channels: tuple[Channel, ...]

    @property
    def critical(self) -> bool:
        return self.category in CRITICAL


_CUSTOMER_LIVE = (Ch.push, Ch.inbox)
# Outbox topic -> what it sends. The topics are subscribed in models.outbox.SUBSCRIBERS.
EVENTS: dict[str, tuple[Rule, ...]] = {
    "order.placed": (
        Rule("order_placed", "customer", C.orders, (Ch.push, Ch.inbox, Ch.email)),
        Rule("store_new_order", "store_staff", C.orders, (Ch.push, Ch.inbox)),
    ),
    "order.confirmed": (Rule("order_confirmed", "customer", C.orders, _CUSTOMER_LIVE),),
    "order.packed": (Rule("order_packed", "customer", C.orders, _CUSTOMER_LIVE),),
    "order.payment_failed": (Rule("payment_failed", "customer", C.account, (Ch.push, Ch.inbox, Ch.sms)),),
    "order.cancelled": (Rule("order_cancelled", "customer", C.orders, (Ch.push, Ch.inbox, Ch.email)),),
    "order.delivered": (Rule("order_delivered", "customer", C.orders, (Ch.push, Ch.inbox, Ch.email)),),
    "order.delivery_failed": (Rule("delivery_failed", "customer", C.orders, (Ch.push, Ch.inbox, Ch.sms)),),
    "delivery.assigned": (Rule("partner_assigned", "customer", C.delivery, _CUSTOMER_LIVE),),
    "delivery.picked_up": (Rule("out_for_delivery", "customer", C.delivery, _CUSTOMER_LIVE),),
    "delivery.arrived": (Rule("partner_arrived", "customer", C.delivery, (Ch.push, Ch.inbox, Ch.sms)),),
    # The partner's socket may be asleep: the offer also goes as a push.
    "delivery.offered": (Rule("new_offer", "partner", C.delivery, (Ch.push,)),),
    "refund.processed": (Rule("refund_processed", "customer", C.account, (Ch.push, Ch.inbox, Ch.email)),),
}
PROMOTION = Rule("promotion", "customer", C.promotions, (Ch.push, Ch.inbox, Ch.email))
# A critical message whose push cannot reach any device goes by SMS instead.
FALLBACK: dict[Channel, Channel] = {Ch.push: Ch.sms}


def events_table() -> str:
    """The event table as Markdown (the README carries it; a test keeps the two equal)."""
    rows = ["| event | recipient | category | channels | critical |", "| --- | --- | --- | --- | --- |"]
    for topic, rules in EVENTS.items():
        for r in rules:
            channels = ", ".join(c.value for c in r.channels)
            rows.append(
                f"| `{topic}` | {r.recipient} | {r.category} | {channels} | {'yes' if r.critical else 'no'} |"
            )
    r = PROMOTION
    rows.append(
        f"| admin broadcast | {r.recipient} | {r.category} | {', '.join(c.value for c in r.channels)} | no |"
    )
    return "\n".join(rows)


# ---------------------------------------------------------------- preferences

# Switches when the user has set none: everything about their orders on the quiet channels,
# SMS only where it matters (critical), promotions nowhere until they opt in.
DEFAULTS: dict[Category, frozenset[Channel]] = {
    C.account: frozenset(Channel),
    C.orders: frozenset({Ch.push, Ch.inbox, Ch.email}),
    C.delivery: frozenset({Ch.push, Ch.inbox, Ch.sms}),
    C.promotions: frozenset(),
}


def enabled(category: Category, channel: Channel, chosen: dict[tuple[str, str], bool]) -> bool:
    """Whether a channel of a category is on for a user (`chosen`: the switches they set)."""
    if category in CRITICAL:
        return True
    return chosen.get((category.value, channel.value), channel in DEFAULTS[category])


# ---------------------------------------------------------------- quiet hours


def quiet_until(now: datetime, zone: str, start: time | None, end: time | None) -> datetime | None:
    """When the user's quiet window that `now` falls in ends (UTC), or None outside one. A
    window may span midnight (22:00-08:00); start == end means none."""
    if start is None or end is None or start == end:
        return None
    local = now.astimezone(ZoneInfo(zone))
    t = local.time().replace(tzinfo=None)
    inside = start <= t < end if start < end else (t >= start or t < end)
    if not inside:
        return None
    ends = local.replace(hour=end.hour, minute=end.minute, second=0, microsecond=0)
    if ends <= local:
        ends += timedelta(days=1)
    # Aware arithmetic in one zone keeps wall-clock time: the window ends at `end` local
    # time even across a DST change.
    return ends.astimezone(now.tzinfo)


def not_before(rule: Rule, now: datetime, zone: str, start: time | None, end: time | None) -> datetime:
    """When a message may go: promotions wait out quiet hours, nothing else does."""
    if rule.category is not C.promotions:
        return now
    return quiet_until(now, zone, start, end) or now


# ---------------------------------------------------------------- templates

# (title, body) per kind and language. Context: order_ref, total, paid, amount, eta_minutes,
# pin, partner, reason, method, orders, seconds, items; promotions bring their own title/body.
TEMPLATES: dict[str, dict[Language, tuple[str, str]]] = {
    "order_placed": {
        Language.en: (
            "Order placed",
            "We have your order #{{ order_ref }} for {{ total }}. We will tell you when the store confirms it.",
        ),
        Language.hi: (
            "ऑर्डर मिल गया",
            "आपका ऑर्डर #{{ order_ref }} ({{ total }}) हमें मिल गया है। स्टोर के पुष्टि करते ही हम बताएँगे।",
        ),
    },
    "store_new_order": {
        Language.en: ("New order #{{ order_ref }}", "{{ items }} items, {{ total }}. Confirm it now."),
        Language.hi: ("नया ऑर्डर #{{ order_ref }}", "{{ items }} सामान, {{ total }}। अभी पुष्टि करें।"),
    },
    "order_confirmed": {
        Language.en: ("Order confirmed", "The store is packing your order #{{ order_ref }}."),
        Language.hi: ("ऑर्डर की पुष्टि हुई", "स्टोर आपका ऑर्डर #{{ order_ref }} पैक कर रहा है।"),
    },
    "order_packed": {
        Language.en: (
            "Order packed",
            "Your order #{{ order_ref }} is packed and waiting for a delivery partner.",
        ),
        Language.hi: (
            "ऑर्डर पैक हो गया",
            "आपका ऑर्डर #{{ order_ref }} पैक है और डिलीवरी पार्टनर का इंतज़ार कर रहा है।",
        ),
    },
    "payment_failed": {
        Language.en: (
            "Payment failed",
            "The payment for order #{{ order_ref }} ({{ total }}) did not go through. Open the app to pay again.",
        ),
        Language.hi: (
            "भुगतान विफल",
            "ऑर्डर #{{ order_ref }} ({{ total }}) का भुगतान नहीं हो सका। दोबारा भुगतान के लिए ऐप खोलें।",
        ),
    },
    "order_cancelled": {
        Language.en: (
            "Order cancelled",
            "Your order #{{ order_ref }} was cancelled{% if reason %}: {{ reason }}{% endif %}.{% if refund %} Any amount paid is refunded.{% endif %}",
        ),
        Language.hi: (
            "ऑर्डर रद्द",
            "आपका ऑर्डर #{{ order_ref }} रद्द कर दिया गया{% if reason %}: {{ reason }}{% endif %}।{% if refund %} भुगतान की गई राशि वापस की जाएगी।{% endif %}",
        ),
    },
    "order_delivered": {
        Language.en: (
            "Delivered",
            "Your order #{{ order_ref }} was delivered. Paid {{ paid }}{% if method == 'cod' %} in cash{% endif %}. Thank you!",
        ),
        Language.hi: (
            "डिलीवर हो गया",
            "आपका ऑर्डर #{{ order_ref }} डिलीवर हो गया। भुगतान {{ paid }}{% if method == 'cod' %} नकद{% endif %}। धन्यवाद!",
        ),
    },
    "delivery_failed": {
        Language.en: (
            "Delivery failed",
            "We could not deliver your order #{{ order_ref }}{% if reason %}: {{ reason }}{% endif %}. It goes back to the store; a paid order is refunded.",
        ),
        Language.hi: (
            "डिलीवरी नहीं हो सकी",
            "हम आपका ऑर्डर #{{ order_ref }} डिलीवर नहीं कर सके{% if reason %}: {{ reason }}{% endif %}। यह स्टोर लौटेगा; भुगतान वापस किया जाएगा।",
        ),
    },
    "partner_assigned": {
        Language.en: ("Partner assigned", "{{ partner }} will bring your order #{{ order_ref }}."),
        Language.hi: ("पार्टनर तय हुआ", "{{ partner }} आपका ऑर्डर #{{ order_ref }} लाएँगे।"),
    },
    "out_for_delivery": {
        Language.en: (
            "On the way",
            "Your order #{{ order_ref }} is on its way: arriving in about {{ eta_minutes }} min.",
        ),
        Language.hi: ("रास्ते में", "आपका ऑर्डर #{{ order_ref }} रास्ते में है: लगभग {{ eta_minutes }} मिनट में पहुँचेगा।"),
    },
    "partner_arrived": {
        Language.en: (
            "Your partner is at the door",
            "Share PIN {{ pin }} with the partner to receive order #{{ order_ref }}.",
        ),
        Language.hi: ("पार्टनर दरवाज़े पर हैं", "ऑर्डर #{{ order_ref }} लेने के लिए पार्टनर को PIN {{ pin }} बताएँ।"),
    },
    "refund_processed": {
        Language.en: (
            "Refund processed",
            "{{ amount }} for order #{{ order_ref }} is on its way back to you.",
        ),
        Language.hi: ("रिफ़ंड हो गया", "ऑर्डर #{{ order_ref }} के {{ amount }} आपको वापस भेजे जा रहे हैं।"),
    },
    "new_offer": {
        Language.en: (
            "New delivery offer",
            "{{ orders }} order(s) to deliver. Answer within {{ seconds }} s.",
        ),
        Language.hi: ("नया डिलीवरी ऑफ़र", "{{ orders }} ऑर्डर डिलीवर करने हैं। {{ seconds }} सेकंड में जवाब दें।"),
    },
    "promotion": {
        Language.en: ("{{ title }}", "{{ body }}"),
        Language.hi: ("{{ title }}", "{{ body }}"),
    },
}

# Values a template preview is rendered with.
SAMPLE_CONTEXT: dict[str, Any] = {
    "order_ref": "3F2A9C1B",
    "total": "₹349",
    "paid": "₹349",
    "amount": "₹120",
    "method": "online",
    "items": 4,
    "reason": "",
    "refund": True,
    "eta_minutes": 9,
    "pin": "4821",
    "partner": "Ravi",
    "orders": 2,
    "seconds": 20,
    "title": "Mangoes are in",
    "body": "Alphonso mangoes, 20% off today.",
}

_EMAIL_HTML = """<!doctype html>
<html lang="{{ language }}"><head><meta charset="utf-8"><title>{{ title }}</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: auto">
<h1 style="font-size: 1.3em">{{ title }}</h1>
<p>{{ body }}</p>
{% if unsubscribe_url %}<p style="font-size: 0.8em; color: #666">
<a href="{{ unsubscribe_url }}">{{ unsubscribe_label }}</a></p>{% endif %}
</body></html>
"""
_UNSUBSCRIBE = {Language.en: "Unsubscribe from offers", Language.hi: "ऑफ़र ईमेल बंद करें"}


@functools.cache
def _compiled() -> tuple[dict[tuple[str, Language], tuple[Template, Template]], Template]:
    """The templates, compiled on first use: only the notifications replica renders, and every
    other process that imports the tables need not load Jinja."""
    from jinja2 import Environment, StrictUndefined

    text = Environment(undefined=StrictUndefined, autoescape=False)  # noqa: S701 (not HTML)
    html = Environment(undefined=StrictUndefined, autoescape=True)
    compiled = {
        (kind, language): (text.from_string(title), text.from_string(body))
        for kind, languages in TEMPLATES.items()
        for language, (title, body) in languages.items()
    }
    return compiled, html.from_string(_EMAIL_HTML)


@dataclass(frozen=True)
class Content:
    """A message rendered for one recipient: every channel takes what it needs."""

    title: str
    body: str
    html: str  # email only: the autoescaped page

    def as_dict(self) -> dict[str, str]:
        return {"title": self.title, "body": self.body, "html": self.html}


def render(
    kind: str, language: Language, context: dict[str, Any], unsubscribe_url: str | None = None
) -> Content:
    """Render a kind's template (KeyError for an unknown kind; a missing context variable is
    an error, never a blank in a customer's message)."""
    compiled, email = _compiled()
    title_t, body_t = compiled[(kind, language)]
    title, body = title_t.render(context).strip(), body_t.render(context).strip()
    html = email.render(
        language=language.value,
        title=title,
        body=body,
        unsubscribe_url=unsubscribe_url,
        unsubscribe_label=_UNSUBSCRIBE[language],
    )
    return Content(title=title, body=body, html=html)


def rupees(paise: int) -> str:
    """₹ with paise only when there are some (₹249, ₹249.50)."""
    whole, part = divmod(paise, 100)
    return f"₹{whole:,}" if part == 0 else f"₹{whole:,}.{part:02d}"


def order_ref(order_id: Any) -> str:
    """The short reference customers and staff read out (the id's first 8 hex digits)."""
    return str(order_id).replace("-", "")[:8].upper()
