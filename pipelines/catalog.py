"""The seed catalog: dark stores in Bengaluru, a category tree, products and per-store stock.

Products come from the UCI Online Retail transactions (a UK gift-ware retailer, prices in GBP;
see pipelines/data/online_retail/SOURCE.md), cleaned and priced in INR paise by the pure rules
below, plus a short, hand-written list of grocery staples (`DEMO_STAPLES`) so that the
quick-commerce demo has bananas and milk to sell. Every rule is deterministic: the same
Parquet file always yields the same rows, so `load_catalog` run twice changes nothing.

Rules, in one place:
- Cleaning (as SOURCE.md suggests): drop cancellations (InvoiceNo starting with "C"),
  Quantity <= 0, UnitPrice <= 0, rows without a CustomerID or a description, and every
  StockCode that is not a product code (`\\d{5}` plus up to three letters, upper-cased; this
  drops POST, DOT, M, BANK CHARGES, C2, CRUK, AMAZONFEE, PADS, B, S, D, DCGS..., gift_...).
- Name: the description a SKU was most often sold under, whitespace collapsed, title-cased.
- Prices: GBP -> INR at the fixed `GBP_TO_INR` rate. Selling price from the typical unit
  price (the price on most order lines), rounded half-up to whole rupees; MRP from the
  highest unit price observed, capped at `MRP_CAP` x the selling price (the data mixes
  wholesale and one-off prices), rounded up to whole rupees, never below the selling price.
- Category: the first rule in `CATEGORY_RULES` whose keyword appears in the description,
  else Other > Gifts & Novelties. GST slab: the category's.
- Brand: the dataset has none. A product line named in the description (Regency, Retrospot,
  Spaceboy...) becomes the brand; otherwise NULL. Staples carry a house brand.
- Stock: a stable hash of (store code, SKU) picks on-hand quantities (some zero, some at or
  below the low-stock threshold). The seed only creates missing inventory rows: stock is
  operational data that orders and admins change, so a restart never overwrites it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import time as clock
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from models.products import refresh_search_vectors

if TYPE_CHECKING:
    import pyarrow as pa

# Vendored with the package (package data), so an installed image seeds the same catalog.
DEFAULT_PARQUET = Path(__file__).resolve().parent / "data" / "online_retail" / "online_retail.parquet"

# Fixed conversion rate, INR per GBP (roughly the 2024-25 average). Fixed on purpose: the seed
# must not depend on the day it runs.
GBP_TO_INR = Decimal(105)
# MRP is at most 1.5x the selling price (a discount of at most a third).
MRP_CAP = Decimal("1.5")
RUPEE = Decimal(100)  # paise

# Codes in the data that are charges, fees or adjustments, not goods (SOURCE.md). The product
# code pattern excludes them already; listed so the intent is explicit.
NON_PRODUCT_CODES = frozenset(
    {"POST", "D", "M", "BANK CHARGES", "C2", "DOT", "CRUK", "AMAZONFEE", "PADS", "B", "S"}
)
PRODUCT_CODE = re.compile(r"\d{5}[A-Z]{0,3}")
# A few charges hide behind product-like codes ("NEXT DAY CARRIAGE", "PACKING CHARGE").
NON_PRODUCT_WORDS = (
    "CARRIAGE",
    "POSTAGE",
    "PACKING CHARGE",
    "BANK CHARGES",
    "AMAZON FEE",
    "MANUAL",
    "DISCOUNT",
    "ADJUST",
    "SAMPLES",
    "HIGH RESOLUTION IMAGE",
)


# --- category tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryDef:
    slug: str
    name: str
    parent_slug: str | None
    position: int
    tax_rate_bp: int


# (parent slug, parent name, [(child slug, child name, GST in basis points)]). Grocery first,
# as a quick-commerce app lists it. Slugs are globally unique.
_TREE: list[tuple[str, str, list[tuple[str, str, int]]]] = [
    (
        "fruits-vegetables",
        "Fruits & Vegetables",
        [("fresh-fruits", "Fresh Fruits", 0), ("fresh-vegetables", "Fresh Vegetables", 0)],
    ),
    (
        "dairy-bread-eggs",
        "Dairy, Bread & Eggs",
        [
            ("milk", "Milk", 0),
            ("bread-bakery", "Bread & Bakery", 0),
            ("eggs", "Eggs", 0),
            ("curd-paneer-butter", "Curd, Paneer & Butter", 500),
        ],
    ),
    (
        "atta-rice-dals",
        "Atta, Rice & Dals",
        [("rice", "Rice", 500), ("atta-flours", "Atta & Flours", 500), ("dals-pulses", "Dals & Pulses", 500)],
    ),
    (
        "oil-sugar-salt",
        "Oil, Sugar & Salt",
        [("edible-oils", "Edible Oils & Ghee", 500), ("sugar-salt", "Sugar & Salt", 500)],
    ),
    ("beverages", "Beverages", [("tea-coffee", "Tea & Coffee", 500)]),
    (
        "kitchen-dining",
        "Kitchen & Dining",
        [
            ("mugs-cups", "Mugs & Cups", 1200),
            ("tableware", "Tableware & Serveware", 1200),
            ("cake-baking", "Cake & Baking", 1800),
            ("kitchen-storage", "Kitchen Storage", 1800),
            ("kitchen-linen-tools", "Kitchen Linen & Tools", 1200),
        ],
    ),
    (
        "home-decor",
        "Home Decor",
        [
            ("candles-holders", "Candles & Holders", 1200),
            ("lights-lanterns", "Lights & Lanterns", 1800),
            ("clocks", "Clocks", 1800),
            ("frames-wall-art", "Frames, Signs & Wall Art", 1200),
            ("cushions-furnishings", "Cushions & Furnishings", 1200),
            ("home-storage", "Home Storage & Organisers", 1800),
            ("hanging-decor", "Hanging Decorations", 1200),
        ],
    ),
    (
        "party-festive",
        "Party & Festive",
        [
            ("christmas", "Christmas", 1200),
            ("easter", "Easter", 1200),
            ("balloons", "Balloons", 1800),
            ("party-supplies", "Party Supplies", 1800),
        ],
    ),
    (
        "gifts-cards",
        "Gifts & Cards",
        [("gift-wrap", "Gift Wrap & Bags", 1200), ("greeting-cards", "Cards & Tags", 1200)],
    ),
    (
        "bags-accessories",
        "Bags & Accessories",
        [
            ("bags-wallets", "Bags, Purses & Keyrings", 1800),
            # Imitation jewellery is 3 % in India, not a slab here: the nearest allowed one.
            ("jewellery", "Jewellery", 500),
            ("hair-accessories", "Hair Accessories", 1800),
            ("umbrellas", "Umbrellas", 1200),
        ],
    ),
    (
        "stationery-craft",
        "Stationery & Craft",
        [("stationery", "Stationery", 1200), ("craft-sewing", "Craft & Sewing", 1200)],
    ),
    ("toys-games", "Toys & Games", [("toys", "Toys", 1200), ("games-puzzles", "Games & Puzzles", 1200)]),
    (
        "garden-outdoor",
        "Garden & Outdoor",
        [("garden", "Garden", 1800), ("picnic", "Picnic & Outdoor", 1800)],
    ),
    ("bath-personal-care", "Bath & Personal Care", [("bath-body", "Bath & Body", 1800)]),
    ("other", "Other", [("other-gifts", "Gifts & Novelties", 1800)]),
]

OTHER_SLUG = "other-gifts"


def category_tree() -> list[CategoryDef]:
    """Parents (position = order in the tree) followed by their children."""
    parents: list[CategoryDef] = []
    children: list[CategoryDef] = []
    for i, (slug, name, kids) in enumerate(_TREE):
        child_rates = {rate for _, _, rate in kids}
        # A parent carries the GST of its children when they agree, else the highest.
        parents.append(CategoryDef(slug, name, None, i, max(child_rates)))
        for j, (kid_slug, kid_name, rate) in enumerate(kids):
            children.append(CategoryDef(kid_slug, kid_name, slug, j, rate))
    return parents + children


# Ordered: the first rule with a matching keyword wins, so specific rules come before broad
# ones ("CAKE CASES" is baking before "PARTY" is party; "GIFT BAG" is wrap before "BAG").
# A keyword is a word or a phrase of whole words in the upper-cased description.
# fmt: off
CATEGORY_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("christmas", ("CHRISTMAS", "XMAS", "ADVENT", "BAUBLE", "BAUBLES", "SANTA", "REINDEER", "SNOWFLAKE",
                   "SNOWMAN", "NATIVITY")),
    ("easter", ("EASTER", "CHICK", "CHICKS")),
    ("balloons", ("BALLOON", "BALLOONS")),
    ("cake-baking", ("CAKE CASES", "BAKING", "BAKE", "CUPCAKE", "CAKE", "CAKES", "MUFFIN", "CUTTER",
                     "CUTTERS", "ICING", "PASTRY", "MOULD", "MOULDS", "SCONE")),
    ("party-supplies", ("PARTY", "BUNTING", "BIRTHDAY", "PAPER CHAIN", "CRACKER", "CRACKERS", "CONFETTI",
                        "DOILEY", "DOILIES", "DOILY", "STRAWS", "PARTY BAG")),
    ("candles-holders", ("CANDLE", "CANDLES", "T LIGHT", "TLIGHT", "TLIGHTS", "TEALIGHT", "TEA LIGHT",
                         "INCENSE", "OIL BURNER", "CANDLEHOLDER")),
    ("lights-lanterns", ("LIGHT", "LIGHTS", "LANTERN", "LANTERNS", "LAMP", "LAMPSHADE", "CHANDELIER")),
    ("toys", ("TOY", "TOYS", "DOLL", "DOLLS", "TEDDY", "KITE", "MARBLES", "SKIPPING ROPE", "SPINNING TOP",
              "YOYO", "SOLDIER", "SOLDIERS", "RATTLE", "BUBBLES")),
    ("games-puzzles", ("GAME", "GAMES", "JIGSAW", "PUZZLE", "PUZZLES", "DOMINOES", "PLAYING CARDS", "DICE",
                       "SNAKES", "LUDO", "BINGO")),
    ("gift-wrap", ("WRAP", "WRAPPING", "GIFT BAG", "RIBBON", "RIBBONS", "GIFT BOX", "GIFT TAPE",
                   "TISSUE PAPER")),
    ("kitchen-linen-tools", ("TEA TOWEL", "TEA TOWELS", "OVEN GLOVE", "OVEN MITT", "APRON")),
    ("bath-body", ("BATH", "BATHROOM", "SOAP", "SPONGE", "TOILETRY", "WASH BAG", "HAND WARMER", "BALM",
                   "LIP GLOSS", "COMPACT", "PLASTERS", "TISSUES", "TOOTHBRUSH", "NAIL", "MANICURE", "WASHBAG",
                   "TOWEL", "FLANNEL", "SHOWER CAP")),
    ("hair-accessories", ("HAIR", "HAIRCLIP", "HAIRBAND", "HAIRSLIDE", "HAIRCLIPS", "HAIR GRIP", "SCARF",
                          "HEADBAND", "TIARA")),
    ("bags-wallets", ("KEY RING", "KEYRING", "KEY CHAIN", "KEY FOB")),
    ("jewellery", ("RING", "RINGS", "NECKLAC", "NECKL", "NECKLACE", "NECKLACES", "BRACELET", "BRACELETS",
                   "EARRINGS", "BROOCH", "CHARM", "PENDANT", "BANGLE", "BANGLES", "CHOKER", "LARIAT")),
    ("umbrellas", ("UMBRELLA", "PARASOL")),
    ("bags-wallets", ("BAG", "BAGS", "TOTE", "SHOPPER", "PURSE", "HANDBAG", "WALLET", "CARD HOLDER",
                      "BACKPACK", "RUCKSACK", "KEYRING", "KEY RING", "KEY CHAIN", "KEY FOB",
                      "PASSPORT COVER")),
    ("greeting-cards", ("CARD", "CARDS", "TAG", "TAGS", "GIFT TAGS", "POSTCARD", "POSTCARDS")),
    ("stationery", ("NOTEBOOK", "NOTEBOOKS", "PEN", "PENS", "PENCIL", "PENCILS", "ERASER", "ERASERS", "RULER",
                    "STICKER", "STICKERS", "JOURNAL", "DIARY", "CALENDAR", "NOTEPAD", "MEMO", "ENVELOPE",
                    "ENVELOPES", "STATIONERY", "SHARPENER", "BOOK", "SKETCHBOOK", "BOOKMARK", "CHALK",
                    "GLOBE")),
    ("craft-sewing", ("CRAFT", "SEWING", "KNITTING", "FELTCRAFT", "CROCHET", "PAINT", "PAINTING", "COLOURING",
                      "CRAYONS", "BUTTONS", "SCISSORS", "STENCIL", "GLITTER", "TAPE")),
    ("mugs-cups", ("MUG", "MUGS", "CUP", "CUPS", "SAUCER", "SAUCERS", "TEACUP", "TEACUPS", "BEAKER")),
    ("tableware", ("PLATE", "PLATES", "BOWL", "BOWLS", "DISH", "CUTLERY", "SPOON", "SPOONS", "FORK", "FORKS",
                   "NAPKIN", "NAPKINS", "TRAY", "TRAYS", "JUG", "TEAPOT", "COASTER", "COASTERS", "PLACEMAT",
                   "PLACEMATS", "TUMBLER", "TUMBLERS", "CAKESTAND", "CAKE STAND", "CHOPSTICKS", "GLASSES",
                   "DECANTER", "CARAFE", "EGG CUP", "WINE GLASS", "APERITIF GLASS", "PLATTER",
                   "NAPKIN RING")),
    ("kitchen-storage", ("JAR", "JARS", "TIN", "TINS", "CANISTER", "CANISTERS", "LUNCH BOX", "LUNCHBOX",
                         "CONTAINER", "BOTTLE", "PANTRY", "BREAD BIN", "FLASK", "SNACK BOXES")),
    ("kitchen-linen-tools", ("APRON", "TEA TOWEL", "TEA TOWELS", "OVEN GLOVE", "KITCHEN", "SCALES", "TIMER",
                             "JAM MAKING", "CHOPPING", "FRYING PAN", "OVEN MITT", "WASHING UP GLOVES",
                             "GRATER", "SIEVE", "COLANDER", "WHISK", "PEG", "PEGS", "SPATULA")),
    ("clocks", ("CLOCK", "CLOCKS")),
    ("frames-wall-art", ("FRAME", "FRAMES", "WALL ART", "SIGN", "SIGNS", "PLAQUE", "MIRROR", "MIRRORS",
                         "PICTURE", "POSTER", "PRINT", "TILE", "TILES", "BLACKBOARD", "CHALKBOARD")),
    ("cushions-furnishings", ("CUSHION", "CUSHIONS", "DOORMAT", "THROW", "BLANKET", "HOT WATER BOTTLE",
                              "FILLER PAD", "QUILT", "RUG", "CURTAIN", "DOORSTOP", "BEDSPREAD", "PILLOW",
                              "LAMPSHADE")),
    ("garden", ("GARDEN", "PLANT", "PLANTER", "FLOWER POT", "WATERING CAN", "BIRDHOUSE", "BIRD FEEDER",
                "BIRD TABLE", "THERMOMETER", "GNOME", "SEEDS", "HERB", "POT", "POTS", "TROWEL")),
    ("picnic", ("PICNIC", "CAMPING", "HAMMOCK", "DECKCHAIR", "BEACH", "PAPER PARASOL")),
    ("home-storage", ("BOX", "BOXES", "BASKET", "BASKETS", "DRAWER", "DRAWERS", "CABINET", "COAT RACK",
                      "HOOK", "HOOKS", "HANGER", "HANGERS", "ORGANISER", "STORAGE", "TRINKET", "SHELF",
                      "RACK", "TIDY", "CHEST", "WARDROBE", "SIDEBOARD", "STOOL", "TABLE", "CHAIR", "KNOB",
                      "KNOBS", "MAGNETS", "MAGNET", "DOOR STOP")),
    ("hanging-decor", ("HEART", "HEARTS", "HANGING", "GARLAND", "WREATH", "DECORATION", "DECORATIONS",
                       "ORNAMENT", "ORNAMENTS", "WICKER", "BELLS", "BELL", "MOBILE", "WINDCHIME",
                       "WIND CHIME", "CHIME", "BUTTERFLY", "ARTIFICIAL FLOWER", "ART FLOWER", "FEATHER",
                       "STAR", "STARS", "DOVE", "DOVES")),
]
# fmt: on

# Product lines of the retailer that recur across many SKUs; the first one named wins.
BRAND_LINES: list[tuple[str, str]] = [
    ("REGENCY", "Regency"),
    ("RETROSPOT", "Retrospot"),
    ("POLKADOT", "Polkadot"),
    ("SPACEBOY", "Spaceboy"),
    ("DOLLY GIRL", "Dolly Girl"),
    ("WOODLAND", "Woodland"),
    ("PAISLEY PARK", "Paisley Park"),
    ("FELTCRAFT", "Feltcraft"),
    ("BABUSHKA", "Babushka"),
    ("BAROQUE", "Baroque"),
    ("BOTANICAL", "Botanical"),
    ("FOLK ART", "Folk Art"),
    ("FOLKART", "Folk Art"),
    ("SCANDINAVIAN", "Scandinavian"),
    ("EDWARDIAN", "Edwardian"),
    ("VICTORIAN", "Victorian"),
    ("SWEETHEART", "Sweetheart"),
    ("GINGHAM", "Gingham"),
    ("BLOSSOM", "Blossom"),
    ("SKULL", "Skulls"),
    ("SKULLS", "Skulls"),
    ("UNION JACK", "Union Jack"),
    ("PANTRY", "Pantry"),
    ("JAM MAKING", "Pantry"),
    ("ENAMEL", "Enamelware"),
    ("FAIRY", "Fairy Tale"),
]


_WORD = re.compile(r"[A-Z0-9]+")


def _terms(description: str) -> frozenset[str]:
    """Every word, and every run of two or three words, of the upper-cased description: a
    keyword (a word or a phrase of up to three words) matches on whole words by set lookup."""
    words = _WORD.findall(description.upper())
    terms = set(words)
    for n in (2, 3):
        terms.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return frozenset(terms)


_RULE_SETS = [(slug, frozenset(keywords)) for slug, keywords in CATEGORY_RULES]


def assign_category(description: str) -> str:
    """Child category slug for a description (first matching rule; Other when none)."""
    terms = _terms(description)
    for slug, keywords in _RULE_SETS:
        if not terms.isdisjoint(keywords):
            return slug
    return OTHER_SLUG


def derive_brand(description: str) -> str | None:
    terms = _terms(description)
    for keyword, brand in BRAND_LINES:
        if keyword in terms:
            return brand
    return None


_SMALL_WORDS = frozenset({"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to", "with"})


def title_case(description: str) -> str:
    """'SET OF 6  T-LIGHT HOLDERS' -> 'Set of 6 T-Light Holders' (apostrophes do not start words)."""
    words = " ".join(description.split()).lower().split(" ")
    out = []
    for i, word in enumerate(words):
        if i > 0 and word in _SMALL_WORDS:
            out.append(word)
        else:
            out.append(re.sub(r"(^|[^a-z'])([a-z])", lambda m: m.group(1) + m.group(2).upper(), word))
    return " ".join(out).strip()


_UNIT_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(SET|PACK|BOX|BAG|TUBE)\s*(?:OF|/)\s*(\d{1,4})\b"), "{kind} of {n}"),
    (re.compile(r"\bS/(\d{1,4})\b"), "set of {n}"),
    (re.compile(r"\b(\d{1,4})\s*(?:PIECES|PIECE|PCS)\b"), "{n} pcs"),
]


def derive_unit(description: str) -> str:
    """The sold unit: 'set of 6', 'pack of 12', '60 pcs'; '1 pc' when the text names none."""
    upper = description.upper()
    for pattern, template in _UNIT_PATTERNS:
        m = pattern.search(upper)
        if m is None:
            continue
        groups = m.groups()
        n = int(groups[-1])
        if n < 1:
            continue
        kind = groups[0].lower() if len(groups) == 2 else "set"
        return template.format(kind=kind, n=n)
    return "1 pc"


def gbp_to_paise(gbp: float | Decimal) -> Decimal:
    """Exact INR paise (not yet rounded) for a GBP amount, at the fixed rate."""
    return Decimal(str(gbp)) * GBP_TO_INR * RUPEE


def selling_price_paise(typical_gbp: float | Decimal) -> int:
    """Typical unit price in paise, rounded half-up to whole rupees, at least one rupee."""
    rupees = (gbp_to_paise(typical_gbp) / RUPEE).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return max(100, int(rupees) * 100)


def mrp_paise(max_gbp: float | Decimal, price_paise: int) -> int:
    """Highest observed unit price in paise, capped at MRP_CAP x the selling price, rounded up to
    whole rupees, never below the selling price."""
    raw = min(gbp_to_paise(max_gbp), Decimal(price_paise) * MRP_CAP)
    rupees = (raw / RUPEE).quantize(Decimal(1), rounding=ROUND_CEILING)
    return max(price_paise, int(rupees) * 100)


def is_non_product_description(description: str) -> bool:
    return not _terms(description).isdisjoint(NON_PRODUCT_WORDS)


def is_product_code(code: str) -> bool:
    code = code.strip().upper()
    return code not in NON_PRODUCT_CODES and PRODUCT_CODE.fullmatch(code) is not None


# --- products --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceItem:
    """One SKU after cleaning and aggregating the transactions."""

    sku: str
    description: str
    typical_gbp: float
    max_gbp: float
    order_lines: int


@dataclass(frozen=True)
class ProductDef:
    sku: str
    name: str
    brand: str | None
    description: str
    unit: str
    image_path: str
    category_slug: str
    mrp_paise: int
    price_paise: int
    tax_rate_bp: int
    low_stock_threshold: int
    staple: bool = False


def _normal_description(raw: str) -> str:
    return " ".join(raw.split()).upper()


def _valid_sales(table: pa.Table) -> pa.Table:
    """Rows that are sales: not cancellations, positive quantity and price, a customer and a
    description. Numeric filters only: the string work happens on the far fewer groups."""
    import pyarrow.compute as pc

    keep = pc.and_(
        pc.invert(pc.starts_with(table["InvoiceNo"], "C")),
        pc.and_(pc.greater(table["Quantity"], 0), pc.greater(table["UnitPrice"], 0)),
    )
    keep = pc.and_(keep, pc.and_(pc.is_valid(table["CustomerID"]), pc.is_valid(table["Description"])))
    return table.filter(pc.fill_null(keep, False))


def aggregate(table: pa.Table) -> list[SourceItem]:
    """One item per product SKU from raw transactions (columns as in the Parquet file), sorted.

    SKU: the StockCode upper-cased (the data spells a few both ways). Description: the one on
    most order lines (ties: alphabetically first). Typical price: the unit price on most order
    lines (ties: the lower). Max price: the highest unit price seen."""
    sales = _valid_sales(table)
    by_desc = sales.group_by(["StockCode", "Description"], use_threads=False).aggregate(
        [("Quantity", "count")]
    )
    by_price = sales.group_by(["StockCode", "UnitPrice"], use_threads=False).aggregate(
        [("Quantity", "count")]
    )

    desc_lines: dict[tuple[str, str], int] = {}
    for code, raw, n in zip(
        by_desc["StockCode"].to_pylist(),
        by_desc["Description"].to_pylist(),
        by_desc["Quantity_count"].to_pylist(),
        strict=True,
    ):
        description = _normal_description(raw)
        if not is_product_code(code) or not description or is_non_product_description(description):
            continue
        key = (code.strip().upper(), description)
        desc_lines[key] = desc_lines.get(key, 0) + n
    best_desc: dict[str, tuple[int, str]] = {}
    for (sku, description), n in desc_lines.items():
        current = best_desc.get(sku)
        if current is None or (-n, description) < (-current[0], current[1]):
            best_desc[sku] = (n, description)

    price_lines: dict[tuple[str, float], int] = {}
    for code, price, n in zip(
        by_price["StockCode"].to_pylist(),
        by_price["UnitPrice"].to_pylist(),
        by_price["Quantity_count"].to_pylist(),
        strict=True,
    ):
        sku = code.strip().upper()
        if sku in best_desc:
            price_lines[(sku, price)] = price_lines.get((sku, price), 0) + n
    typical: dict[str, tuple[int, float]] = {}
    highest: dict[str, float] = {}
    lines: dict[str, int] = {}
    for (sku, price), n in price_lines.items():
        seen = typical.get(sku)
        if seen is None or (-n, price) < (-seen[0], seen[1]):
            typical[sku] = (n, price)
        highest[sku] = max(highest.get(sku, price), price)
        lines[sku] = lines.get(sku, 0) + n

    return [
        SourceItem(
            sku=sku,
            description=best_desc[sku][1],
            typical_gbp=typical[sku][1],
            max_gbp=highest[sku],
            order_lines=lines[sku],
        )
        for sku in sorted(best_desc)
    ]


def read_source(path: Path) -> list[SourceItem]:
    import pyarrow.parquet as pq

    table = pq.read_table(
        path, columns=["InvoiceNo", "StockCode", "Description", "Quantity", "UnitPrice", "CustomerID"]
    )
    return aggregate(table)


def product_from_source(item: SourceItem) -> ProductDef:
    category = assign_category(item.description)
    name = title_case(item.description)
    unit = derive_unit(item.description)
    price = selling_price_paise(item.typical_gbp)
    return ProductDef(
        sku=item.sku,
        name=name,
        brand=derive_brand(item.description),
        description=f"{name}. {CATEGORY_NAMES[category]} from our gift and home range; sold as {unit}.",
        unit=unit,
        image_path=f"products/{item.sku.lower()}.jpg",
        category_slug=category,
        mrp_paise=mrp_paise(item.max_gbp, price),
        price_paise=price,
        tax_rate_bp=CATEGORY_TAX[category],
        low_stock_threshold=5,
    )


# --- demo staples ----------------------------------------------------------------------------

# Hand-written grocery staples with realistic Bengaluru quick-commerce prices (INR), kept apart
# from the derived catalog. (sku, name, brand, unit, category, price, MRP, GST in basis points)
DEMO_STAPLES: list[tuple[str, str, str, str, str, int, int, int]] = [
    ("STP-BANANA-ROBUSTA", "Banana Robusta", "Vurksha Fresh", "6 pcs", "fresh-fruits", 42, 49, 0),
    ("STP-BANANA-YELAKKI", "Banana Yelakki", "Vurksha Fresh", "500 g", "fresh-fruits", 45, 55, 0),
    ("STP-APPLE-SHIMLA", "Apple Shimla", "Vurksha Fresh", "4 pcs", "fresh-fruits", 149, 180, 0),
    ("STP-POMEGRANATE", "Pomegranate", "Vurksha Fresh", "2 pcs", "fresh-fruits", 119, 140, 0),
    ("STP-LEMON", "Lemon", "Vurksha Fresh", "4 pcs", "fresh-fruits", 22, 25, 0),
    ("STP-ONION", "Onion", "Vurksha Fresh", "1 kg", "fresh-vegetables", 45, 55, 0),
    ("STP-POTATO", "Potato", "Vurksha Fresh", "1 kg", "fresh-vegetables", 39, 48, 0),
    ("STP-TOMATO-HYBRID", "Tomato Hybrid", "Vurksha Fresh", "500 g", "fresh-vegetables", 28, 35, 0),
    ("STP-CORIANDER", "Coriander Leaves", "Vurksha Fresh", "100 g", "fresh-vegetables", 12, 15, 0),
    ("STP-GREEN-CHILLI", "Green Chilli", "Vurksha Fresh", "100 g", "fresh-vegetables", 10, 12, 0),
    ("STP-GINGER", "Ginger", "Vurksha Fresh", "200 g", "fresh-vegetables", 30, 36, 0),
    ("STP-MILK-TONED-500", "Toned Milk", "Vurksha Daily", "500 ml", "milk", 27, 27, 0),
    ("STP-MILK-FULLCREAM-1L", "Full Cream Milk", "Vurksha Daily", "1 l", "milk", 68, 68, 0),
    ("STP-BREAD-WHITE", "White Sandwich Bread", "Vurksha Bakery", "400 g", "bread-bakery", 45, 50, 0),
    ("STP-BREAD-BROWN", "Brown Bread", "Vurksha Bakery", "400 g", "bread-bakery", 55, 60, 0),
    ("STP-PAV", "Ladi Pav", "Vurksha Bakery", "6 pcs", "bread-bakery", 30, 35, 0),
    ("STP-EGGS-6", "Farm Eggs", "Vurksha Daily", "6 pcs", "eggs", 54, 60, 0),
    ("STP-EGGS-12", "Farm Eggs", "Vurksha Daily", "12 pcs", "eggs", 99, 114, 0),
    ("STP-CURD-400", "Fresh Curd", "Vurksha Daily", "400 g", "curd-paneer-butter", 40, 42, 500),
    ("STP-PANEER-200", "Malai Paneer", "Vurksha Daily", "200 g", "curd-paneer-butter", 90, 95, 500),
    ("STP-BUTTER-100", "Salted Butter", "Vurksha Daily", "100 g", "curd-paneer-butter", 58, 60, 500),
    ("STP-RICE-SONAMASOORI-5KG", "Sona Masoori Rice", "Vurksha Staples", "5 kg", "rice", 399, 475, 500),
    ("STP-RICE-BASMATI-1KG", "Basmati Rice", "Vurksha Staples", "1 kg", "rice", 159, 199, 500),
    ("STP-ATTA-5KG", "Whole Wheat Atta", "Vurksha Staples", "5 kg", "atta-flours", 269, 310, 500),
    ("STP-RAVA-500", "Bombay Rava", "Vurksha Staples", "500 g", "atta-flours", 38, 45, 500),
    ("STP-TOOR-DAL-1KG", "Toor Dal", "Vurksha Staples", "1 kg", "dals-pulses", 179, 210, 500),
    ("STP-MOONG-DAL-500", "Moong Dal", "Vurksha Staples", "500 g", "dals-pulses", 79, 95, 500),
    ("STP-SUNFLOWER-OIL-1L", "Refined Sunflower Oil", "Vurksha Staples", "1 l", "edible-oils", 155, 180, 500),
    ("STP-GHEE-500", "Cow Ghee", "Vurksha Daily", "500 ml", "edible-oils", 330, 365, 500),
    ("STP-SUGAR-1KG", "Sugar", "Vurksha Staples", "1 kg", "sugar-salt", 52, 60, 500),
    ("STP-SALT-1KG", "Iodised Salt", "Vurksha Staples", "1 kg", "sugar-salt", 28, 30, 0),
    ("STP-TEA-250", "Assam Tea", "Vurksha Staples", "250 g", "tea-coffee", 140, 165, 500),
    (
        "STP-FILTER-COFFEE-200",
        "Filter Coffee Powder",
        "Vurksha Staples",
        "200 g",
        "tea-coffee",
        175,
        199,
        500,
    ),
]


def staple_products() -> list[ProductDef]:
    products = []
    for sku, name, brand, unit, category, price, mrp, tax in DEMO_STAPLES:
        products.append(
            ProductDef(
                sku=sku,
                name=name,
                brand=brand,
                description=f"{name}, {unit}. {CATEGORY_NAMES[category]}, fresh from your nearest store.",
                unit=unit,
                image_path=f"staples/{sku.lower()}.jpg",
                category_slug=category,
                mrp_paise=mrp * 100,
                price_paise=price * 100,
                tax_rate_bp=tax,
                low_stock_threshold=10,
                staple=True,
            )
        )
    return products


CATEGORY_NAMES = {c.slug: c.name for c in category_tree()}
CATEGORY_TAX = {c.slug: c.tax_rate_bp for c in category_tree()}


def build_products(items: Iterable[SourceItem]) -> list[ProductDef]:
    """Derived products and the demo staples, sorted by SKU."""
    products = [product_from_source(i) for i in items] + staple_products()
    return sorted(products, key=lambda p: p.sku)


# --- stores and stock ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreDef:
    code: str
    name: str
    lat: float
    lng: float
    service_radius_km: float
    opens_at: clock
    closes_at: clock


# Dark stores in Bengaluru. opens_at == closes_at means open around the clock.
STORES: list[StoreDef] = [
    StoreDef("BLR-IND", "Indiranagar", 12.9719, 77.6412, 4.0, clock(0, 0), clock(0, 0)),
    StoreDef("BLR-KOR", "Koramangala", 12.9352, 77.6245, 4.0, clock(6, 0), clock(23, 59)),
    StoreDef("BLR-HSR", "HSR Layout", 12.9116, 77.6389, 3.5, clock(6, 0), clock(23, 0)),
    StoreDef("BLR-MRT", "Marathahalli", 12.9569, 77.7011, 4.0, clock(6, 0), clock(23, 59)),
    StoreDef("BLR-WFD", "Whitefield", 12.9698, 77.7500, 5.0, clock(7, 0), clock(23, 0)),
]


def stable_hash(*parts: str) -> int:
    """A 64-bit hash that is the same in every process and on every machine."""
    digest = hashlib.blake2b(":".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def seeded_stock(store_code: str, product: ProductDef) -> int:
    """On-hand quantity for a product in a store: about 8 % out of stock and 12 % at or below
    the low-stock threshold for gift-ware; staples are always stocked, sometimes low."""
    h = stable_hash(store_code, product.sku)
    bucket, spread = h % 100, (h >> 16) % 1000
    threshold = product.low_stock_threshold
    if product.staple:
        if bucket < 10:
            return 1 + spread % threshold
        return threshold + 10 + spread % 190
    if bucket < 8:
        return 0
    if bucket < 20:
        return 1 + spread % threshold
    return threshold + 1 + spread % 80


# --- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    categories: int
    categories_changed: int
    products: int
    products_changed: int
    stores: int
    stores_changed: int
    inventory_added: int
    seconds: float


_UPSERT_STORES = """
INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)
SELECT gen_random_uuid(), s.code, s.name, 'Bengaluru', s.lat, s.lng, s.radius, s.opens_at, s.closes_at
FROM unnest(CAST(:code AS text[]), CAST(:name AS text[]), CAST(:lat AS float8[]), CAST(:lng AS float8[]),
            CAST(:radius AS float8[]), CAST(:opens_at AS time[]), CAST(:closes_at AS time[]))
     AS s(code, name, lat, lng, radius, opens_at, closes_at)
ON CONFLICT (code) DO UPDATE SET
    name = EXCLUDED.name, city = EXCLUDED.city, lat = EXCLUDED.lat, lng = EXCLUDED.lng,
    service_radius_km = EXCLUDED.service_radius_km, opens_at = EXCLUDED.opens_at,
    closes_at = EXCLUDED.closes_at, updated_at = now()
WHERE (stores.name, stores.city, stores.lat, stores.lng, stores.service_radius_km, stores.opens_at,
       stores.closes_at)
      IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.city, EXCLUDED.lat, EXCLUDED.lng,
                        EXCLUDED.service_radius_km, EXCLUDED.opens_at, EXCLUDED.closes_at)
RETURNING id
"""

# Parents and children in one statement would need the parents' ids first: two passes.
_UPSERT_CATEGORIES = """
INSERT INTO categories (id, parent_id, slug, name, position)
SELECT gen_random_uuid(), parent.id, s.slug, s.name, s.position
FROM unnest(CAST(:slug AS text[]), CAST(:name AS text[]), CAST(:parent AS text[]), CAST(:position AS int[]))
     AS s(slug, name, parent_slug, position)
LEFT JOIN categories AS parent ON parent.slug = s.parent_slug
ON CONFLICT (slug) DO UPDATE SET
    parent_id = EXCLUDED.parent_id, name = EXCLUDED.name, position = EXCLUDED.position, updated_at = now()
WHERE (categories.parent_id, categories.name, categories.position)
      IS DISTINCT FROM (EXCLUDED.parent_id, EXCLUDED.name, EXCLUDED.position)
RETURNING id
"""

_UPSERT_PRODUCTS = """
INSERT INTO products (id, sku, name, brand, description, unit, images, category_id, mrp_paise,
                      price_paise, currency, tax_rate_bp)
SELECT gen_random_uuid(), s.sku, s.name, s.brand, s.description, s.unit, s.images::jsonb, c.id, s.mrp,
       s.price, 'INR', s.tax
FROM unnest(CAST(:sku AS text[]), CAST(:name AS text[]), CAST(:brand AS text[]),
            CAST(:description AS text[]), CAST(:unit AS text[]), CAST(:images AS text[]),
            CAST(:category AS text[]), CAST(:mrp AS int[]), CAST(:price AS int[]), CAST(:tax AS int[]))
     AS s(sku, name, brand, description, unit, images, category, mrp, price, tax)
JOIN categories AS c ON c.slug = s.category
ON CONFLICT (sku) DO UPDATE SET
    name = EXCLUDED.name, brand = EXCLUDED.brand, description = EXCLUDED.description,
    unit = EXCLUDED.unit, images = EXCLUDED.images, category_id = EXCLUDED.category_id,
    mrp_paise = EXCLUDED.mrp_paise, price_paise = EXCLUDED.price_paise, currency = EXCLUDED.currency,
    tax_rate_bp = EXCLUDED.tax_rate_bp, updated_at = now()
WHERE (products.name, products.brand, products.description, products.unit, products.images,
       products.category_id, products.mrp_paise, products.price_paise, products.currency,
       products.tax_rate_bp)
      IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.brand, EXCLUDED.description, EXCLUDED.unit,
                        EXCLUDED.images, EXCLUDED.category_id, EXCLUDED.mrp_paise, EXCLUDED.price_paise,
                        EXCLUDED.currency, EXCLUDED.tax_rate_bp)
RETURNING id
"""

# Existing stock is never overwritten (see the module docstring).
_INSERT_INVENTORY = """
INSERT INTO inventory (store_id, product_id, on_hand, reserved, low_stock_threshold)
SELECT st.id, p.id, s.on_hand, 0, s.threshold
FROM unnest(CAST(:store AS text[]), CAST(:sku AS text[]), CAST(:on_hand AS int[]), CAST(:threshold AS int[]))
     AS s(store, sku, on_hand, threshold)
JOIN stores AS st ON st.code = s.store
JOIN products AS p ON p.sku = s.sku
ON CONFLICT (store_id, product_id) DO NOTHING
"""

# Products whose search document is stale: changed products, products in renamed categories,
# and any seeded product that never got one.
_STALE_SEARCH = """
SELECT id FROM products
WHERE sku = ANY(CAST(:skus AS text[]))
  AND (search_vector IS NULL OR id = ANY(CAST(:changed AS uuid[]))
       OR category_id = ANY(CAST(:categories AS uuid[])))
"""


def _json_list(items: Sequence[str]) -> str:
    return json.dumps(list(items))


def _products_from(parquet: Path) -> list[ProductDef]:
    # A missing source is an error, not a smaller catalog: a demo of 33 staples hid exactly
    # that mistake once.
    if not parquet.is_file():
        raise FileNotFoundError(f"catalog source {parquet} not found (VURKSHA_CATALOG_PARQUET)")
    return build_products(read_source(parquet))


async def load_catalog(session: AsyncSession, *, parquet: Path, image_base_url: str) -> LoadResult:
    """Upsert stores, categories, products and missing inventory rows; refresh the search
    documents of what changed. Only flushes: the caller owns the transaction."""
    started = time.perf_counter()
    # Reading and deriving is CPU work: off the event loop.
    products = await asyncio.to_thread(_products_from, parquet)
    base = image_base_url.rstrip("/")

    stores_changed = (
        await session.execute(
            text(_UPSERT_STORES),
            {
                "code": [s.code for s in STORES],
                "name": [s.name for s in STORES],
                "lat": [s.lat for s in STORES],
                "lng": [s.lng for s in STORES],
                "radius": [s.service_radius_km for s in STORES],
                "opens_at": [s.opens_at for s in STORES],
                "closes_at": [s.closes_at for s in STORES],
            },
        )
    ).all()

    tree = category_tree()
    changed_categories: list[Any] = []
    for level in ([c for c in tree if c.parent_slug is None], [c for c in tree if c.parent_slug is not None]):
        rows = await session.execute(
            text(_UPSERT_CATEGORIES),
            {
                "slug": [c.slug for c in level],
                "name": [c.name for c in level],
                "parent": [c.parent_slug for c in level],
                "position": [c.position for c in level],
            },
        )
        changed_categories += [r[0] for r in rows]

    changed_products = [
        r[0]
        for r in await session.execute(
            text(_UPSERT_PRODUCTS),
            {
                "sku": [p.sku for p in products],
                "name": [p.name for p in products],
                "brand": [p.brand for p in products],
                "description": [p.description for p in products],
                "unit": [p.unit for p in products],
                "images": [_json_list([f"{base}/{p.image_path}"]) for p in products],
                "category": [p.category_slug for p in products],
                "mrp": [p.mrp_paise for p in products],
                "price": [p.price_paise for p in products],
                "tax": [p.tax_rate_bp for p in products],
            },
        )
    ]

    stock = [(s.code, p, seeded_stock(s.code, p)) for s in STORES for p in products]
    inventory = await session.execute(
        text(_INSERT_INVENTORY),
        {
            "store": [code for code, _, _ in stock],
            "sku": [p.sku for _, p, _ in stock],
            "on_hand": [n for _, _, n in stock],
            "threshold": [p.low_stock_threshold for _, p, _ in stock],
        },
    )
    inventory_added = int(getattr(inventory, "rowcount", 0) or 0)

    stale = [
        r[0]
        for r in await session.execute(
            text(_STALE_SEARCH),
            {
                "skus": [p.sku for p in products],
                "changed": changed_products,
                "categories": changed_categories,
            },
        )
    ]
    if stale:
        await refresh_search_vectors(session, stale)

    return LoadResult(
        categories=len(tree),
        categories_changed=len(changed_categories),
        products=len(products),
        products_changed=len(changed_products),
        stores=len(STORES),
        stores_changed=len(stores_changed),
        inventory_added=inventory_added,
        seconds=time.perf_counter() - started,
    )
