"""Test fixtures shared by the service tests that need a shop: remote test stores (so no
other store is nearer), products with stock, customers with an address, cart helpers."""

from __future__ import annotations

import math
import random
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.conftest import Live, Session


@dataclass
class Shop:
    category_id: str
    store_a: dict[str, Any]
    store_b: dict[str, Any]


def _point() -> tuple[float, float]:
    # Somewhere in the southern Pacific: no seeded or other test store is near it.
    return round(random.uniform(-45, -20), 5), round(random.uniform(-150, -100), 5)


def make_store(live: Live, lat: float, lng: float) -> dict[str, Any]:
    sid, code = str(uuid.uuid4()), "T" + secrets.token_hex(6).upper()
    live.sql(
        "INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)"
        " VALUES (:id, :code, :name, 'Testville', :lat, :lng, 2, '00:00', '00:00')",
        id=sid,
        code=code,
        name=f"Store {code}",
        lat=lat,
        lng=lng,
    )
    return {"id": sid, "code": code, "lat": lat, "lng": lng}


def make_shop(live: Live, slug: str) -> Shop:
    """A test category and two stores far from everything else (and ~111 km apart)."""
    cid = str(uuid.uuid4())
    live.sql(
        "INSERT INTO categories (id, slug, name) VALUES (:id, :slug, :name)",
        id=cid,
        slug=f"{slug}-{secrets.token_hex(4)}",
        name=slug,
    )
    lat, lng = _point()
    return Shop(
        category_id=cid,
        store_a=make_store(live, lat, lng),
        store_b=make_store(live, lat + 1.0, lng),  # ~111 km north: a different store
    )


def make_product(
    live: Live,
    shop: Shop,
    *,
    price: int,
    mrp: int | None = None,
    tax_bp: int = 500,
    stock_a: int | None = 50,
    stock_b: int | None = None,
    reserved_a: int = 0,
    active: bool = True,
) -> str:
    pid = str(uuid.uuid4())
    live.sql(
        "INSERT INTO products (id, sku, name, category_id, mrp_paise, price_paise, tax_rate_bp, is_active)"
        " VALUES (:id, :sku, :name, :cid, :mrp, :price, :tax, :active)",
        id=pid,
        sku="CT-" + secrets.token_hex(8),
        name=f"Cart test product {pid[:8]}",
        cid=shop.category_id,
        mrp=mrp or price,
        price=price,
        tax=tax_bp,
        active=active,
    )
    for store, on_hand, reserved in ((shop.store_a, stock_a, reserved_a), (shop.store_b, stock_b, 0)):
        if on_hand is not None:
            set_stock(live, store, pid, on_hand, reserved)
    return pid


def set_stock(live: Live, store: dict[str, Any], pid: str, on_hand: int, reserved: int = 0) -> None:
    live.sql(
        "INSERT INTO inventory (store_id, product_id, on_hand, reserved) VALUES (:s, :p, :o, :r)"
        " ON CONFLICT (store_id, product_id) DO UPDATE SET on_hand = :o, reserved = :r",
        s=store["id"],
        p=pid,
        o=on_hand,
        r=reserved,
    )


def add_address(
    user: Session, store: dict[str, Any], *, default: bool = False, north_m: float = 0, east_m: float = 0
) -> str:
    """An address at the store, or `north_m` / `east_m` metres from it."""
    response = user.request(
        "POST",
        "/users/me/addresses",
        json={
            "line1": "1 Test Street",
            "city": "Testville",
            "pincode": "560001",
            "lat": store["lat"] + north_m / 111_000,
            "lng": store["lng"] + east_m / (111_000 * math.cos(math.radians(store["lat"]))),
            "is_default": default,
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def customer(live: Live, store: dict[str, Any]) -> Session:
    user = live.login()
    add_address(user, store)
    return user


def cart(user: Session) -> dict[str, Any]:
    response = user.request("GET", "/carts/me")
    assert response.status_code == 200, response.text
    return dict(response.json())


def add(user: Session, pid: str, quantity: int = 1) -> httpx.Response:
    return user.request("POST", "/carts/me/items", json={"product_id": pid, "quantity": quantity})


def line(view: dict[str, Any], pid: str) -> dict[str, Any]:
    return next(item for item in view["lines"] if item["product_id"] == pid)


def quantities(view: dict[str, Any]) -> dict[str, int]:
    return {item["product_id"]: item["quantity"] for item in view["lines"]}


def make_coupon(live: Live, **kw: Any) -> str:
    code = kw.pop("code", "CT" + secrets.token_hex(5).upper())
    values = {
        "kind": "flat",
        "value": 5000,
        "max_discount_paise": None,
        "min_order_paise": 0,
        "first_order_only": False,
        "per_user_limit": 1,
        "total_limit": None,
        "from_days": -1,
        "until_days": 1,
        "is_active": True,
        **kw,
    }
    live.sql(
        "INSERT INTO coupons (code, kind, value, max_discount_paise, min_order_paise, first_order_only,"
        " per_user_limit, total_limit, valid_from, valid_until, is_active) VALUES (:code, :kind, :value,"
        " :max_discount_paise, :min_order_paise, :first_order_only, :per_user_limit, :total_limit,"
        " now() + make_interval(days => :from_days),"
        " now() + make_interval(days => :until_days), :is_active)",
        code=code,
        **values,
    )
    return code
