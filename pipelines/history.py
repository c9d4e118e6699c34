"""Demo purchase histories: a few hundred Online Retail customers become demo customers whose
invoices are delivered orders, so the recommender has real histories to learn from and serve on a
fresh `make run`. The demo customers named in the banner (`seed.DEMO_CUSTOMERS`) take the
histories of the first customers picked.

Rules, deterministic for a given Parquet file:
- Sales cleaned as the catalog seed cleans them (`catalog._valid_sales`, product codes only),
  kept when the SKU is in the catalog.
- Customers: those with at least `MIN_INVOICES` invoices, ordered by a stable hash of their id;
  the first `HISTORY_CUSTOMERS` are imported as users with phones `+91900001xxxx`.
- An invoice becomes one delivered, prepaid order at the store the customer is assigned to (a
  stable hash), priced at today's catalog prices by the cart's own pricing rules, quantities
  capped at `MAX_QUANTITY` (the data's wholesale quantities are not a grocery basket).
- Dates keep their spacing, moved so that the last invoice of the data falls `RECENT_DAYS` ago:
  the histories look current, as recency weighting expects.
- Order ids are derived from invoice numbers: importing again adds nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from config.settings import Settings
from models.carts import FeeRules, PriceInput, price_cart
from pipelines import catalog

HISTORY_CUSTOMERS = 300
MIN_INVOICES = 3
MAX_QUANTITY = 10
RECENT_DAYS = 1
PHONE_PREFIX = "+91900001"
_NAMESPACE = uuid.UUID("5d7a4f8e-2b1c-4e0f-9a3d-6c8b7e1f0a21")


@dataclass(frozen=True)
class Invoice:
    number: str
    customer: int
    at: datetime
    lines: dict[str, int]  # SKU -> quantity


def read_invoices(parquet: Path, skus: set[str]) -> list[Invoice]:
    """Cleaned invoices (sales of catalog SKUs), in the data's order."""
    import pyarrow.parquet as pq

    table = catalog._valid_sales(
        pq.read_table(
            parquet,
            columns=[
                "InvoiceNo",
                "StockCode",
                "Description",
                "Quantity",
                "UnitPrice",
                "CustomerID",
                "InvoiceDate",
            ],
        )
    )
    invoices: dict[str, Invoice] = {}
    for number, code, quantity, customer, at in zip(
        table["InvoiceNo"].to_pylist(),
        table["StockCode"].to_pylist(),
        table["Quantity"].to_pylist(),
        table["CustomerID"].to_pylist(),
        table["InvoiceDate"].to_pylist(),
        strict=True,
    ):
        sku = code.strip().upper()
        if sku not in skus:
            continue
        invoice = invoices.get(number)
        if invoice is None:
            invoice = invoices[number] = Invoice(number, int(customer), at.replace(tzinfo=UTC), {})
        invoice.lines[sku] = invoice.lines.get(sku, 0) + int(quantity)
    return list(invoices.values())


def pick_customers(invoices: list[Invoice], count: int = HISTORY_CUSTOMERS) -> list[int]:
    """Customers with enough invoices, in a stable pseudo-random order, the first `count`."""
    per_customer: dict[int, int] = defaultdict(int)
    for invoice in invoices:
        per_customer[invoice.customer] += 1
    eligible = [c for c, n in per_customer.items() if n >= MIN_INVOICES]
    return sorted(eligible, key=lambda c: (catalog.stable_hash("history", str(c)), c))[:count]


def history_phone(index: int) -> str:
    return f"{PHONE_PREFIX}{index:04d}"


_PRODUCTS = text(
    "SELECT sku, id, name, unit, images->>0 AS image, price_paise, mrp_paise, tax_rate_bp FROM products"
)

_UPSERT_USERS = text(
    """
    INSERT INTO users (id, phone, name, role, is_active)
    SELECT gen_random_uuid(), phone, name, 'customer', true
    FROM unnest(CAST(:phones AS text[]), CAST(:names AS text[])) AS t(phone, name)
    ON CONFLICT (phone) DO NOTHING
    """
)


async def import_histories(
    session: AsyncSession, settings: Settings, *, parquet: Path, demo_phones: list[str]
) -> int:
    """Import the picked customers' invoices as delivered orders (only flushes). Returns how
    many orders were added (0 when they are all there already)."""
    imported = await session.scalar(
        text("SELECT count(*) FROM users WHERE phone LIKE :p"), {"p": PHONE_PREFIX + "%"}
    )
    if imported >= HISTORY_CUSTOMERS - len(demo_phones):
        return 0  # in place already (reading the Parquet file again would find nothing new)
    products = {r.sku: r for r in (await session.execute(_PRODUCTS)).all()}
    stores = (await session.execute(text("SELECT id, lat, lng, city FROM stores ORDER BY code"))).all()
    if not products or not stores:
        return 0
    invoices = await asyncio.to_thread(read_invoices, parquet, set(products))
    customers = pick_customers(invoices)
    phones = {
        c: demo_phones[i] if i < len(demo_phones) else history_phone(i) for i, c in enumerate(customers)
    }
    await session.execute(
        _UPSERT_USERS,
        {"phones": list(phones.values()), "names": [f"Customer {c}" for c in phones]},
    )
    rows = await session.execute(
        text("SELECT phone, id FROM users WHERE phone = ANY(:p)"), {"p": list(phones.values())}
    )
    user_ids: dict[str, uuid.UUID] = {phone: uid for phone, uid in rows}
    last = max(i.at for i in invoices)
    shift = (datetime.now(UTC) - timedelta(days=RECENT_DAYS)).date() - last.date()
    rules = FeeRules.from_settings(settings)
    orders: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    sequence: dict[int, int] = defaultdict(int)
    for invoice in invoices:
        if invoice.customer not in phones:
            continue
        store = stores[catalog.stable_hash("history-store", str(invoice.customer)) % len(stores)]
        at = invoice.at + shift
        sequence[invoice.customer] += 1
        order, order_lines = _order(invoice, products, rules, at, sequence[invoice.customer])
        order.update(
            user_id=user_ids[phones[invoice.customer]],
            store_id=store.id,
            delivery_address={
                "label": "home",
                "line1": "Demo address",
                "city": store.city,
                "lat": store.lat,
                "lng": store.lng,
            },
        )
        orders.append(order)
        lines += order_lines
    return await _insert(session, orders, lines)


def _order(
    invoice: Invoice, products: dict[str, Any], rules: FeeRules, at: datetime, seq: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    order_id = uuid.uuid5(_NAMESPACE, f"online-retail:{invoice.number}")
    skus = sorted(invoice.lines)
    inputs = [
        PriceInput(
            quantity=min(max(invoice.lines[s], 1), MAX_QUANTITY),
            unit_price_paise=products[s].price_paise,
            unit_mrp_paise=products[s].mrp_paise,
            tax_rate_bp=products[s].tax_rate_bp,
        )
        for s in skus
    ]
    priced = price_cart(inputs, None, rules)
    b = priced.breakdown
    order = {
        "id": order_id,
        "items_mrp_paise": b.items_mrp_paise,
        "subtotal_paise": b.subtotal_paise,
        "taxable_value_paise": b.taxable_value_paise,
        "gst_paise": b.gst_paise,
        "delivery_fee_paise": b.delivery_fee_paise,
        "small_cart_fee_paise": b.small_cart_fee_paise,
        "total_paise": b.total_paise,
        # Unique per customer, as a cart snapshot is: invoices can share a timestamp.
        "cart_version": at + timedelta(microseconds=seq),
        "created_at": at,
        "delivered_at": at + timedelta(minutes=20),
    }
    order_lines = [
        {
            "order_id": order_id,
            "product_id": products[s].id,
            "position": n,
            "name": products[s].name,
            "unit": products[s].unit,
            "image": products[s].image,
            "quantity": i.quantity,
            "unit_price_paise": i.unit_price_paise,
            "unit_mrp_paise": i.unit_mrp_paise,
            "tax_rate_bp": i.tax_rate_bp,
            "line_total_paise": p.line_total_paise,
            "taxable_value_paise": p.taxable_value_paise,
            "gst_paise": p.gst_paise,
        }
        for n, (s, i, p) in enumerate(zip(skus, inputs, priced.lines, strict=True))
    ]
    return order, order_lines


_INSERT_ORDERS = text(
    """
    INSERT INTO orders (id, user_id, store_id, delivery_address, status, version, payment_method,
                        currency, items_mrp_paise, subtotal_paise, coupon_discount_paise,
                        taxable_value_paise, gst_paise,
                        delivery_fee_paise, small_cart_fee_paise, tip_paise, total_paise, refunded_paise,
                        reservation, cart_version, created_at, updated_at, placed_at, delivered_at)
    VALUES (:id, :user_id, :store_id, CAST(:delivery_address AS jsonb), 'delivered', 1, 'online', 'INR',
            :items_mrp_paise, :subtotal_paise, 0, :taxable_value_paise, :gst_paise,
            :delivery_fee_paise, :small_cart_fee_paise, 0, :total_paise, 0,
            'fulfilled', :cart_version, :created_at, :delivered_at, :created_at, :delivered_at)
    ON CONFLICT (id) DO NOTHING
    """
)

_INSERT_LINES = text(
    """
    INSERT INTO order_lines (order_id, product_id, position, name, unit, image, quantity, unit_price_paise,
                             unit_mrp_paise, tax_rate_bp, line_total_paise, coupon_discount_paise,
                             taxable_value_paise, gst_paise)
    VALUES (:order_id, :product_id, :position, :name, :unit, :image, :quantity, :unit_price_paise,
            :unit_mrp_paise, :tax_rate_bp, :line_total_paise, 0, :taxable_value_paise, :gst_paise)
    ON CONFLICT DO NOTHING
    """
)

_INSERT_PAYMENTS = text(
    """
    INSERT INTO payments (id, order_id, method, status, currency, amount_paise, captured_paise, captured_at)
    SELECT gen_random_uuid(), o.id, 'online', 'captured', 'INR', o.total_paise, o.total_paise, o.placed_at
    FROM orders o WHERE o.id = ANY(:ids)
    ON CONFLICT (order_id) DO NOTHING
    """
)

_FIRST_ORDERS = text(
    """
    UPDATE users u SET first_order_at = f.first
    FROM (SELECT user_id, min(placed_at) AS first FROM orders WHERE id = ANY(:ids) GROUP BY user_id) f
    WHERE u.id = f.user_id AND (u.first_order_at IS NULL OR u.first_order_at > f.first)
    """
)


async def _insert(session: AsyncSession, orders: list[dict[str, Any]], lines: list[dict[str, Any]]) -> int:
    existing = set(
        await session.scalars(
            text("SELECT id FROM orders WHERE id = ANY(:ids)"), {"ids": [o["id"] for o in orders]}
        )
    )
    fresh = [
        {**o, "delivery_address": json.dumps(o["delivery_address"])}
        for o in orders
        if o["id"] not in existing
    ]
    if not fresh:
        return 0
    ids = [o["id"] for o in fresh]
    added = set(ids)
    await session.execute(_INSERT_ORDERS, fresh)
    await session.execute(_INSERT_LINES, [line for line in lines if line["order_id"] in added])
    await session.execute(_INSERT_PAYMENTS, {"ids": ids})
    await session.execute(_FIRST_ORDERS, {"ids": ids})
    return len(fresh)
