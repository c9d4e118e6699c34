"""Search service (`/search`): full-text product search with typo tolerance and facets, and
autocomplete. Recommendations arrive in a later issue."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Query

from deployments.common import Db, create_api, resources, serve_builder
from models import search
from models.search import SearchPage, SearchParams, Suggestions

api = create_api(
    "search",
    title="Vurksha search",
    description="Full-text product search with typo tolerance and facets, and autocomplete.",
)


@api.get("", response_model=SearchPage, tags=["search"])
@api.get("/", response_model=SearchPage, include_in_schema=False)
async def search_products(params: Annotated[SearchParams, Query()], db: Db) -> SearchPage:
    """Search the catalog. Full-text matches (name weighs most, then brand, category and
    description) rank above typo-tolerant ones; `store_id` adds that store's availability and
    `in_stock=true` keeps only what it can sell. `facets` count category, brand and price band
    over every match of the query and filters (each adds up to `total`). Pass `next_cursor`
    back as `cursor` for the next page; a cursor is bound to its query."""
    return await search.search(db, params, cursor_secret=resources().settings.otp_pepper.get_secret_value())


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


app = serve_builder(api, "search")
