"""Cart pricing rules (pure): property tests with hypothesis plus worked examples."""

from __future__ import annotations

import pickle
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from actors.carts import shard_index
from models.carts import (
    AddItem,
    ApplyCoupon,
    CouponFacts,
    CouponTerms,
    FeeRules,
    PriceInput,
    SetQuantity,
    allocate,
    contained_gst,
    coupon_discount,
    coupon_rejection,
    price_cart,
)
from models.products import GST_SLABS_BP

FEES = FeeRules(
    delivery_fee_paise=3000,
    free_delivery_threshold_paise=49900,
    small_cart_threshold_paise=9900,
    small_cart_fee_paise=1500,
)


@st.composite
def price_inputs(draw: st.DrawFn) -> PriceInput:
    price = draw(st.integers(min_value=1, max_value=5_000_000))
    mrp = draw(st.integers(min_value=price, max_value=price * 3))
    return PriceInput(
        quantity=draw(st.integers(min_value=1, max_value=20)),
        unit_price_paise=price,
        unit_mrp_paise=mrp,
        tax_rate_bp=draw(st.sampled_from(GST_SLABS_BP)),
    )


coupons = st.one_of(
    st.none(),
    st.builds(
        CouponTerms,
        kind=st.just("percent"),
        value=st.integers(min_value=1, max_value=10_000),
        max_discount_paise=st.one_of(st.none(), st.integers(min_value=1, max_value=10_000_000)),
        min_order_paise=st.integers(min_value=0, max_value=1_000_000),
    ),
    st.builds(
        CouponTerms,
        kind=st.just("flat"),
        value=st.integers(min_value=1, max_value=10_000_000),
        max_discount_paise=st.none(),
        min_order_paise=st.integers(min_value=0, max_value=1_000_000),
    ),
)
fee_rules = st.builds(
    FeeRules,
    delivery_fee_paise=st.integers(min_value=0, max_value=10_000),
    free_delivery_threshold_paise=st.integers(min_value=0, max_value=1_000_000),
    small_cart_threshold_paise=st.integers(min_value=0, max_value=100_000),
    small_cart_fee_paise=st.integers(min_value=0, max_value=5_000),
)


@given(st.lists(price_inputs(), max_size=12), coupons, fee_rules)
def test_breakdown_invariants(lines, coupon, rules):
    priced = price_cart(lines, coupon, rules)
    b = priced.breakdown
    # Nothing is negative.
    for name, value in b.model_dump().items():
        if name != "currency":
            assert value >= 0, name
    # The parts add up to the total, and the MRP view to the subtotal.
    assert b.total_paise == (
        b.subtotal_paise - b.coupon_discount_paise + b.delivery_fee_paise + b.small_cart_fee_paise
    )
    assert b.subtotal_paise == b.items_mrp_paise - b.mrp_savings_paise
    assert b.subtotal_paise == sum(line.unit_price_paise * line.quantity for line in lines)
    assert b.total_savings_paise == b.mrp_savings_paise + b.coupon_discount_paise
    # The discount never exceeds the cap nor the subtotal.
    assert b.coupon_discount_paise <= b.subtotal_paise
    if coupon is not None and coupon.max_discount_paise is not None:
        assert b.coupon_discount_paise <= coupon.max_discount_paise
    if coupon is None or b.subtotal_paise < coupon.min_order_paise:
        assert b.coupon_discount_paise == 0
    # Per-line figures are consistent with the totals.
    assert sum(p.line_total_paise for p in priced.lines) == b.subtotal_paise
    assert sum(p.coupon_discount_paise for p in priced.lines) == b.coupon_discount_paise
    assert sum(p.gst_paise for p in priced.lines) == b.gst_paise
    assert b.taxable_value_paise + b.gst_paise == b.subtotal_paise - b.coupon_discount_paise
    for line, p in zip(lines, priced.lines, strict=True):
        assert 0 <= p.coupon_discount_paise <= p.line_total_paise
        assert p.taxable_value_paise + p.gst_paise == p.line_total_paise - p.coupon_discount_paise
        assert p.gst_paise >= 0 and p.taxable_value_paise >= 0
        if line.tax_rate_bp == 0:
            assert p.gst_paise == 0


@given(st.lists(price_inputs(), min_size=1, max_size=8), coupons, fee_rules)
def test_fees_follow_thresholds(lines, coupon, rules):
    b = price_cart(lines, coupon, rules).breakdown
    value = b.subtotal_paise - b.coupon_discount_paise
    if value >= rules.free_delivery_threshold_paise:
        assert b.delivery_fee_paise == 0
    elif value > 0:
        assert b.delivery_fee_paise == rules.delivery_fee_paise
    if value >= rules.small_cart_threshold_paise:
        assert b.small_cart_fee_paise == 0
    elif value > 0:
        assert b.small_cart_fee_paise == rules.small_cart_fee_paise


@given(
    st.integers(min_value=0, max_value=10**9),
    st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=20),
)
def test_allocation_is_exact_and_bounded(amount, weights):
    amount = min(amount, sum(weights))
    shares = allocate(amount, weights)
    assert sum(shares) == amount
    assert all(0 <= s <= w for s, w in zip(shares, weights, strict=True))


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(GST_SLABS_BP))
def test_contained_gst_is_the_rounded_exact_share(amount, rate):
    gst = contained_gst(amount, rate)
    exact = amount * rate / (10_000 + rate)
    assert abs(gst - exact) <= 0.5 + 1e-6
    assert 0 <= gst <= amount


def test_empty_cart_costs_nothing():
    b = price_cart([], CouponTerms("flat", 5000, None, 0), FEES).breakdown
    assert b.total_paise == 0 and b.delivery_fee_paise == 0 and b.small_cart_fee_paise == 0


def test_worked_example_percent_coupon_with_cap():
    lines = [
        PriceInput(quantity=2, unit_price_paise=4500, unit_mrp_paise=5000, tax_rate_bp=500),  # 90.00
        PriceInput(quantity=1, unit_price_paise=29900, unit_mrp_paise=34900, tax_rate_bp=1800),  # 299.00
    ]
    coupon = CouponTerms("percent", 1500, 5000, 20000)  # 15 % up to 50.00 on 200.00+
    priced = price_cart(lines, coupon, FEES)
    b = priced.breakdown
    assert b.subtotal_paise == 38900
    assert b.items_mrp_paise == 44900 and b.mrp_savings_paise == 6000
    assert b.coupon_discount_paise == 5000  # 15 % is 58.35, capped at 50.00
    # 50.00 split 9000:29900 -> 1156.8 / 3843.1 -> floors 1156 + 3843 = 4999; the extra paise
    # goes to the larger remainder (the first line, .8 > .1).
    assert [p.coupon_discount_paise for p in priced.lines] == [1157, 3843]
    # GST contained: (9000-1157) * 5/105 = 373.48 -> 373; (29900-3843) * 18/118 = 3974.8 -> 3975
    assert [p.gst_paise for p in priced.lines] == [373, 3975]
    assert b.delivery_fee_paise == 3000  # 339.00 after discount < 499.00
    assert b.small_cart_fee_paise == 0
    assert b.total_paise == 38900 - 5000 + 3000


def test_percent_discount_rounds_down():
    assert coupon_discount(CouponTerms("percent", 1000, None, 0), 999) == 99  # 99.9 -> 99
    assert coupon_discount(CouponTerms("flat", 50000, None, 0), 30000) == 30000  # never above subtotal
    assert coupon_discount(CouponTerms("flat", 5000, None, 30000), 29999) == 0  # below minimum


def test_free_delivery_exactly_at_threshold_and_small_cart_fee_below_minimum():
    at = [PriceInput(quantity=1, unit_price_paise=49900, unit_mrp_paise=49900, tax_rate_bp=0)]
    assert price_cart(at, None, FEES).breakdown.delivery_fee_paise == 0
    below = [PriceInput(quantity=1, unit_price_paise=49899, unit_mrp_paise=49899, tax_rate_bp=0)]
    assert price_cart(below, None, FEES).breakdown.delivery_fee_paise == 3000
    tiny = [PriceInput(quantity=1, unit_price_paise=5000, unit_mrp_paise=5000, tax_rate_bp=0)]
    b = price_cart(tiny, None, FEES).breakdown
    assert (b.small_cart_fee_paise, b.delivery_fee_paise, b.total_paise) == (1500, 3000, 9500)


NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def facts(**kw) -> CouponFacts:
    base = dict(
        code="SAVE",
        terms=CouponTerms("flat", 5000, None, 20000),
        is_active=True,
        valid_from=NOW - timedelta(days=1),
        valid_until=NOW + timedelta(days=1),
        first_order_only=False,
        per_user_limit=1,
        total_limit=None,
        user_is_first_order=True,
        user_redemptions=0,
        total_redemptions=0,
    )
    return CouponFacts(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, subtotal, code",
    [
        ({}, 20000, None),
        ({"is_active": False}, 20000, "coupon_not_found"),
        ({"valid_from": NOW + timedelta(seconds=1)}, 20000, "coupon_not_started"),
        ({"valid_until": NOW}, 20000, "coupon_expired"),
        ({"total_limit": 3, "total_redemptions": 3}, 20000, "coupon_exhausted"),
        ({"first_order_only": True, "user_is_first_order": False}, 20000, "coupon_first_order_only"),
        ({"per_user_limit": 2, "user_redemptions": 2}, 20000, "coupon_usage_limit"),
        ({"per_user_limit": 2, "user_redemptions": 1}, 20000, None),
        ({}, 19999, "coupon_min_order"),
    ],
)
def test_coupon_rejection_codes(kw, subtotal, code):
    error = coupon_rejection(facts(**kw), subtotal, NOW)
    assert (error.code if error else None) == code
    if error is not None:  # errors cross actor boundaries
        assert pickle.loads(pickle.dumps(error)).code == code


def test_unknown_coupon_is_not_found():
    error = coupon_rejection(None, 10**6, NOW)
    assert error is not None and error.status_code == 404 and error.code == "coupon_not_found"


def test_min_order_error_says_the_shortfall():
    error = coupon_rejection(facts(), 15000, NOW)
    assert error is not None and error.extra == {"min_order_paise": 20000, "shortfall_paise": 5000}


def test_request_bodies_are_strict():
    with pytest.raises(ValidationError):
        AddItem.model_validate({"product_id": str(uuid.uuid4()), "quantity": 0})
    with pytest.raises(ValidationError):
        AddItem.model_validate({"product_id": str(uuid.uuid4()), "price_paise": 1})
    with pytest.raises(ValidationError):
        SetQuantity.model_validate({"quantity": 2, "user_id": str(uuid.uuid4())})
    assert ApplyCoupon.model_validate({"code": " save10 "}).code == "SAVE10"


def test_shard_index_is_stable_and_spread():
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    # Pinned values: a change of hash would move every live cart to another shard.
    assert [shard_index(uid, n) for n in (4, 7, 16)] == [3, 1, 15]
    counts = [0] * 4
    for _ in range(4000):
        counts[shard_index(uuid.uuid4(), 4)] += 1
    assert min(counts) > 800  # roughly uniform (expected 1000 each)
