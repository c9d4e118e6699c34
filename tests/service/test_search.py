"""Search and autocomplete through the real Serve, PostgreSQL and Redis.

Each run creates its own category tree, stores and products under a random marker, and every
assertion is scoped to them (a category filter, a marker word, a unique prefix), so the tests
hold with or without the seeded catalog around them."""

from __future__ import annotations

import base64
import random
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from models.products import SEARCH_DOCUMENT_SQL
from tests.conftest import Live


@dataclass
class Catalog:
    marker: str  # a word only this run's products carry (in their descriptions)
    prefix: str  # what this run's brand, root category and "crunch" products start with
    root: str  # category slugs
    fruit: str
    exotic: str
    snacks: str
    store_a: uuid.UUID
    store_b: uuid.UUID
    brand: str
    ids: dict[str, uuid.UUID] = field(default_factory=dict)


# name, category key, brand?, price paise, 5-star count, 1-star count, extra description
PRODUCTS: list[tuple[str, str, bool, int, int, int, str]] = [
    ("Banana Robusta", "fruit", True, 4_000, 4, 0, "Sweet yellow fruit."),
    ("Banana Chips", "snacks", False, 8_000, 1, 1, "Crisp fried slices."),
    ("Banano Snack Bar", "snacks", True, 15_000, 0, 0, "Nuts and seeds."),
    ("Tropical Smoothie", "exotic", False, 30_000, 2, 0, "Made with ripe banana and mango."),
    ("Mango Alphonso", "exotic", True, 25_000, 0, 3, "King of fruits."),
    ("Apple Shimla", "fruit", False, 60_000, 3, 0, "Crunchy hill apples."),
]
CRUNCH_COUNT = 12  # more than the autocomplete cap of ten


def _insert(live: Live, table: str, rows: list[dict[str, Any]]) -> None:
    """One multi-row INSERT with bound values (the column names are this file's constants)."""
    columns = list(rows[0])
    values = []
    params: dict[str, Any] = {}
    for i, row in enumerate(rows):
        values.append("(" + ", ".join(f":{c}_{i}" for c in columns) + ")")
        params.update({f"{c}_{i}": row[c] for c in columns})
    live.sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join(values)}", **params)  # noqa: S608


@pytest.fixture(scope="module")
def catalog(live: Live) -> Iterator[Catalog]:
    run = secrets.token_hex(4)
    prefix = "zq" + run
    cat = Catalog(
        marker="mk" + run,
        prefix=prefix,
        root=f"srch-{run}",
        fruit=f"srch-{run}-fruit",
        exotic=f"srch-{run}-exotic",
        snacks=f"srch-{run}-snacks",
        store_a=uuid.uuid4(),
        store_b=uuid.uuid4(),
        brand=f"{prefix.title()}brand",
    )
    cat_ids = {key: uuid.uuid4() for key in ("root", "fruit", "exotic", "snacks")}
    _insert(
        live,
        "categories",
        [
            {"id": cat_ids["root"], "parent_id": None, "slug": cat.root, "name": f"{prefix.title()} Market"},
            {"id": cat_ids["fruit"], "parent_id": cat_ids["root"], "slug": cat.fruit, "name": "Fruit"},
            {"id": cat_ids["exotic"], "parent_id": cat_ids["fruit"], "slug": cat.exotic, "name": "Exotic"},
            {"id": cat_ids["snacks"], "parent_id": cat_ids["root"], "slug": cat.snacks, "name": "Snacks"},
        ],
    )
    for store in (cat.store_a, cat.store_b):
        live.sql(
            "INSERT INTO stores (id, code, name, city, lat, lng, service_radius_km, opens_at, closes_at)"
            " VALUES (:id, :code, 'Search test store', 'Bengaluru', 12.97, 77.59, 3, '06:00', '23:00')",
            id=store,
            code=f"S-{run}-{store.hex[:6]}",
        )
    rows = []
    specs = list(PRODUCTS) + [
        (f"{prefix.title()} Crunch {i}", "snacks", True, 1_000 + 100 * i, i % 3, 0, "Crunchy.")
        for i in range(CRUNCH_COUNT)
    ]
    for n, (name, key, branded, price, fives, ones, extra) in enumerate(specs):
        pid = uuid.uuid4()
        cat.ids[name] = pid
        rows.append(
            {
                "id": pid,
                "sku": f"S{run}{n:03d}",
                "name": name,
                "brand": cat.brand if branded else None,
                "description": f"{extra} {cat.marker}",
                "category_id": cat_ids[key],
                "mrp_paise": price,
                "price_paise": price,
                "rating_count": fives + ones,
                "rating_sum": 5 * fives + ones,
                "r1": ones,
                "r5": fives,
            }
        )
    _insert(live, "products", rows)
    # Store A has Banana Robusta on hand but all of it reserved; store B can sell it.
    stock = {"Banana Robusta": (5, 5, 10), "Banana Chips": (3, 0, 0), "Tropical Smoothie": (2, 1, 4)}
    inventory = []
    for name, (on_hand_a, reserved_a, on_hand_b) in stock.items():
        inventory.append(
            {
                "store_id": cat.store_a,
                "product_id": cat.ids[name],
                "on_hand": on_hand_a,
                "reserved": reserved_a,
            }
        )
        inventory.append(
            {"store_id": cat.store_b, "product_id": cat.ids[name], "on_hand": on_hand_b, "reserved": 0}
        )
    inventory.append(
        {
            "store_id": cat.store_a,
            "product_id": cat.ids[f"{prefix.title()} Crunch 0"],
            "on_hand": 9,
            "reserved": 0,
        }
    )
    _insert(live, "inventory", inventory)
    live.sql(SEARCH_DOCUMENT_SQL, ids=list(cat.ids.values()))
    yield cat


@pytest.fixture
def client(live: Live) -> Iterator[httpx.Client]:
    with live.client() as c:
        yield c


def search(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/search", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def names(body: dict[str, Any]) -> list[str]:
    return [item["name"] for item in body["items"]]


def all_pages(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(50):
        body = search(client, **params, **({"cursor": cursor} if cursor else {}))
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("paging did not end")


# ---------------------------------------------------------------- relevance


def test_name_match_ranks_above_description_match_and_fuzzy_match(
    client: httpx.Client, catalog: Catalog
) -> None:
    body = search(client, q="banana", category=catalog.root)
    found = names(body)
    assert set(found) == {"Banana Robusta", "Banana Chips", "Tropical Smoothie", "Banano Snack Bar"}
    # Name matches first, then the description-only match, then the typo-tolerant one.
    assert set(found[:2]) == {"Banana Robusta", "Banana Chips"}
    assert found[2:] == ["Tropical Smoothie", "Banano Snack Bar"]
    matches = {item["name"]: item["match"] for item in body["items"]}
    assert matches["Banana Robusta"] == "text"
    assert matches["Tropical Smoothie"] == "text"
    assert matches["Banano Snack Bar"] == "fuzzy"
    assert body["total"] == 4


def test_exact_name_beats_fuzzy_name(client: httpx.Client, catalog: Catalog) -> None:
    found = names(search(client, q="banano", category=catalog.root))
    assert found[0] == "Banano Snack Bar"
    assert "Banana Robusta" in found[1:]  # "banana" is a near miss of "banano"


@pytest.mark.parametrize("typo", ["banan", "bananna", "BANANAS", "banana robsta"])
def test_typos_and_prefixes_still_find_bananas(client: httpx.Client, catalog: Catalog, typo: str) -> None:
    assert "Banana Robusta" in names(search(client, q=typo, category=catalog.root))


def test_query_syntax_is_data_not_sql(client: httpx.Client, catalog: Catalog) -> None:
    for q in ["banana'; DROP TABLE products; --", "banana\\' OR 1=1", "banana & | ! :* () <->", "banana%_"]:
        search(client, q=q, category=catalog.root)  # a 200, whatever it finds
    for q in ["banana & | ! :* ()", '"banana robusta"', "-chips banana"]:
        assert "Banana Robusta" in names(search(client, q=q, category=catalog.root)), q
    # An exclusion is meant literally: no typo-tolerant match brings the excluded back.
    assert set(names(search(client, q="banana -chips", category=catalog.root))) == {
        "Banana Robusta",
        "Tropical Smoothie",
    }
    assert search(client, q="%%%", category=catalog.root)["total"] == 0


# ---------------------------------------------------------------- typos (Meilisearch's rules)


@dataclass
class Words:
    """Made-up words only this run's typo products carry, so no other catalog word is near."""

    root: str  # category slug
    w4: str  # 4 letters: no typo allowed
    w8: str  # 5-8 letters: one typo
    w10: str  # 9 letters and more: two typos
    left: str  # "<left> <right>" is one product's name: "<left><right>" is a split away
    right: str
    head: str  # "<head><tail>" is one word of a name: "<head> <tail>" is a join away
    tail: str


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(n))[:n]


@pytest.fixture(scope="module")
def words(live: Live) -> Words:
    rng = random.Random(secrets.token_hex(8))
    w = Words(
        root=f"typo-{secrets.token_hex(4)}",
        w4=_word(rng, 4),
        w8=_word(rng, 8),
        w10=_word(rng, 10),
        left=_word(rng, 5),
        right=_word(rng, 5),
        head=_word(rng, 5),
        tail=_word(rng, 4),
    )
    category = uuid.uuid4()
    _insert(live, "categories", [{"id": category, "parent_id": None, "slug": w.root, "name": "Typo test"}])
    specs = [
        (f"{w.w4.title()} Tea", ""),
        (f"{w.w8.title()} Snack", ""),
        (f"{w.w10.title()} Drink", ""),
        (f"{w.left.title()} {w.right.title()}", ""),
        (f"{(w.head + w.tail).title()} Mug", ""),
        # The misspelling itself written in a description: a match of the words as typed.
        ("Notebook", f"Misprinted {_edits(w.w8)['dropped']} edition"),
    ]
    rows = [
        {
            "id": uuid.uuid4(),
            "sku": f"T{w.root[-8:]}{n}",
            "name": name,
            "description": description,
            "category_id": category,
            "mrp_paise": 1_000,
            "price_paise": 1_000,
        }
        for n, (name, description) in enumerate(specs)
    ]
    _insert(live, "products", rows)
    live.sql(SEARCH_DOCUMENT_SQL, ids=[r["id"] for r in rows])
    return w


def _edits(word: str) -> dict[str, str]:
    """One edit of each kind, never at the first letter."""
    other = "y" if word[3] != "y" else "w"
    return {
        "dropped": word[:3] + word[4:],
        "added": word[:3] + other + word[3:],
        "replaced": word[:3] + other + word[4:],
        "swapped": word[:2] + word[3] + word[2] + word[4:],
    }


@pytest.mark.parametrize("kind", ["dropped", "added", "replaced", "swapped"])
def test_one_typo_in_a_word_of_five_to_eight_letters_is_forgiven(
    client: httpx.Client, words: Words, kind: str
) -> None:
    body = search(client, q=_edits(words.w8)[kind], category=words.root)
    assert f"{words.w8.title()} Snack" in names(body)
    assert body["corrected_q"] == words.w8
    assert {i["name"]: i["match"] for i in body["items"]}[f"{words.w8.title()} Snack"] == "typo"


def _no_typo_match(body: dict[str, Any]) -> bool:
    return body["corrected_q"] is None and all(i["match"] != "typo" for i in body["items"])


def _twice(word: str) -> str:
    """Two edits: the fourth letter replaced, the seventh dropped."""
    return word[:3] + ("y" if word[3] != "y" else "w") + word[4:6] + word[7:]


def test_two_typos_only_from_nine_letters(client: httpx.Client, words: Words) -> None:
    body = search(client, q=_twice(words.w10), category=words.root)
    assert names(body) == [f"{words.w10.title()} Drink"] and body["corrected_q"] == words.w10
    assert _no_typo_match(search(client, q=_twice(words.w8), category=words.root))


def test_no_typo_in_the_first_letter_nor_in_short_words(client: httpx.Client, words: Words) -> None:
    first = ("k" if words.w8[0] != "k" else "m") + words.w8[1:]
    assert _no_typo_match(search(client, q=first, category=words.root))
    short = words.w4[:2] + ("y" if words.w4[2] != "y" else "w") + words.w4[3:]
    body = search(client, q=short, category=words.root)
    assert _no_typo_match(body) and f"{words.w4.title()} Tea" not in names(body)


def test_joined_and_split_words(client: httpx.Client, words: Words) -> None:
    joined = search(client, q=words.left + words.right, category=words.root)
    assert names(joined) == [f"{words.left.title()} {words.right.title()}"]
    assert joined["corrected_q"] == f"{words.left} {words.right}"
    split = search(client, q=f"{words.head} {words.tail}", category=words.root)
    assert names(split) == [f"{(words.head + words.tail).title()} Mug"]
    assert split["items"][0]["match"] == "typo"


def test_the_words_as_typed_rank_before_corrections(client: httpx.Client, words: Words) -> None:
    body = search(client, q=_edits(words.w8)["dropped"], category=words.root)
    assert [(i["name"], i["match"]) for i in body["items"]] == [
        ("Notebook", "text"),
        (f"{words.w8.title()} Snack", "typo"),
    ]
    # Quotes mean exactly these words: no correction.
    body = search(client, q=f'"{_edits(words.w8)["dropped"]}"', category=words.root)
    assert names(body) == ["Notebook"] and body["corrected_q"] is None


def test_the_dictionary_follows_the_catalog(live: Live, client: httpx.Client, words: Words) -> None:
    renamed = _word(random.Random(words.root), 7)
    typo = _edits(renamed)["swapped"]
    assert search(client, q=typo, category=words.root)["total"] == 0
    live.sql(
        "UPDATE products SET name = :new WHERE name = :old",
        new=f"{renamed.title()} Drink",
        old=f"{words.w10.title()} Drink",
    )
    try:
        assert search(client, q=typo, category=words.root)["corrected_q"] == renamed
        # The old word left the dictionary with its last product.
        assert live.sql("SELECT products FROM search_words WHERE word = :w", w=words.w10)[0][0] == 0
    finally:
        live.sql(
            "UPDATE products SET name = :old WHERE name = :new",
            new=f"{renamed.title()} Drink",
            old=f"{words.w10.title()} Drink",
        )
    assert live.sql("SELECT products FROM search_words WHERE word = :w", w=words.w10)[0][0] == 1


# ---------------------------------------------------------------- facets and filters


def test_facets_add_up_to_total(client: httpx.Client, catalog: Catalog) -> None:
    for params in (
        {"q": catalog.marker},
        {"q": "banana", "category": catalog.root},
        {"q": catalog.marker, "max_price": 20_000},
    ):
        body = search(client, **params, limit=5)
        total = body["total"]
        facets = body["facets"]
        assert sum(f["count"] for f in facets["category"]) == total
        assert sum(f["count"] for f in facets["brand"]) == total
        assert sum(f["count"] for f in facets["price"]) == total
        assert [b["key"] for b in facets["price"]] == ["0-50", "50-100", "100-200", "200-500", "500+"]
    body = search(client, q=catalog.marker)
    assert body["total"] == len(PRODUCTS) + CRUNCH_COUNT
    categories = {f["slug"]: f["count"] for f in body["facets"]["category"]}
    assert categories == {catalog.fruit: 2, catalog.exotic: 2, catalog.snacks: 2 + CRUNCH_COUNT}
    brands = {f["brand"]: f["count"] for f in body["facets"]["brand"]}
    assert brands == {catalog.brand: 3 + CRUNCH_COUNT, None: 3}
    bands = {f["key"]: f["count"] for f in body["facets"]["price"]}
    assert bands == {"0-50": 1 + CRUNCH_COUNT, "50-100": 1, "100-200": 1, "200-500": 2, "500+": 1}


def test_category_filter_includes_descendants(client: httpx.Client, catalog: Catalog) -> None:
    assert set(names(search(client, q=catalog.marker, category=catalog.fruit))) == {
        "Banana Robusta",
        "Apple Shimla",
        "Tropical Smoothie",
        "Mango Alphonso",
    }
    assert set(names(search(client, q=catalog.marker, category=catalog.exotic))) == {
        "Tropical Smoothie",
        "Mango Alphonso",
    }
    assert search(client, q=catalog.marker, category=catalog.root)["total"] == len(PRODUCTS) + CRUNCH_COUNT


def test_brand_and_price_filters(client: httpx.Client, catalog: Catalog) -> None:
    branded = search(client, q="banana", brand=catalog.brand.upper(), category=catalog.root)
    assert set(names(branded)) == {"Banana Robusta", "Banano Snack Bar"}
    priced = search(client, q=catalog.marker, min_price=8_000, max_price=30_000)
    assert set(names(priced)) == {"Banana Chips", "Banano Snack Bar", "Mango Alphonso", "Tropical Smoothie"}
    assert all(8_000 <= item["price_paise"] <= 30_000 for item in priced["items"])


def test_in_stock_is_per_store(client: httpx.Client, catalog: Catalog) -> None:
    in_a = search(client, q="banana", category=catalog.root, store_id=str(catalog.store_a), in_stock="true")
    in_b = search(client, q="banana", category=catalog.root, store_id=str(catalog.store_b), in_stock="true")
    # Store A: Robusta fully reserved; Chips 3 on hand; Smoothie 1 left. Store B: no Chips.
    assert set(names(in_a)) == {"Banana Chips", "Tropical Smoothie"}
    assert set(names(in_b)) == {"Banana Robusta", "Tropical Smoothie"}
    assert {i["name"]: i["available"] for i in in_a["items"]} == {"Banana Chips": 3, "Tropical Smoothie": 1}
    assert sum(f["count"] for f in in_a["facets"]["category"]) == in_a["total"] == 2
    # Without in_stock the store only annotates availability.
    every = search(client, q="banana", category=catalog.root, store_id=str(catalog.store_a))
    assert {i["name"]: i["available"] for i in every["items"]} == {
        "Banana Robusta": 0,
        "Banana Chips": 3,
        "Tropical Smoothie": 1,
        "Banano Snack Bar": 0,
    }
    assert all(i["available"] is None for i in search(client, q="banana", category=catalog.root)["items"])


# ---------------------------------------------------------------- sorting and paging


def test_sort_orders(client: httpx.Client, catalog: Catalog) -> None:
    params = {"q": catalog.marker, "category": catalog.fruit}
    asc = all_pages(client, **params, sort="price_asc", limit=3)
    assert [i["price_paise"] for i in asc] == sorted(i["price_paise"] for i in asc)
    assert [i["name"] for i in asc] == [
        "Banana Robusta",
        "Mango Alphonso",
        "Tropical Smoothie",
        "Apple Shimla",
    ]
    desc = all_pages(client, **params, sort="price_desc", limit=3)
    assert [i["name"] for i in desc] == list(reversed([i["name"] for i in asc]))
    rated = search(client, **params, sort="rating")["items"]
    # Robusta 5.0 (4 ratings), Apple 5.0 (3), Smoothie 5.0 (2), Mango 1.0.
    assert [i["name"] for i in rated] == [
        "Banana Robusta",
        "Apple Shimla",
        "Tropical Smoothie",
        "Mango Alphonso",
    ]
    assert rated[0]["rating_average"] == 5.0 and rated[-1]["rating_average"] == 1.0


@pytest.mark.parametrize("sort", ["relevance", "price_asc", "price_desc", "rating"])
def test_cursor_paging_has_no_duplicates_or_gaps(client: httpx.Client, catalog: Catalog, sort: str) -> None:
    everything = search(client, q=catalog.marker, sort=sort, limit=50)
    assert everything["next_cursor"] is None
    paged = all_pages(client, q=catalog.marker, sort=sort, limit=4)
    assert [i["id"] for i in paged] == [i["id"] for i in everything["items"]]
    assert len({i["id"] for i in paged}) == everything["total"] == len(PRODUCTS) + CRUNCH_COUNT


def test_tampered_or_foreign_cursor_is_rejected(client: httpx.Client, catalog: Catalog) -> None:
    cursor = search(client, q=catalog.marker, limit=2)["next_cursor"]
    assert cursor
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[-3] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad, params in [
        (tampered, {"q": catalog.marker}),
        ("not-a-cursor", {"q": catalog.marker}),
        (cursor[:-4], {"q": catalog.marker}),
        (cursor, {"q": catalog.marker, "sort": "price_asc"}),  # minted for another search
        (cursor, {"q": "banana"}),
    ]:
        response = client.get("/search", params={**params, "cursor": bad, "limit": 2})
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_cursor"
    # The same cursor with another page size is fine: it is bound to the query, not the size.
    assert (
        client.get("/search", params={"q": catalog.marker, "cursor": cursor, "limit": 3}).status_code == 200
    )


# ---------------------------------------------------------------- autocomplete


def suggest(client: httpx.Client, q: str, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/search/autocomplete", params={"q": q, **params})
    assert response.status_code == 200, response.text
    suggestions: list[dict[str, Any]] = response.json()["suggestions"]
    return suggestions


def test_autocomplete_mixes_categories_brands_products(client: httpx.Client, catalog: Catalog) -> None:
    found = suggest(client, catalog.prefix)
    assert len(found) == 10
    kinds = [s["kind"] for s in found]
    assert kinds[0] == "category" and found[0]["text"] == f"{catalog.prefix.title()} Market"
    assert found[0]["slug"] == catalog.root
    assert kinds[1] == "brand" and found[1]["text"] == catalog.brand and found[1]["id"] is None
    assert kinds[2:] == ["product"] * 8
    assert all(s["text"].lower().startswith(catalog.prefix) for s in found)
    # Products: most rated first (Crunch i has i % 3 ratings).
    counts = [int(s["text"].rsplit(" ", 1)[1]) % 3 for s in found[2:]]
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_autocomplete_short_prefixes(client: httpx.Client, catalog: Catalog, length: int) -> None:
    prefix = catalog.prefix[:length]
    found = suggest(client, prefix.upper())
    assert 1 <= len(found) <= 10
    for s in found:
        words = s["text"].lower().replace("-", " ").split()
        assert any(w.startswith(prefix) for w in words), s


def test_autocomplete_word_prefix_and_store(client: httpx.Client, catalog: Catalog) -> None:
    found = suggest(client, "alphons")
    assert {
        "kind": "product",
        "text": "Mango Alphonso",
        "id": str(catalog.ids["Mango Alphonso"]),
        "slug": None,
    } in found
    in_store = suggest(client, catalog.prefix, store_id=str(catalog.store_a))
    assert [s["text"] for s in in_store if s["kind"] == "product"] == [f"{catalog.prefix.title()} Crunch 0"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "validation_error"),
        ({"q": ""}, "validation_error"),
        ({"q": "   "}, "validation_error"),
        ({"q": "a" * 101}, "validation_error"),
        ({"q": "milk", "limit": 0}, "validation_error"),
        ({"q": "milk", "limit": 51}, "validation_error"),
        ({"q": "milk", "sort": "cheapest"}, "validation_error"),
        ({"q": "milk", "min_price": -1}, "validation_error"),
        ({"q": "milk", "store_id": "not-a-uuid"}, "validation_error"),
        ({"q": "milk", "unknown": "1"}, "validation_error"),
        ({"q": "mi\x00lk"}, "validation_error"),
        ({"q": "milk", "brand": "a\x00b"}, "validation_error"),
        ({"q": "milk", "category": "\x00"}, "validation_error"),
        ({"q": "milk", "in_stock": "true"}, "store_required"),
        ({"q": "milk", "min_price": 500, "max_price": 100}, "invalid_price_range"),
    ],
)
def test_search_rejects_bad_input(client: httpx.Client, params: dict[str, Any], code: str) -> None:
    response = client.get("/search", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code


def test_unknown_store_or_category_is_404(client: httpx.Client, catalog: Catalog) -> None:
    response = client.get("/search", params={"q": "milk", "store_id": str(uuid.uuid4())})
    assert response.status_code == 404 and response.json()["code"] == "store_not_found"
    response = client.get("/search", params={"q": "milk", "category": "no-such-category-" + catalog.marker})
    assert response.status_code == 404 and response.json()["code"] == "category_not_found"
    response = client.get("/search/autocomplete", params={"q": "mi", "store_id": str(uuid.uuid4())})
    assert response.status_code == 404 and response.json()["code"] == "store_not_found"


@pytest.mark.parametrize("q", ["", "  ", "x" * 51, "ab\x00c", "\x1b[31m"])
def test_autocomplete_rejects_bad_prefix(client: httpx.Client, q: str) -> None:
    response = client.get("/search/autocomplete", params={"q": q})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"


def test_no_placeholder_routes(live: Live) -> None:
    with live.client() as c:
        paths = set(c.get("/search/openapi.json").json()["paths"])
    routes = {"", "/autocomplete", "/healthz", "/recommendations", "/recommendations/basket"}
    routes.add("/recommendations/similar/{product_id}")
    assert paths in (routes, {"/search" + r for r in routes})
