"""Search: full-text product search with typo tolerance and facets, and autocomplete.

Everything runs in PostgreSQL over the catalog tables of `models.products`:
- full-text: `products.search_vector` (name A > brand B > category C > description D, English
  stemming, GIN index), queried with `websearch_to_tsquery` OR a prefix query on the words the
  user typed, so "banan" already matches "bananas";
- typos (Meilisearch's default rules): each word of the query that is not a word of the
  catalog (`search_words`, kept by triggers on products) is corrected to the catalog word at
  the smallest edit distance (letters dropped, added, replaced or two swapped; one edit from
  5 letters, two from 9, the first letter kept), or split in two catalog words ("lunchbox");
  two adjacent words may also be one catalog word ("space boy"). The corrected query is a
  third full-text arm whose hits rank below those of the words as typed;
- near misses: `pg_trgm` word similarity (`<%`, GIN trigram indexes on name and brand), so
  "bananna" finds bananas too; these fuzzy-only hits always rank below full-text hits;
- facets (category, brand, price band) are counted over the same filtered result set as the
  total, in the same statement, so they always add up to it.

User input never becomes SQL text: every value is a bound parameter. The SQL fragments
composed below are constants of this module.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import itertools
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncSession

from models.errors import AppError, NotFound, Unprocessable

log = logging.getLogger(__name__)

MAX_QUERY_LENGTH = 100
MAX_LIMIT = 50
DEFAULT_LIMIT = 20
AUTOCOMPLETE_MAX = 10
AUTOCOMPLETE_MAX_LENGTH = 50
AUTOCOMPLETE_CACHE_TTL_SECONDS = 30
# Trigram matching on one or two characters matches nearly everything: fuzzy needs three.
FUZZY_MIN_LENGTH = 3
# Typo tolerance, as Meilisearch's defaults: one edit in words of 5-8 letters, two from 9.
ONE_TYPO_MIN_LENGTH = 5
TWO_TYPOS_MIN_LENGTH = 9
# The budget is that of the word meant: a 5-letter word with a letter dropped has 4 left.
CORRECTABLE_MIN_LENGTH = ONE_TYPO_MIN_LENGTH - 1
# A word split in two (or two words joined) only from parts of this many letters.
SPLIT_MIN_PART = 3
# Catalog words considered per query word, nearest by trigram distance first.
TYPO_CANDIDATES = 20

# Price bands in paise: [0, 50), [50, 100), [100, 200), [200, 500), [500, ∞) rupees.
# `width_bucket(price, PRICE_BAND_EDGES)` numbers them 0..4.
PRICE_BAND_EDGES = (5_000, 10_000, 20_000, 50_000)


class SortOrder(enum.StrEnum):
    relevance = "relevance"
    price_asc = "price_asc"
    price_desc = "price_desc"
    rating = "rating"


class InvalidCursor(AppError):
    status_code = 400
    code = "invalid_cursor"


# ---------------------------------------------------------------- schemas

# No control characters: PostgreSQL text cannot hold NUL, and none belongs in a search.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
SearchText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_LENGTH, pattern=PRINTABLE),
]
Prefix = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=AUTOCOMPLETE_MAX_LENGTH, pattern=PRINTABLE
    ),
]
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80, pattern=PRINTABLE)
]
Paise = Annotated[int, Field(ge=0, le=100_000_000)]


class SearchParams(BaseModel):
    """Query parameters of `GET /search` (unknown parameters are rejected)."""

    model_config = {"extra": "forbid"}

    q: SearchText = Field(description="What the user typed (1-100 characters)")
    store_id: uuid.UUID | None = Field(
        default=None, description="The store the user shops from: adds its availability"
    )
    category: Name | None = Field(
        default=None, description="Category slug or id; its descendant categories are included"
    )
    brand: Name | None = Field(default=None, description="Exact brand, case-insensitive")
    min_price: Paise | None = Field(default=None, description="Lowest selling price, paise")
    max_price: Paise | None = Field(default=None, description="Highest selling price, paise")
    in_stock: bool = Field(default=False, description="Only products the store can sell (needs store_id)")
    sort: SortOrder = SortOrder.relevance
    cursor: str | None = Field(default=None, max_length=512, description="`next_cursor` of the previous page")
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)


class CategoryRef(BaseModel):
    id: uuid.UUID
    slug: str
    name: str


class SearchHit(BaseModel):
    id: uuid.UUID
    sku: str
    name: str
    brand: str | None
    unit: str
    image: str | None
    category: CategoryRef
    mrp_paise: int
    price_paise: int
    currency: str
    rating_average: float | None = Field(description="Mean rating 1-5, null when unrated")
    rating_count: int
    match: str = Field(
        description="`text` (full-text match of the words as typed), `typo` (of the query with its typos"
        " corrected or words split/joined) or `fuzzy` (trigram similarity only)"
    )
    available: int | None = Field(description="Units the store can sell now; null without store_id")


class CategoryFacet(CategoryRef):
    count: int


class BrandFacet(BaseModel):
    brand: str | None = Field(description="Null is the bucket of unbranded products")
    count: int


class PriceBandFacet(BaseModel):
    key: str
    min_paise: int
    max_paise: int | None = Field(description="Exclusive upper bound; null for the top band")
    count: int


class Facets(BaseModel):
    category: list[CategoryFacet]
    brand: list[BrandFacet]
    price: list[PriceBandFacet]


class SearchPage(BaseModel):
    total: int = Field(description="Products matching the query and filters (all pages)")
    items: list[SearchHit]
    facets: Facets = Field(description="Counts over the whole filtered result set; each sums to total")
    corrected_q: str | None = Field(
        default=None,
        description="The query with the words that are not in the catalog corrected (`choclate` is"
        " `chocolate`, `lunchbox` is `lunch box`), when one was; its matches rank after exact ones",
    )
    next_cursor: str | None


class Suggestion(BaseModel):
    kind: str = Field(description="`product`, `brand` or `category`")
    text: str
    id: uuid.UUID | None = Field(description="Product or category id; null for brands")
    slug: str | None = Field(description="Category slug; null otherwise")


class Suggestions(BaseModel):
    q: str
    suggestions: list[Suggestion]


# ---------------------------------------------------------------- input helpers

_WORD = re.compile(r"[^\W_]+")
# websearch syntax (quotes, exclusion, OR): then the user means it literally, no prefix query.
_WEBSEARCH_SYNTAX = re.compile(r"[\"]|(^|\s)-\w|\bor\b", re.IGNORECASE)


def plain_words(q: str) -> list[str]:
    """The words of `q`, lower-cased: letters and digits only, so any tsquery built of them is
    valid syntax (it is still passed as a bound parameter). Empty when the query uses websearch
    syntax (quotes, exclusion, OR): then the user means it literally."""
    return [] if _WEBSEARCH_SYNTAX.search(q) else [w.lower() for w in _WORD.findall(q)]


def prefix_tsquery(q: str) -> str | None:
    """`w1 & w2 & w3:*`: the last word may be unfinished. None without plain words."""
    words = plain_words(q)
    return " & ".join([*words[:-1], words[-1] + ":*"]) if words else None


def literal_patterns(q: str) -> list[str] | None:
    """LIKE patterns that a name holding every word of `q` as typed matches (`%w1%`...)."""
    return [f"%{like_escape(w)}%" for w in words] if (words := plain_words(q)) else None


def like_escape(s: str) -> str:
    """Escape LIKE metacharacters (backslash is PostgreSQL's default LIKE escape)."""
    return re.sub(r"([\\%_])", r"\\\1", s)


def price_bands() -> list[tuple[str, int, int | None]]:
    """(key, lowest paise, exclusive upper bound or None) of each band, in band order."""
    lows = (0, *PRICE_BAND_EDGES)
    highs: tuple[int | None, ...] = (*PRICE_BAND_EDGES, None)
    return [
        (f"{low // 100}-{high // 100}" if high is not None else f"{low // 100}+", low, high)
        for low, high in zip(lows, highs, strict=True)
    ]


# ---------------------------------------------------------------- typos


def allowed_typos(word: str) -> int:
    if len(word) >= TWO_TYPOS_MIN_LENGTH:
        return 2
    return 1 if len(word) >= ONE_TYPO_MIN_LENGTH else 0


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: a letter dropped, added or replaced, or two adjacent
    letters swapped, each count one edit."""
    before: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
        before, previous = previous, current
    return previous[-1]


def _splits(word: str) -> list[tuple[str, str]]:
    if not word.isalpha():
        return []
    return [(word[:i], word[i:]) for i in range(SPLIT_MIN_PART, len(word) - SPLIT_MIN_PART + 1)]


# Which of the given words are catalog words (and in how many active products).
KNOWN_WORDS_SQL = """
SELECT word, products FROM search_words WHERE word = ANY(CAST(:words AS text[])) AND products > 0
"""

# For each misspelt word, the catalog words that start with its letter, nearest by trigram
# distance (a GiST KNN scan); the edit distance itself is then computed on these few.
NEAREST_WORDS_SQL = """
SELECT t.term, c.word, c.products FROM unnest(CAST(:terms AS text[])) AS t(term)
CROSS JOIN LATERAL (
    SELECT w.word, w.products FROM search_words AS w
    WHERE w.products > 0 AND left(w.word, 1) = left(t.term, 1)
    ORDER BY w.word <-> t.term
    LIMIT :candidates
) AS c
"""


@dataclass(frozen=True)
class Correction:
    tsquery: str  # the typo-tolerant full-text arm (to_tsquery syntax; words are [^\W_]+)
    text: str | None  # the query as corrected, when a word of it was not a catalog word


def _corrections(word: str, nearest: list[tuple[str, int]]) -> list[str]:
    """The catalog words nearest to `word` within its typo budget, which is that of the longer
    of the two words (the shopper meant the catalog word: "sugr" is "sugar" with a letter
    dropped), most common first; all of them, when several are as near ("chian": china, chain)."""
    found: list[tuple[int, int, str]] = []
    for candidate, products in nearest:
        limit = allowed_typos(max(word, candidate, key=len))
        if abs(len(candidate) - len(word)) <= limit and (d := edit_distance(word, candidate)) <= limit:
            found.append((d, -products, candidate))
    found.sort()
    return [candidate for d, _, candidate in found if d == found[0][0]]


async def correct_typos(session: AsyncSession, q: str) -> Correction | None:
    """The typo-tolerant reading of `q` (see the module's docstring), or None when nothing in
    it is a typo, a split or a join of catalog words. Quotes, exclusions and OR mean the user
    wants exactly that: no correction then."""
    words = plain_words(q)
    if not words:
        return None
    if len(words) == 1 and len(words[0]) < CORRECTABLE_MIN_LENGTH:
        return None
    joins = [a + b for a, b in itertools.pairwise(words)]
    asked = {*words, *joins, *(part for w in words for pair in _splits(w) for part in pair)}
    rows = await session.execute(text(KNOWN_WORDS_SQL), {"words": sorted(asked)})
    known = {r.word: r.products for r in rows}
    misspelt = sorted(
        {w for w in words if w not in known and w.isalpha() and len(w) >= CORRECTABLE_MIN_LENGTH}
    )
    nearest: dict[str, list[tuple[str, int]]] = {w: [] for w in misspelt}
    if misspelt:
        rows = await session.execute(
            text(NEAREST_WORDS_SQL), {"terms": misspelt, "candidates": TYPO_CANDIDATES}
        )
        for r in rows:
            nearest[r.term].append((r.word, r.products))

    clauses: list[str] = []  # one per word: the word as typed or what it may have meant
    shown: list[str] = []
    corrected = False  # some word was read otherwise
    for i, word in enumerate(words):
        typed = word + ":*" if i == len(words) - 1 else word
        alternatives = [typed]
        if word not in known:
            corrections = _corrections(word, nearest.get(word, []))
            split = max(
                (pair for pair in _splits(word) if pair[0] in known and pair[1] in known),
                key=lambda pair: min(known[pair[0]], known[pair[1]]),
                default=None,
            )
            alternatives += corrections
            if split is not None:
                alternatives.append(f"({split[0]} & {split[1]})")
            shown.append(corrections[0] if corrections else " ".join(split) if split else word)
            corrected = corrected or len(alternatives) > 1
        else:
            shown.append(word)
        clauses.append("(" + " | ".join(alternatives) + ")")
    # Two adjacent words that the catalog writes as one ("space boy"): either reading.
    merged: list[str] = []
    i = 0
    while i < len(words):
        if i < len(joins) and joins[i] in known and min(len(words[i]), len(words[i + 1])) >= SPLIT_MIN_PART:
            merged.append(f"(({clauses[i]} & {clauses[i + 1]}) | {joins[i]})")
            i += 2
        else:
            merged.append(clauses[i])
            i += 1
    if not corrected and len(merged) == len(words):  # no word read otherwise, none joined
        return None
    return Correction(tsquery=" & ".join(merged), text=" ".join(shown) if corrected else None)


# ---------------------------------------------------------------- cursors


def _cursor_key(secret: str) -> bytes:
    # Derived from a deployment secret with a purpose label, so the cursor key differs from
    # every other use of that secret.
    return hmac.new(secret.encode(), b"vurksha:search-cursor:v1", hashlib.sha256).digest()


def query_fingerprint(params: SearchParams) -> str:
    """What a cursor is bound to: the query, filters and sort (not the page size)."""
    data = params.model_dump(mode="json", exclude={"cursor", "limit"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class _CursorBody(BaseModel):
    model_config = {"extra": "forbid"}

    f: str
    k1: float
    k2: float
    id: uuid.UUID


def encode_cursor(secret: str, params: SearchParams, k1: float, k2: float, last_id: uuid.UUID) -> str:
    body = json.dumps(
        {"f": query_fingerprint(params), "k1": k1, "k2": k2, "id": str(last_id)}, separators=(",", ":")
    ).encode()
    tag = hmac.new(_cursor_key(secret), body, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(tag + body).decode().rstrip("=")


def decode_cursor(secret: str, params: SearchParams, cursor: str) -> _CursorBody:
    """The position a cursor points after. Anything forged, altered, truncated or minted for
    another query is a 400 `invalid_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise InvalidCursor("The cursor is not valid") from None
    tag, body = raw[:16], raw[16:]
    expected = hmac.new(_cursor_key(secret), body, hashlib.sha256).digest()[:16]
    if len(tag) != 16 or not hmac.compare_digest(tag, expected):
        raise InvalidCursor("The cursor is not valid")
    try:
        decoded = _CursorBody.model_validate_json(body)
    except ValidationError:
        raise InvalidCursor("The cursor is not valid") from None
    if decoded.f != query_fingerprint(params):
        raise InvalidCursor("The cursor belongs to a different search")
    return decoded


# ---------------------------------------------------------------- search


# The query is `websearch_to_tsquery(q)` OR the prefix query of its words. The match
# condition repeats it inline in WHERE (not through the `tsq` CTE) so that the planner can
# drive the scan from the GIN indexes: a BitmapOr of the tsvector and the two trigram indexes.
#
# One statement: the filtered matches (materialized once), the page after the cursor, the
# total and the three facets over the same matches.
#
# Ordering is always `k1 DESC, k2 DESC, id DESC` so one row comparison serves as the keyset
# condition for every sort: price ascending sorts by the negated price.
#
# Relevance score: tier 2 when the name matches the full-text query, 1 when another field
# does, plus 0.5 * ts_rank_cd (shorter documents favoured, scaled into [0, 1)), plus 0.25 when
# the name holds the words exactly as typed, not only their stems ("plates" before "plate");
# a hit of the typo-corrected query only (`:typo`, see correct_typos) scores 0.5 + 0.45 * its rank; a
# fuzzy-only hit scores 0.49 * its trigram word similarity to name or brand (computed only
# for those rows: it is the expensive part). Tiers never overlap, so the words as typed
# always rank above corrected ones, those above fuzzy ones, and name matches above
# brand/category/description-only ones.
SEARCH_SQL = """
WITH tsq AS (SELECT (CASE WHEN CAST(:prefix AS text) IS NULL
        THEN websearch_to_tsquery('english', :q)
        ELSE websearch_to_tsquery('english', :q) || to_tsquery('english', :prefix) END) AS query,
    to_tsquery('english', CAST(:typo AS text)) AS typo_query),
matched AS MATERIALIZED (
    SELECT p.id, p.category_id, p.brand, p.price_paise, p.rating_count, m.fts, m.typo, i.available,
        CASE CAST(:sort AS text)
            WHEN 'price_asc' THEN -p.price_paise::float8
            WHEN 'price_desc' THEN p.price_paise::float8
            WHEN 'rating' THEN coalesce(p.rating_sum::float8 / nullif(p.rating_count, 0), 0)
            ELSE CASE WHEN m.fts THEN
                    (CASE WHEN ts_filter(p.search_vector, '{a}') @@ tsq.query THEN 2 ELSE 1 END)
                    + 0.5 * ts_rank_cd(p.search_vector, tsq.query, 1 | 32)::float8
                    + (CASE WHEN CAST(:literal AS text[]) IS NOT NULL
                        AND lower(p.name) LIKE ALL (CAST(:literal AS text[])) THEN 0.25 ELSE 0 END)
                WHEN m.typo THEN 0.5 + 0.45 * ts_rank_cd(p.search_vector, tsq.typo_query, 1 | 32)::float8
                ELSE 0.49 * greatest(
                    word_similarity(:q, p.name), word_similarity(:q, coalesce(p.brand, ''))
                )::float8 END
        END AS k1,
        p.rating_count::float8 AS k2
    FROM products AS p
    CROSS JOIN tsq
    CROSS JOIN LATERAL (SELECT coalesce(p.search_vector @@ tsq.query, false) AS fts,
        coalesce(p.search_vector @@ tsq.typo_query, false) AS typo) AS m
    LEFT JOIN LATERAL (
        SELECT inv.on_hand - inv.reserved AS available FROM inventory AS inv
        WHERE inv.store_id = CAST(:store_id AS uuid) AND inv.product_id = p.id
    ) AS i ON true
    WHERE p.is_active
        AND (p.search_vector @@ (CASE WHEN CAST(:prefix AS text) IS NULL
        THEN websearch_to_tsquery('english', :q)
        ELSE websearch_to_tsquery('english', :q) || to_tsquery('english', :prefix) END)
             OR (CAST(:typo AS text) IS NOT NULL
                 AND p.search_vector @@ to_tsquery('english', CAST(:typo AS text)))
             OR (CAST(:fuzzy AS boolean) AND (:q <% p.name OR :q <% p.brand)))
        AND (CAST(:categories AS uuid[]) IS NULL OR p.category_id = ANY(CAST(:categories AS uuid[])))
        AND (CAST(:brand AS text) IS NULL OR lower(p.brand) = lower(:brand))
        AND (CAST(:min_price AS integer) IS NULL OR p.price_paise >= :min_price)
        AND (CAST(:max_price AS integer) IS NULL OR p.price_paise <= :max_price)
        AND (NOT CAST(:in_stock AS boolean) OR coalesce(i.available, 0) > 0)
),
page AS (
    SELECT * FROM matched
    WHERE CAST(:after_id AS uuid) IS NULL
        OR (k1, k2, id) < (CAST(:after_k1 AS float8), CAST(:after_k2 AS float8), CAST(:after_id AS uuid))
    ORDER BY k1 DESC, k2 DESC, id DESC
    LIMIT :limit_plus_one
)
SELECT
    (SELECT count(*) FROM matched) AS total,
    (SELECT coalesce(json_agg(json_build_object(
                'id', c.id, 'slug', c.slug, 'name', c.name, 'count', f.n
            ) ORDER BY f.n DESC, c.name), '[]')
        FROM (SELECT category_id, count(*) AS n FROM matched GROUP BY category_id) AS f
        JOIN categories AS c ON c.id = f.category_id) AS category_facet,
    (SELECT coalesce(json_agg(json_build_object('brand', f.brand, 'count', f.n)
            ORDER BY f.n DESC, f.brand NULLS LAST), '[]')
        FROM (SELECT brand, count(*) AS n FROM matched GROUP BY brand) AS f) AS brand_facet,
    (SELECT coalesce(json_object_agg(f.band, f.n), '{}')
        FROM (SELECT width_bucket(price_paise, CAST(:band_edges AS integer[])) AS band, count(*) AS n
              FROM matched GROUP BY 1) AS f) AS price_facet,
    (SELECT coalesce(json_agg(json_build_object(
                'k1', pg.k1, 'k2', pg.k2, 'id', p.id, 'sku', p.sku, 'name', p.name,
                'brand', p.brand, 'unit', p.unit, 'image', p.images ->> 0,
                'category', json_build_object('id', c.id, 'slug', c.slug, 'name', c.name),
                'mrp_paise', p.mrp_paise, 'price_paise', p.price_paise, 'currency', p.currency,
                'rating_count', p.rating_count, 'rating_sum', p.rating_sum,
                'fts', pg.fts, 'typo', pg.typo, 'available', pg.available
            ) ORDER BY pg.k1 DESC, pg.k2 DESC, pg.id DESC), '[]')
        FROM page AS pg
        JOIN products AS p ON p.id = pg.id
        JOIN categories AS c ON c.id = p.category_id) AS items
"""

# pg_trgm's similarity operators (and ILIKE) are costed like a cheap comparison, so on a
# catalog of a few thousand rows the planner often prefers a sequential scan that runs
# word_similarity on every row (40-80 ms at 4,000 products; 15 ms of ILIKE for autocomplete)
# over the BitmapOr of the GIN indexes (about 1 ms). For this
# transaction only: bitmap scans are the one access path left to it (the small lookups by
# primary key become bitmap scans too, at no real cost), and plans are made for the actual
# parameters, since a generic plan cannot use an index for the optional fuzzy arm.
# JIT goes off too: a plan that must still scan a small table sequentially carries the
# disabled-path penalty in its cost, which would otherwise cross jit_above_cost and spend
# a second compiling. Everything is put back right after the statement.
# No index is missing: 0002's GIN indexes serve both statements (see their EXPLAIN). A
# lasting alternative to this guard would be a migration raising the declared COST of
# word_similarity_commutator_op (pg_trgm) and texticlike (ILIKE), which
# needs ownership of the extension's functions.
PLANNER_GUARD_SQL = """
SELECT set_config('enable_seqscan', 'off', true), set_config('enable_indexscan', 'off', true),
    set_config('enable_indexonlyscan', 'off', true),
    set_config('plan_cache_mode', 'force_custom_plan', true), set_config('jit', 'off', true)
"""
PLANNER_RESET_SQL = """
SELECT set_config(name, reset_val, true) FROM pg_settings
WHERE name IN ('enable_seqscan', 'enable_indexscan', 'enable_indexonlyscan', 'plan_cache_mode', 'jit')
"""


async def _run_on_indexes(session: AsyncSession, sql: str, params: dict[str, Any]) -> list[Row[Any]]:
    """Run one statement under PLANNER_GUARD_SQL and put the planner settings back (on an
    error the rollback undoes them)."""
    await session.execute(text(PLANNER_GUARD_SQL))
    rows = list((await session.execute(text(sql), params)).all())
    await session.execute(text(PLANNER_RESET_SQL))
    return rows


CATEGORY_SCOPE_SQL = """
WITH RECURSIVE root AS (
    SELECT id FROM categories
    WHERE slug = :category OR (CAST(:category_id AS uuid) IS NOT NULL AND id = CAST(:category_id AS uuid))
    LIMIT 1
), scope AS (
    SELECT id FROM root
    UNION
    SELECT c.id FROM categories AS c JOIN scope AS s ON c.parent_id = s.id
)
SELECT array_agg(id) FROM scope
"""


def _as_uuid(s: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(s)
    except ValueError:
        return None


async def _category_scope(session: AsyncSession, category: str) -> list[uuid.UUID]:
    ids = await session.scalar(
        text(CATEGORY_SCOPE_SQL), {"category": category, "category_id": _as_uuid(category)}
    )
    if not ids:
        raise NotFound("No such category", code="category_not_found")
    return list(ids)


async def _check_store(session: AsyncSession, store_id: uuid.UUID) -> None:
    found = await session.scalar(
        text("SELECT true FROM stores WHERE id = :id AND is_active"), {"id": store_id}
    )
    if not found:
        raise NotFound("No such store", code="store_not_found")


def search_sql_params(
    params: SearchParams,
    categories: list[uuid.UUID] | None,
    after: _CursorBody | None,
    correction: Correction | None = None,
) -> dict[str, Any]:
    """The bound parameters of SEARCH_SQL (the benchmark runs the same statement directly)."""
    return {
        "q": params.q,
        "prefix": prefix_tsquery(params.q),
        "typo": correction.tsquery if correction else None,
        "literal": literal_patterns(params.q),
        # Quotes, exclusions and OR mean the user wants exactly that: no near misses.
        "fuzzy": len(params.q) >= FUZZY_MIN_LENGTH and not _WEBSEARCH_SYNTAX.search(params.q),
        "sort": params.sort.value,
        "store_id": params.store_id,
        "categories": categories,
        "brand": params.brand,
        "min_price": params.min_price,
        "max_price": params.max_price,
        "in_stock": params.in_stock,
        "after_k1": after.k1 if after else None,
        "after_k2": after.k2 if after else None,
        "after_id": after.id if after else None,
        "limit_plus_one": params.limit + 1,
        "band_edges": list(PRICE_BAND_EDGES),
    }


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def search(session: AsyncSession, params: SearchParams, *, cursor_secret: str) -> SearchPage:
    """One page of products matching `params`, with the total and facets of all matches."""
    if params.in_stock and params.store_id is None:
        raise Unprocessable("in_stock=true needs the store_id of the store to check", code="store_required")
    if params.min_price is not None and params.max_price is not None and params.min_price > params.max_price:
        raise Unprocessable("min_price is above max_price", code="invalid_price_range")
    after = decode_cursor(cursor_secret, params, params.cursor) if params.cursor else None
    if params.store_id is not None:
        await _check_store(session, params.store_id)
    categories = await _category_scope(session, params.category) if params.category else None

    bands = price_bands()
    if not _WORD.search(params.q):  # punctuation only: nothing can match
        return SearchPage(
            total=0,
            items=[],
            facets=Facets(
                category=[],
                brand=[],
                price=[PriceBandFacet(key=k, min_paise=lo, max_paise=hi, count=0) for k, lo, hi in bands],
            ),
            next_cursor=None,
        )

    correction = await correct_typos(session, params.q)
    (row,) = await _run_on_indexes(
        session, SEARCH_SQL, search_sql_params(params, categories, after, correction)
    )
    rows = _loads(row.items)
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    items = [
        SearchHit(
            id=r["id"],
            sku=r["sku"],
            name=r["name"],
            brand=r["brand"],
            unit=r["unit"],
            image=r["image"],
            category=CategoryRef(**r["category"]),
            mrp_paise=r["mrp_paise"],
            price_paise=r["price_paise"],
            currency=r["currency"],
            rating_average=round(r["rating_sum"] / r["rating_count"], 2) if r["rating_count"] else None,
            rating_count=r["rating_count"],
            match="text" if r["fts"] else "typo" if r["typo"] else "fuzzy",
            available=max(r["available"], 0)
            if r["available"] is not None
            else (0 if params.store_id else None),
        )
        for r in rows
    ]
    next_cursor = None
    if has_more:
        last = rows[-1]
        next_cursor = encode_cursor(cursor_secret, params, float(last["k1"]), float(last["k2"]), last["id"])
    price_counts = {int(k): v for k, v in _loads(row.price_facet).items()}
    return SearchPage(
        total=row.total,
        items=items,
        facets=Facets(
            category=[CategoryFacet(**f) for f in _loads(row.category_facet)],
            brand=[BrandFacet(**f) for f in _loads(row.brand_facet)],
            price=[
                PriceBandFacet(key=key, min_paise=lo, max_paise=hi, count=price_counts.get(i, 0))
                for i, (key, lo, hi) in enumerate(bands)
            ],
        ),
        corrected_q=correction.text if correction else None,
        next_cursor=next_cursor,
    )


# ---------------------------------------------------------------- autocomplete

# Word-prefix matching with LIKE only (no regex: it is the per-row cost that matters at short
# prefixes, where most of the catalog is scanned): the name starts with the prefix, or a word
# after a space or a hyphen does. From three characters on, the trigram GIN indexes on name
# and brand serve these patterns (a BitmapOr); for one or two characters a scan of a few
# thousand rows is what any index would cost too, and the Redis cache absorbs the repeats.
# Order: tier 0 (the name itself starts with the prefix; brands and categories always) before
# tier 1 (a later word does); within a tier categories, then brands, then products; the more
# popular first (products rated most often, brands with the most products).
AUTOCOMPLETE_SQL = """
WITH cand AS MATERIALIZED (
    SELECT p.id, p.name, p.brand, p.rating_count,
        p.name ILIKE :starts AS name_starts,
        (p.name ILIKE :starts OR p.name ILIKE :space_word OR p.name ILIKE :hyphen_word) AS name_word,
        p.brand ILIKE :starts AS brand_starts
    FROM products AS p
    WHERE p.is_active
        AND (p.name ILIKE :starts OR p.name ILIKE :space_word OR p.name ILIKE :hyphen_word
             OR p.brand ILIKE :starts)
        AND (CAST(:store_id AS uuid) IS NULL OR EXISTS (
            SELECT 1 FROM inventory AS inv
            WHERE inv.product_id = p.id AND inv.store_id = CAST(:store_id AS uuid)
                AND inv.on_hand > inv.reserved))
),
prod AS (
    SELECT 'product' AS kind, 2 AS kind_order, id, name AS text, NULL AS slug,
        CASE WHEN name_starts THEN 0 ELSE 1 END AS tier, rating_count::bigint AS pop
    FROM cand WHERE name_word
    ORDER BY tier, pop DESC, length(name), name
    LIMIT :max
),
brand AS (
    SELECT 'brand' AS kind, 1 AS kind_order, NULL::uuid AS id, brand AS text, NULL AS slug,
        0 AS tier, count(*) AS pop
    FROM cand WHERE brand_starts
    GROUP BY brand
    ORDER BY pop DESC, brand
    LIMIT 3
),
cat AS (
    SELECT 'category' AS kind, 0 AS kind_order, c.id, c.name AS text, c.slug,
        0 AS tier, -c.position::bigint AS pop
    FROM categories AS c
    WHERE c.is_active AND (c.name ILIKE :starts OR c.name ILIKE :space_word OR c.name ILIKE :hyphen_word)
    ORDER BY (c.name ILIKE :starts) DESC, c.parent_id IS NULL DESC, c.position, c.name
    LIMIT 3
)
SELECT kind, id, text, slug FROM (
    SELECT * FROM cat UNION ALL SELECT * FROM brand UNION ALL SELECT * FROM prod
) AS s
ORDER BY tier, kind_order, pop DESC, text
LIMIT :max
"""


def autocomplete_sql_params(q: str, store_id: uuid.UUID | None) -> dict[str, Any]:
    prefix = like_escape(q.lower())
    return {
        "starts": prefix + "%",
        "space_word": "% " + prefix + "%",
        "hyphen_word": "%-" + prefix + "%",
        "store_id": store_id,
        "max": AUTOCOMPLETE_MAX,
    }


def _cache_key(q: str, store_id: uuid.UUID | None) -> str:
    digest = hashlib.sha256(q.lower().encode()).hexdigest()[:24]
    return f"search:ac:v1:{store_id or '-'}:{digest}"


async def autocomplete(
    session: AsyncSession, redis: Redis | None, q: str, store_id: uuid.UUID | None
) -> Suggestions:
    """Up to ten suggestions for what the user is typing. Results are cached in Redis for a
    few seconds per (store, prefix): the first characters of a query are the hottest keys,
    and a catalog edit shows up within the TTL. Redis being down only costs the cache."""
    key = _cache_key(q, store_id)
    if redis is not None:
        try:
            cached = await redis.get(key)
        except RedisError:
            log.warning("autocomplete cache unavailable", exc_info=True)
            cached = None
        if cached is not None:
            return Suggestions(q=q, suggestions=[Suggestion(**s) for s in json.loads(cached)])
    if store_id is not None:
        await _check_store(session, store_id)
    rows = await _run_on_indexes(session, AUTOCOMPLETE_SQL, autocomplete_sql_params(q, store_id))
    suggestions = [Suggestion(kind=r.kind, text=r.text, id=r.id, slug=r.slug) for r in rows]
    if redis is not None:
        payload = json.dumps([s.model_dump(mode="json") for s in suggestions])
        try:
            await redis.set(key, payload, ex=AUTOCOMPLETE_CACHE_TTL_SECONDS)
        except RedisError:
            log.warning("autocomplete cache unavailable", exc_info=True)
    return Suggestions(q=q, suggestions=suggestions)
