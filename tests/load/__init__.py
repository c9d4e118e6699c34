"""Load tests of real journeys with locust (`make load`; a 10-second smoke run in `make test`).

`locustfile.py` holds the simulated people; `run.py` runs it headless in a subprocess (locust's
gevent patches the standard library, so it is never imported by pytest or the runner) and
judges the result against k8s/slo.yaml. The step names below are shared by both: the
locustfile names its requests with them, the runner groups and judges its table by them.
"""

from __future__ import annotations

# Each journey's steps in the order the table shows them (the locust request names).
JOURNEYS: dict[str, tuple[str, ...]] = {
    "login": ("otp", "outbox", "verify", "refresh", "device"),
    "customer": ("address", "nearby", "browse", "search", "cart", "checkout", "pay", "track", "position", "cancel"),
    "partner": ("attach", "shift", "positions", "offers", "decline", "accept", "at_store", "picked_up",
                "arrived", "deliver", "fail", "offline"),
    "staff": ("grant", "store queue", "confirm", "pack"),
    "admin": ("stores", "catalog", "restock", "board", "partners", "store orders"),
}  # fmt: skip

# What a run must have done at least once for each journey to count as exercised.
KEY_STEPS: dict[str, tuple[str, ...]] = {
    "customer": ("nearby", "browse", "search", "cart", "checkout", "pay", "track"),
    "partner": ("shift", "positions", "offers", "accept", "deliver"),
    "staff": ("confirm", "pack"),
    "admin": ("board", "partners", "store orders"),
}

# Which objective of k8s/slo.yaml judges a step: placing and paying an order are `checkout`,
# the tracking socket (time to the first message, and a partner's position reaching it) is
# `tracking`, every other request `api`.
CHECKOUT_STEPS = frozenset({"checkout", "pay"})
TRACKING_STEPS = frozenset({"track", "position"})


def tier(step: str) -> str:
    """The SLO section (`checkout`, `tracking` or `api`) a step is judged against."""
    if step in CHECKOUT_STEPS:
        return "checkout"
    if step in TRACKING_STEPS:
        return "tracking"
    return "api"


def journey(step: str) -> str:
    return next((name for name, steps in JOURNEYS.items() if step in steps), "other")
