"""Pure order rules, no database: the transition table and who may use it, and what a cart
keeps after checkout (`models.carts.consume`)."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.carts import CartLine, CartState, consume
from models.errors import AppError
from models.orders import ACTOR_TARGETS, DELIVERY_TARGETS, TRANSITIONS, Status, check_transition

ACTORS = ["customer", "staff", "ops", "admin", "delivery", "system", "gateway", "partner", "nobody"]
TERMINAL = [Status.cancelled, Status.refunded, Status.returned]


def outcome(current: Status, target: Status, actor: str, reason: str | None = "audited") -> tuple[int, str] | None:
    try:
        check_transition(current, target, actor, reason)
    except AppError as exc:
        return exc.status_code, exc.code
    return None


# ---------------------------------------------------------------- the transition table


def test_every_status_has_a_row():
    assert set(TRANSITIONS) == set(Status)
    for targets in TRANSITIONS.values():
        assert targets <= set(Status)


@pytest.mark.parametrize(
    "current, target, actor", list(itertools.product(list(Status), list(Status), ACTORS))
)
def test_check_transition_allows_exactly_table_and_actor(current, target, actor):
    result = outcome(current, target, actor)
    may_ask = target in ACTOR_TARGETS.get(actor, frozenset())
    in_table = target in TRANSITIONS[current]
    if may_ask and in_table:
        assert result is None
    elif not may_ask:
        # Who asks is checked first: a customer asking for `confirmed` is forbidden, whatever
        # the order's status.
        assert result == (403, "forbidden_transition")
    else:
        assert result == (409, "invalid_transition")


def test_invalid_transition_says_what_is_allowed():
    with pytest.raises(AppError) as err:
        check_transition(Status.delivered, Status.cancelled, "staff")
    assert err.value.code == "invalid_transition"
    assert err.value.extra["current_status"] == "delivered"
    assert err.value.extra["allowed"] == sorted(TRANSITIONS[Status.delivered])


@pytest.mark.parametrize("terminal", TERMINAL)
@pytest.mark.parametrize("actor", ACTORS)
def test_terminal_states_have_no_way_out(terminal, actor):
    assert TRANSITIONS[terminal] == frozenset()
    for target in Status:
        assert outcome(terminal, target, actor) is not None


def test_nothing_returns_to_pending_payment():
    for current in Status:
        assert Status.pending_payment not in TRANSITIONS[current]
        assert outcome(current, Status.pending_payment, "system") == (409, "invalid_transition")


@pytest.mark.parametrize("current", list(Status))
def test_a_customer_can_only_cancel(current):
    for target in Status:
        result = outcome(current, target, "customer")
        if target != Status.cancelled:
            assert result == (403, "forbidden_transition")
        elif target in TRANSITIONS[current]:
            assert result is None
        else:
            assert result == (409, "invalid_transition")


@pytest.mark.parametrize("actor", ["customer", "staff", "ops", "admin", "delivery", "system", "gateway"])
def test_out_for_delivery_cannot_be_cancelled(actor):
    assert outcome(Status.out_for_delivery, Status.cancelled, actor) is not None
    # ... and neither can anything after it.
    for later in (Status.delivered, Status.partially_refunded, Status.refunded, Status.delivery_failed):
        assert outcome(later, Status.cancelled, actor) is not None


def test_customer_cancels_until_the_order_leaves_the_store():
    cancellable = {s for s in Status if outcome(s, Status.cancelled, "customer") is None}
    assert cancellable == {
        Status.pending_payment,
        Status.payment_failed,
        Status.placed,
        Status.confirmed,
        Status.packed,
    }


def test_staff_pack_and_the_delivery_service_delivers():
    path = [Status.placed, Status.confirmed, Status.packed, Status.out_for_delivery, Status.delivered]
    for current, target in itertools.pairwise(path):
        who = "staff" if target in (Status.confirmed, Status.packed) else "delivery"
        assert outcome(current, target, who) is None
    # Once delivery drives them, the store no longer sets them by hand.
    for current, target in itertools.pairwise(path[2:]):
        assert outcome(current, target, "staff") == (403, "forbidden_transition")
    assert outcome(Status.confirmed, Status.packed, "delivery") == (403, "forbidden_transition")
    # Staff never place or refund: those are payment facts.
    assert outcome(Status.pending_payment, Status.placed, "staff") == (403, "forbidden_transition")
    assert outcome(Status.delivered, Status.refunded, "staff") == (403, "forbidden_transition")


@pytest.mark.parametrize("actor", ["ops", "admin"])
@pytest.mark.parametrize("target", sorted(DELIVERY_TARGETS))
def test_ops_override_what_delivery_drives_only_with_a_reason(actor, target):
    current = next(s for s in Status if target in TRANSITIONS[s])
    assert outcome(current, target, actor, reason=None) == (422, "reason_required")
    assert outcome(current, target, actor, reason="partner's phone died; called the customer") is None
    # ... and the store's own moves need none.
    assert outcome(Status.placed, Status.confirmed, actor, reason=None) is None


def test_a_failed_delivery_comes_back_and_ends_there():
    assert TRANSITIONS[Status.out_for_delivery] == {Status.delivered, Status.delivery_failed}
    assert TRANSITIONS[Status.delivery_failed] == {Status.returned}
    assert outcome(Status.out_for_delivery, Status.delivery_failed, "delivery") is None
    assert outcome(Status.delivery_failed, Status.returned, "delivery") is None
    for actor in ("customer", "staff"):
        assert outcome(Status.delivery_failed, Status.cancelled, actor) is not None


def test_every_status_is_reachable_from_checkout():
    seen = {Status.pending_payment, Status.placed}
    frontier = list(seen)
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(Status)


# ---------------------------------------------------------------- the cart after checkout

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PRODUCTS = [uuid.UUID(int=i) for i in range(1, 6)]
USER = uuid.UUID(int=99)
ADDRESS = uuid.UUID(int=77)


def cart_of(quantities: dict[uuid.UUID, int], coupon: str | None, at: datetime) -> CartState:
    return CartState(
        user_id=USER,
        lines=[
            CartLine(product_id=pid, quantity=q, added_at=T0 + timedelta(seconds=i))
            for i, (pid, q) in enumerate(quantities.items())
        ],
        coupon_code=coupon,
        address_id=ADDRESS,
        updated_at=at,
    )


quantities_st = st.dictionaries(st.sampled_from(PRODUCTS), st.integers(1, 9), min_size=1, max_size=5)
coupons_st = st.sampled_from([None, "SAVE50", "FIRST"])


def as_dict(state: CartState) -> dict[uuid.UUID, int]:
    return {line.product_id: line.quantity for line in state.lines}


@given(quantities_st, coupons_st)
def test_unchanged_cart_is_emptied_but_keeps_its_address(quantities, coupon):
    snapshot = cart_of(quantities, coupon, T0)
    now = T0 + timedelta(minutes=1)
    after = consume(snapshot, snapshot.model_copy(deep=True), now)
    assert after.lines == []
    assert after.coupon_code is None
    assert after.address_id == ADDRESS
    assert after.user_id == USER
    assert after.updated_at == now


@given(
    ordered=quantities_st,
    ordered_coupon=coupons_st,
    extra=st.dictionaries(st.sampled_from(PRODUCTS), st.integers(-9, 9), max_size=5),
    coupon=coupons_st,
)
def test_changed_cart_loses_only_what_was_ordered(ordered, ordered_coupon, extra, coupon):
    """The customer changed the cart while checkout ran: quantities added later stay, lines
    reduced below what was ordered go, and the coupon goes only if it was the ordered one."""
    current_q = {pid: q for pid in PRODUCTS if (q := ordered.get(pid, 0) + extra.get(pid, 0)) > 0}
    snapshot = cart_of(ordered, ordered_coupon, T0)
    current = cart_of(current_q, coupon, T0 + timedelta(seconds=30))
    now = T0 + timedelta(minutes=1)
    after = consume(current, snapshot, now)
    expected = {pid: q - ordered.get(pid, 0) for pid, q in current_q.items() if q > ordered.get(pid, 0)}
    assert as_dict(after) == expected
    # Kept lines keep their place in the cart and when they were first added.
    kept = [line for line in current.lines if line.product_id in expected]
    assert [(a.product_id, a.added_at) for a in after.lines] == [(k.product_id, k.added_at) for k in kept]
    assert after.coupon_code == (None if coupon == ordered_coupon else coupon)
    assert after.address_id == ADDRESS
    assert after.updated_at == now


def test_later_addition_survives_checkout():
    a, b = PRODUCTS[:2]
    snapshot = cart_of({a: 2}, "SAVE50", T0)
    current = cart_of({a: 3, b: 1}, "SAVE50", T0 + timedelta(seconds=5))
    after = consume(current, snapshot, T0 + timedelta(seconds=10))
    assert as_dict(after) == {a: 1, b: 1}
    assert after.coupon_code is None


def test_coupon_changed_meanwhile_is_kept():
    a = PRODUCTS[0]
    snapshot = cart_of({a: 1}, "SAVE50", T0)
    current = cart_of({a: 1}, "FIRST", T0 + timedelta(seconds=5))
    after = consume(current, snapshot, T0 + timedelta(seconds=10))
    assert after.lines == []
    assert after.coupon_code == "FIRST"
