"""The seed catalog's pure rules: cleaning the Online Retail transactions, pricing in paise,
categories, brands, units, staples, stores and stock. No database; the real dataset vendored in
pipelines/data/online_retail is read for the whole-catalog checks."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from functools import cache

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.products import GST_SLABS_BP
from pipelines import catalog
from pipelines.seed import DEMO_CUSTOMERS

COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "UnitPrice", "CustomerID")


def transactions(*rows: tuple[str, str, str | None, int, float, float | None]) -> pa.Table:
    columns = list(zip(*rows, strict=True))
    table = pa.table(
        {
            "InvoiceNo": pa.array(columns[0], pa.string()),
            "StockCode": pa.array(columns[1], pa.string()),
            "Description": pa.array(columns[2], pa.string()),
            "Quantity": pa.array(columns[3], pa.int64()),
            "InvoiceDate": pa.array([datetime(2011, 1, 1)] * len(rows), pa.timestamp("us")),
            "UnitPrice": pa.array(columns[4], pa.float64()),
            "CustomerID": pa.array(columns[5], pa.float64()),
        }
    )
    return table


@cache
def real_products() -> tuple[catalog.ProductDef, ...]:
    return tuple(catalog.build_products(catalog.read_source(catalog.DEFAULT_PARQUET)))


def test_cleaning_drops_cancellations_charges_and_bad_rows():
    items = catalog.aggregate(
        transactions(
            ("536365", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", 6, 2.55, 17850.0),
            ("C536379", "22556", "PLASTERS IN TIN CIRCUS PARADE", -12, 1.65, 14527.0),  # cancellation
            ("C536380", "22557", "PLASTERS IN TIN VINTAGE PAISLEY", 12, 1.65, 14527.0),  # C prefix
            ("536381", "22558", "CLOTHES PEGS RETROSPOT PACK 24", 0, 1.49, 14527.0),  # quantity 0
            ("536382", "22559", "SEASIDE FLYING DISC", -3, 1.25, 14527.0),  # returned
            ("536383", "22560", "TRADITIONAL MODELLING CLAY", 5, 0.0, 14527.0),  # free
            ("536384", "22561", "WOODEN BOOMERANG", 5, -11.06, 14527.0),  # adjustment
            ("536385", "22562", "MONSTERS CLOCK", 2, 3.75, None),  # no customer
            ("536386", "22563", None, 2, 3.75, 14527.0),  # no description
            ("536387", "POST", "POSTAGE", 3, 18.0, 12583.0),
            ("536388", "DOT", "DOTCOM POSTAGE", 1, 569.77, 14096.0),
            ("536389", "M", "Manual", 1, 2.55, 14096.0),
            ("536390", "BANK CHARGES", "Bank Charges", 1, 15.0, 14096.0),
            ("536391", "AMAZONFEE", "AMAZON FEE", 1, 13541.33, 14096.0),
            ("536392", "DCGS0003", "BOXED GLASS ASHTRAY", 1, 2.46, 14096.0),
            ("536393", "gift_0001_20", "Dotcomgiftshop Gift Voucher £20.00", 1, 17.02, 14096.0),
            ("536394", "23444", "Next Day Carriage", 1, 15.0, 14096.0),  # a charge with a product code
        )
    )
    assert [i.sku for i in items] == ["85123A"]
    assert items[0].description == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert items[0].typical_gbp == 2.55 and items[0].max_gbp == 2.55 and items[0].order_lines == 1


def test_codes_merge_case_insensitively_and_the_commonest_description_and_price_win():
    items = catalog.aggregate(
        transactions(
            ("1", "35809a", "ENAMEL PINK TEA CONTAINER", 1, 4.13, 1.0),
            ("2", "35809A", "ENAMEL  PINK  TEA CONTAINER ", 2, 4.21, 2.0),
            ("3", "35809A", "enamel pink tea container", 1, 4.13, 3.0),
            ("4", "35809A", "PINK ENAMEL CONTAINER", 1, 8.50, 4.0),
            # Ties: the alphabetically first description and the lower price.
            ("5", "22222", "B NAME", 1, 2.0, 1.0),
            ("6", "22222", "A NAME", 1, 1.0, 1.0),
        )
    )
    by_sku = {i.sku: i for i in items}
    assert set(by_sku) == {"35809A", "22222"}
    enamel = by_sku["35809A"]
    assert enamel.description == "ENAMEL PINK TEA CONTAINER"
    assert enamel.typical_gbp == 4.13 and enamel.max_gbp == 8.50 and enamel.order_lines == 4
    assert by_sku["22222"].description == "A NAME" and by_sku["22222"].typical_gbp == 1.0


def test_is_product_code():
    for code in ("85123A", "22423", "15056BL", " 35809a "):
        assert catalog.is_product_code(code), code
    for code in (
        "POST",
        "D",
        "M",
        "m",
        "C2",
        "DOT",
        "CRUK",
        "PADS",
        "B",
        "S",
        "BANK CHARGES",
        "DCGS0076",
        "1234",
    ):
        assert not catalog.is_product_code(code), code


def test_price_conversion_rule():
    # 1 GBP = 105 INR; selling price rounded half-up to whole rupees.
    assert catalog.selling_price_paise(1.65) == 17300  # 173.25 rupees
    assert catalog.selling_price_paise(2.55) == 26800  # 267.75 rupees
    assert catalog.selling_price_paise(0.001) == 100  # never below one rupee
    # MRP: the highest observed, capped at 1.5x the selling price, rounded up to whole rupees.
    assert catalog.mrp_paise(4.21, 17300) == 26000  # 442.05 capped at 259.50
    assert catalog.mrp_paise(1.69, 17300) == 17800  # 177.45 -> 178
    assert catalog.mrp_paise(1.00, 17300) == 17300  # never below the selling price


@given(
    typical=st.decimals(min_value=Decimal("0.01"), max_value=Decimal(5000), places=2),
    extra=st.decimals(min_value=Decimal(0), max_value=Decimal(20000), places=2),
)
def test_prices_are_whole_rupees_in_paise_and_mrp_is_bounded(typical: Decimal, extra: Decimal):
    price = catalog.selling_price_paise(typical)
    mrp = catalog.mrp_paise(typical + extra, price)
    assert isinstance(price, int) and isinstance(mrp, int)
    assert price >= 100 and price % 100 == 0 and mrp % 100 == 0
    assert price <= mrp <= math.ceil(price * 1.5 / 100) * 100
    assert abs(price - float(typical) * 105 * 100) <= 100  # within a rupee of the exact rate


def test_category_tree_shape():
    tree = catalog.category_tree()
    slugs = [c.slug for c in tree]
    assert len(slugs) == len(set(slugs))
    parents = {c.slug for c in tree if c.parent_slug is None}
    children = [c for c in tree if c.parent_slug is not None]
    assert len(parents) >= 10 and len(children) >= 30
    assert all(c.parent_slug in parents for c in children)
    assert all(any(c.parent_slug == p for c in children) for p in parents)  # no empty parents
    for parent in parents:
        positions = [c.position for c in children if c.parent_slug == parent]
        assert sorted(positions) == list(range(len(positions)))
    assert all(c.tax_rate_bp in GST_SLABS_BP for c in tree)
    child_slugs = {c.slug for c in children}
    assert {slug for slug, _ in catalog.CATEGORY_RULES} <= child_slugs
    assert catalog.OTHER_SLUG in child_slugs
    assert all(len(k.split()) <= 3 for _, keywords in catalog.CATEGORY_RULES for k in keywords)


@pytest.mark.parametrize(
    ("description", "slug"),
    [
        ("WHITE HANGING HEART T-LIGHT HOLDER", "candles-holders"),
        ("60 CAKE CASES VINTAGE CHRISTMAS", "christmas"),
        ("PACK OF 72 RETROSPOT CAKE CASES", "cake-baking"),
        ("PARTY BUNTING", "party-supplies"),
        ("LUNCH BAG RED RETROSPOT", "bags-wallets"),
        ("RED RETROSPOT GIFT BAG", "gift-wrap"),
        ("WHITE METAL LANTERN", "lights-lanterns"),
        ("REGENCY CAKESTAND 3 TIER", "tableware"),
        ("ROSES REGENCY TEACUP AND SAUCER", "mugs-cups"),
        ("SET OF 3 REGENCY CAKE TINS", "cake-baking"),
        ("JAM MAKING SET WITH JARS", "kitchen-storage"),
        ("ALARM CLOCK BAKELIKE RED", "clocks"),
        ("SPACEBOY BIRTHDAY CARD", "party-supplies"),
        ("GLASS STAR FROSTED T-LIGHT HOLDER", "candles-holders"),
        ("DIAMANTE HAIR GRIP PACK/2 PERIDOT", "hair-accessories"),
        ("SILVER M.O.P ORBIT NECKLACE", "jewellery"),
        ("RED RETROSPOT TEA TOWEL", "kitchen-linen-tools"),
        ("HEART OF WICKER SMALL", "hanging-decor"),
        ("CHOCOLATE CALCULATOR", "other-gifts"),
    ],
)
def test_category_assignment(description: str, slug: str):
    assert catalog.assign_category(description) == slug
    assert catalog.assign_category(description.lower()) == slug  # case does not matter


def test_keywords_match_whole_words_only():
    # "RING" is jewellery but "EARRING"-like substrings and "STRING" are not.
    assert catalog.assign_category("50CM METAL STRING WITH 7 CLIPS") == "other-gifts"
    assert catalog.assign_category("KEY RING BAROQUE") == "bags-wallets"


def test_brand_unit_and_name_rules():
    assert catalog.derive_brand("LUNCH BAG RED RETROSPOT") == "Retrospot"
    assert catalog.derive_brand("DOLLY GIRL LUNCH BOX") == "Dolly Girl"
    assert catalog.derive_brand("WHITE HANGING HEART T-LIGHT HOLDER") is None
    assert catalog.derive_unit("SET OF 6 SPICE TINS PANTRY DESIGN") == "set of 6"
    assert catalog.derive_unit("DIAMANTE HAIR GRIP PACK/2 PERIDOT") == "pack of 2"
    assert catalog.derive_unit("S/12 MINI RABBIT EASTER") == "set of 12"
    assert catalog.derive_unit("PICNIC BASKET WICKER 60 PIECES") == "60 pcs"
    assert catalog.derive_unit("HEART OF WICKER SMALL") == "1 pc"
    assert catalog.title_case("SET OF 6  T-LIGHT HOLDERS ") == "Set of 6 T-Light Holders"
    assert catalog.title_case("POTTING SHED SOW 'N' GROW SET") == "Potting Shed Sow 'n' Grow Set"
    assert catalog.title_case("OF MICE AND MEN") == "Of Mice and Men"


def test_product_from_source_applies_every_rule():
    product = catalog.product_from_source(
        catalog.SourceItem("22384", "LUNCH BAG PINK POLKADOT", typical_gbp=1.65, max_gbp=5.06, order_lines=9)
    )
    assert product.sku == "22384" and product.name == "Lunch Bag Pink Polkadot"
    assert product.category_slug == "bags-wallets" and product.tax_rate_bp == 1800
    assert product.brand == "Polkadot" and product.unit == "1 pc"
    assert product.price_paise == 17300 and product.mrp_paise == 26000
    assert product.image_path == "products/22384.jpg"
    assert product.description.startswith("Lunch Bag Pink Polkadot.")


def test_whole_catalog_is_valid_and_deterministic():
    products = real_products()
    assert len(products) >= 3000
    assert tuple(catalog.build_products(catalog.read_source(catalog.DEFAULT_PARQUET))) == products
    skus = [p.sku for p in products]
    assert len(skus) == len(set(skus)) and skus == sorted(skus)
    slugs = {c.slug for c in catalog.category_tree() if c.parent_slug}
    for p in products:
        assert 0 < len(p.sku) <= 32 and 0 < len(p.name) <= 200 and len(p.unit) <= 40
        assert p.brand is None or 0 < len(p.brand) <= 80
        assert 0 < p.price_paise <= p.mrp_paise and p.price_paise % 100 == 0
        assert p.tax_rate_bp in GST_SLABS_BP and p.category_slug in slugs
    used = {p.category_slug for p in products}
    assert len(used) >= 30  # the rules spread the catalog over the tree
    other = sum(p.category_slug == catalog.OTHER_SLUG for p in products)
    assert other < len(products) * 0.2
    assert sum(p.brand is not None for p in products) >= 300
    # No charges or fees slipped through as products.
    assert not any(catalog.is_non_product_description(p.name) for p in products)


def test_demo_staples_are_separate_and_cover_the_basics():
    staples = catalog.staple_products()
    names = " ".join(p.name.lower() for p in staples)
    for word in ("banana", "milk", "bread", "eggs", "rice", "atta", "onion", "dal"):
        assert word in names, word
    for p in staples:
        assert p.staple and p.sku.startswith("STP-") and not catalog.is_product_code(p.sku)
        assert 0 < p.price_paise <= p.mrp_paise and p.tax_rate_bp in GST_SLABS_BP
    assert {p.sku for p in staples} <= {p.sku for p in real_products()}


def haversine_km(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    dlat, dlng = math.radians(lat2 - lat1) / 2, math.radians(lng2 - lng1) / 2
    a = (
        math.sin(dlat) ** 2
        + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2)) * math.sin(dlng) ** 2
    )
    return 2 * 6371.0 * math.asin(math.sqrt(a))


def test_stores_are_in_bengaluru_and_serve_the_demo_customers():
    stores = catalog.STORES
    assert len(stores) >= 3 and len({s.code for s in stores}) == len(stores)
    for s in stores:
        assert 12.8 < s.lat < 13.1 and 77.5 < s.lng < 77.8 and 3 <= s.service_radius_km <= 5
    for demo in DEMO_CUSTOMERS:
        address = demo["address"]
        assert any(
            haversine_km(s.lat, s.lng, address.lat, address.lng) <= s.service_radius_km  # type: ignore[union-attr]
            for s in stores
        ), demo["name"]


def test_seeded_stock_is_deterministic_with_zero_and_low_stock():
    products = real_products()
    levels = [(p, catalog.seeded_stock(s.code, p)) for s in catalog.STORES for p in products]
    assert levels == [(p, catalog.seeded_stock(s.code, p)) for s in catalog.STORES for p in products]
    assert all(n >= 0 for _, n in levels)
    zero = sum(n == 0 for _, n in levels)
    low = sum(0 < n <= p.low_stock_threshold for p, n in levels)
    assert 0.04 * len(levels) < zero < 0.12 * len(levels)
    assert 0.06 * len(levels) < low < 0.2 * len(levels)
    assert all(n > 0 for p, n in levels if p.staple)  # the demo never runs out of bananas
    assert catalog.stable_hash("BLR-IND", "22384") == catalog.stable_hash("BLR-IND", "22384")
    assert catalog.stable_hash("BLR-IND", "22384") != catalog.stable_hash("BLR-KOR", "22384")
