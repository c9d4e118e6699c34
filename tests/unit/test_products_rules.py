"""Pure catalog rules: store hours, price rules, cursors, availability, rating aggregates."""

import uuid
from datetime import UTC, datetime, time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from models.products import (
    InvalidCursor,
    Inventory,
    Product,
    ProductPatch,
    ReviewIn,
    Store,
    StoreIn,
    availability_of,
    decode_cursor,
    encode_cursor,
    is_open,
    price_errors,
    ratings_of,
)


def store(opens: str, closes: str, tz: str = "Asia/Kolkata") -> Store:
    return Store(opens_at=time.fromisoformat(opens), closes_at=time.fromisoformat(closes), timezone=tz)


def ist(hh: int, mm: int = 0) -> datetime:
    """A UTC instant whose Asia/Kolkata (UTC+5:30) wall clock reads hh:mm."""
    minutes = (hh * 60 + mm - 330) % (24 * 60)
    return datetime(2026, 1, 15, minutes // 60, minutes % 60, tzinfo=UTC)


@pytest.mark.parametrize(
    "opens, closes, at, expected",
    [
        ("07:00", "23:00", ist(7), True),
        ("07:00", "23:00", ist(22, 59), True),
        ("07:00", "23:00", ist(23), False),
        ("07:00", "23:00", ist(6, 59), False),
        ("22:00", "02:00", ist(23, 30), True),  # spans midnight
        ("22:00", "02:00", ist(1, 59), True),
        ("22:00", "02:00", ist(2), False),
        ("22:00", "02:00", ist(12), False),
        ("00:00", "00:00", ist(3), True),  # around the clock
    ],
)
def test_store_hours_in_local_time(opens, closes, at, expected):
    assert is_open(store(opens, closes), at) is expected


def test_store_hours_follow_the_store_timezone():
    at = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)  # 17:30 in Kolkata, 12:00 in London
    assert is_open(store("09:00", "13:00", "Europe/London"), at)
    assert not is_open(store("09:00", "13:00", "Asia/Kolkata"), at)


def test_price_rules_have_their_own_codes():
    assert price_errors(1000, 1000, 1800) == []
    assert [c for c, _ in price_errors(1000, 1001, 1800)] == ["price_above_mrp"]
    assert [c for c, _ in price_errors(1000, 1001, 1000)] == ["price_above_mrp", "invalid_gst_slab"]


@given(st.lists(st.text(max_size=50).filter(lambda s: "\x00" not in s), min_size=2, max_size=2))
def test_cursor_round_trips(key):
    assert decode_cursor(encode_cursor(*key), 2) == key


@pytest.mark.parametrize(
    "cursor", ["", "!!!", "bm90IGpzb24", encode_cursor("a"), encode_cursor("a", "b", "c")]
)
def test_malformed_cursors_are_invalid(cursor):
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor, 2)


def test_availability_and_low_stock():
    sid = uuid.uuid4()
    inv = Inventory(on_hand=10, reserved=3, low_stock_threshold=5)
    assert availability_of(sid, inv).model_dump() == {
        "store_id": sid,
        "available": 7,
        "in_stock": True,
        "low_stock": False,
    }
    low = availability_of(sid, Inventory(on_hand=5, reserved=0, low_stock_threshold=5))
    assert (low.available, low.in_stock, low.low_stock) == (5, True, True)
    sold_out = availability_of(sid, Inventory(on_hand=4, reserved=4, low_stock_threshold=5))
    assert (sold_out.available, sold_out.in_stock, sold_out.low_stock) == (0, False, False)
    unstocked = availability_of(sid, None)
    assert (unstocked.available, unstocked.in_stock) == (0, False)


def test_ratings_from_aggregates():
    p = Product(rating_count=3, rating_sum=11, r1=0, r2=0, r3=1, r4=1, r5=1)
    r = ratings_of(p)
    assert (r.average, r.count, r.histogram) == (3.67, 3, {"1": 0, "2": 0, "3": 1, "4": 1, "5": 1})
    assert ratings_of(Product(rating_count=0, rating_sum=0, r1=0, r2=0, r3=0, r4=0, r5=0)).average is None


@pytest.mark.parametrize(
    "model, data",
    [
        (ProductPatch, {"rating_count": 3}),
        (ProductPatch, {"search_vector": "x"}),
        (ProductPatch, {"sku": "NEW"}),
        (ReviewIn, {"rating": 3, "title": "a\x00b"}),
        (ReviewIn, {"rating": 6}),
        (
            StoreIn,
            {
                "code": "S1",
                "name": "n",
                "city": "c",
                "lat": 1,
                "lng": 1,
                "service_radius_km": 5,
                "opens_at": "07:00+05:30",
                "closes_at": "23:00",
            },
        ),
    ],
)
def test_inputs_reject_read_only_and_bad_fields(model, data):
    with pytest.raises(ValidationError):
        model(**data)
