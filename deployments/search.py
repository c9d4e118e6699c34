"""Search service (`/search`): full-text product search with typo tolerance and facets,
autocomplete, and personalized recommendations.

Recommendations: the `Recommender` deployment (bound into this application, see
actors/recommender.py) ranks candidates with the production model; this ingress reads the
customer's own history first and keeps, in rank order, what the store can sell now. The replica
reuses a ranking for a while (`_Rankings`); the stock filter runs on every request. Every served
list is logged (impressions), in batches."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any

from fastapi import Depends, Header, Query

from actors import carts
from actors.recommender import Recommender, recommender_handle
from deployments.common import CurrentUser, Db, MaybeUser, StoreChoice, create_api, resources, serve_builder
from models import products, recommender, search
from models.db import transaction, utcnow
from models.errors import Unprocessable
from models.recommender import Ranked, RankingCache, Recommendations, Surface
from models.search import SearchPage, SearchParams, Suggestions

log = logging.getLogger("vurksha.search")

api = create_api(
    "search",
    title="Vurksha search",
    description="Full-text product search with typo tolerance and facets, autocomplete, and"
    " personalized recommendations.",
)


@api.get("", response_model=SearchPage, tags=["search"])
@api.get("/", response_model=SearchPage, include_in_schema=False)
async def search_products(params: Annotated[SearchParams, Query()], db: Db) -> SearchPage:
    """Search the catalog. Full-text matches (name weighs most, then brand, category and
    description) rank above typo-tolerant ones; `store_id` adds that store's availability and
    `in_stock=true` keeps only what it can sell. `facets` count category, brand and price band
    over every match of the query and filters (each adds up to `total`). Pass `next_cursor`
    back as `cursor` for the next page; a cursor is bound to its query."""
    secret = resources().settings.cursor_secret.get_secret_value()
    return await search.search(db, params, cursor_secret=secret)


@api.get("/autocomplete", response_model=Suggestions, tags=["search"])
async def autocomplete(
    db: Db,
    q: Annotated[search.Prefix, Query(description="What the user has typed so far (1-50 characters)")],
    store_id: Annotated[
        uuid.UUID | None, Query(description="Suggest only products this store can sell")
    ] = None,
) -> Suggestions:
    """Up to ten suggestions (categories, brands, products) whose name or a word in it starts
    with `q`: name-start matches first, then by popularity. Cached for a few seconds."""
    return await search.autocomplete(db, resources().redis, q, store_id)


# ---------------------------------------------------------------- recommendations

Limit = Annotated[int, Query(ge=1, le=50, description="How many products, 1..50")]


class _Impressions:
    """Served lists, written in one INSERT per `recommender_impressions_flush_seconds` rather
    than one per request. A replica that stops may lose its last interval's worth."""

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, user_id: uuid.UUID | None, served: Recommendations) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            return
        self._pending.append(
            {
                "served_at": utcnow(),
                "user_id": user_id,
                "store_id": served.store_id,
                "surface": served.surface,
                "model_version": served.model_version,
                "product_ids": [item.id for item in served.items],
                "sources": [item.source for item in served.items],
            }
        )
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(resources().settings.recommender_impressions_flush_seconds)
        batch, self._pending = self._pending, []
        try:
            async with transaction(resources().sessionmaker) as session:
                await recommender.record_impressions(session, batch)
        except Exception:
            log.warning("recommendations: %d impressions not recorded", len(batch), exc_info=True)


_impressions = _Impressions()


class _Rankings:
    """This replica's `RankingCache`, and the watch that keeps its version the production one
    (read every `recommender_poll_seconds`, as the Recommender replicas do)."""

    def __init__(self) -> None:
        self._cache: RankingCache | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def ranked(self, key: Hashable, fresh: bool, rank: Callable[[], Awaitable[Ranked]]) -> Ranked:
        """The cached ranking for `key`, else (or when the caller asks for a fresh one) `rank()`."""
        cache = self._started()
        if not fresh and (hit := cache.get(key, time.monotonic())) is not None:
            return hit
        ranked = await rank()
        cache.put(key, ranked, time.monotonic())
        return ranked

    def _started(self) -> RankingCache:
        if self._cache is None:
            settings = resources().settings
            self._cache = RankingCache(settings.recommender_cache_seconds, settings.recommender_cache_entries)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._cache))
        return self._cache

    async def _watch(self, cache: RankingCache) -> None:
        while True:
            try:
                async with resources().sessionmaker() as session:
                    cache.set_version(await recommender.production_version(session))
            except Exception:
                log.warning("recommendations: could not read the production version", exc_info=True)
            await asyncio.sleep(resources().settings.recommender_poll_seconds)


_rankings = _Rankings()


async def _fresh(
    cache_control: Annotated[
        str | None,
        Header(description="`no-cache` ranks afresh instead of reusing this replica's recent ranking"),
    ] = None,
) -> bool:
    return "no-cache" in (cache_control or "").lower()


Fresh = Annotated[bool, Depends(_fresh)]


def _required(store: uuid.UUID | None) -> uuid.UUID:
    if store is None:
        raise Unprocessable("Give store_id or address_id", code="store_required")
    return store


async def _serve(
    db: Db, store: uuid.UUID, ranked: Ranked, limit: int, surface: Surface, user_id: uuid.UUID | None
) -> Recommendations:
    """Keep what the store can sell now, in rank order (the store's best sellers when no model
    has been promoted yet), and log what was served."""
    if ranked.model_version is None:
        ids = await recommender.best_sellers(db, store, limit)
        ranked = Ranked(ids, ["popular"] * len(ids), "popular")
    served = await recommender.sellable(db, store, ranked, limit, surface)
    _impressions.add(user_id, served)
    return served


def _candidates(limit: int) -> int:
    return limit * resources().settings.recommender_oversample


@api.get("/recommendations", response_model=Recommendations, tags=["recommendations"])
async def for_you(
    db: Db, viewer: MaybeUser, store: StoreChoice, fresh: Fresh, limit: Limit = 10
) -> Recommendations:
    """For you: the model's ranking for the signed-in customer, their own regular purchases
    (`buy_again`) among it where they rank, folded in from their delivered orders up to now.
    Without a token, or for a customer with no history the model knows, the store's best
    sellers (`source: popular`). Only what the store (`store_id` or `address_id`) can sell now.
    The ranking is reused for up to `VURKSHA_RECOMMENDER_CACHE_SECONDS` (so an order delivered
    since may not show yet; `Cache-Control: no-cache` ranks afresh); the stock filter is not."""
    store_id = _required(store)
    k = _candidates(limit)

    async def rank() -> Ranked:
        history = (
            ([], [], [])
            if viewer is None
            else await recommender.history(db, viewer.id, resources().settings.recommender_history_lines)
        )
        return await (await recommender_handle()).for_you.remote(*history, str(store_id), k)

    key = ("for_you", None if viewer is None else viewer.id, store_id, k)
    ranked = await _rankings.ranked(key, fresh, rank)
    return await _serve(db, store_id, ranked, limit, "for_you", None if viewer is None else viewer.id)


@api.get("/recommendations/similar/{product_id}", response_model=Recommendations, tags=["recommendations"])
async def similar(
    product_id: uuid.UUID, db: Db, viewer: MaybeUser, store: StoreChoice, fresh: Fresh, limit: Limit = 10
) -> Recommendations:
    """Products like this one (closest by the model's item factors). A product the model does
    not know yet (new) gets the store's best sellers (`source: popular`). The ranking is reused
    for up to `VURKSHA_RECOMMENDER_CACHE_SECONDS` (`Cache-Control: no-cache` ranks afresh)."""
    store_id = _required(store)
    k = _candidates(limit)

    async def rank() -> Ranked:
        return await (await recommender_handle()).similar.remote(str(product_id), str(store_id), k)

    ranked = await _rankings.ranked(("similar", product_id, store_id, k), fresh, rank)
    if ranked.source == "popular":
        await products.get_product(db, product_id)  # 404 for a product that does not exist
    return await _serve(db, store_id, ranked, limit, "similar", None if viewer is None else viewer.id)


@api.get("/recommendations/basket", response_model=Recommendations, tags=["recommendations"])
async def basket(principal: CurrentUser, db: Db, store: StoreChoice, limit: Limit = 10) -> Recommendations:
    """Complete the basket: what goes with the products in your cart (none of them again).
    The store is `store_id` or `address_id`, else the one serving the cart's chosen address."""
    cart = await carts.call_cart((await carts.get_shard(principal.id)).snapshot.remote(principal.id))
    if store is None and cart.address_id is not None:
        store = (await products.store_for_address(db, principal.id, cart.address_id)).id
    store_id = _required(store)
    in_cart = [str(line.product_id) for line in cart.lines]
    ranked = await (await recommender_handle()).basket.remote(in_cart, str(store_id), _candidates(limit))
    return await _serve(db, store_id, ranked, limit, "basket", principal.id)


app = serve_builder(api, "search", bind=[Recommender])
