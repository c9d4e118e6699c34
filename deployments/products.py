"""Products service (`/products`):
dark stores, categories, catalog, per-store inventory, reviews and ratings.

Which store a customer browses: pass `store_id`, or (signed in) `address_id` of one of your
own addresses, which resolves to the nearest active store serving it (422 `not_serviceable`
when none does; someone else's address is a 404). Without either, listings carry no
availability."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Query
from pydantic import AfterValidator

from deployments.common import (
    CurrentUser,
    Db,
    Principal,
    StoreChoice,
    create_api,
    require_role,
    serve_builder,
)
from models import products
from models.db import utcnow
from models.products import (
    CategoryIn,
    CategoryOut,
    CategoryPatch,
    ImportResult,
    InventoryIn,
    InventoryOut,
    NearbyStoreOut,
    ProductDetail,
    ProductImport,
    ProductIn,
    ProductPage,
    ProductPatch,
    Ratings,
    ReviewIn,
    ReviewPage,
    ReviewResult,
    StoreIn,
    StoreOut,
    StorePatch,
)
from models.users import round_coordinate

# A bulk import: up to MAX_IMPORT_ROWS rows of a few KB each.
MAX_IMPORT_BYTES = 8 * 1024 * 1024

api = create_api(
    "products",
    title="Vurksha products",
    description="Dark stores, categories, catalog, per-store inventory, reviews and ratings.",
    body_limits={"/import": MAX_IMPORT_BYTES},
)

Admin = Annotated[Principal, Depends(require_role("admin"))]
Limit = Annotated[int, Query(ge=1, le=products.MAX_PAGE, description="Page size, 1..100")]
Cursor = Annotated[str | None, Query(max_length=1000, description="`next_cursor` of the previous page")]


# ---------------------------------------------------------------- stores


@api.get("/stores", response_model=list[StoreOut], tags=["stores"])
async def list_stores(db: Db) -> list[products.Store]:
    """Active dark stores."""
    return await products.list_stores(db)


@api.get("/stores/nearby", response_model=list[NearbyStoreOut], tags=["stores"])
async def nearby_stores(
    db: Db,
    lat: Annotated[float, Query(ge=-90, le=90), AfterValidator(round_coordinate)],
    lng: Annotated[float, Query(ge=-180, le=180), AfterValidator(round_coordinate)],
) -> list[NearbyStoreOut]:
    """Active stores whose service radius covers the point, nearest first, with the distance
    and whether each is open now. None → 422 `not_serviceable`."""
    return await products.nearby_stores(db, lat, lng, utcnow())


@api.post("/stores", status_code=201, response_model=StoreOut, tags=["admin"])
async def create_store(body: StoreIn, _: Admin, db: Db) -> products.Store:
    """Admin: open a dark store. Duplicate code → 409 `store_code_taken`."""
    return await products.create_store(db, body)


@api.patch("/stores/{store_id:uuid}", response_model=StoreOut, tags=["admin"])
async def update_store(store_id: uuid.UUID, body: StorePatch, _: Admin, db: Db) -> products.Store:
    """Admin: edit a store (hours, radius, active flag...). The code is immutable."""
    return await products.update_store(db, store_id, body)


@api.put("/stores/{store_id:uuid}/inventory/{product_id:uuid}", response_model=InventoryOut, tags=["admin"])
async def set_inventory(
    store_id: uuid.UUID, product_id: uuid.UUID, body: InventoryIn, _: Admin, db: Db
) -> InventoryOut:
    """Admin: set a store's on-hand stock and low-stock threshold for a product. Setting
    on_hand below what is already reserved → 409 `below_reserved`."""
    return await products.set_inventory(db, store_id, product_id, body)


# ---------------------------------------------------------------- categories


@api.get("/categories", response_model=list[CategoryOut], tags=["categories"])
async def list_categories(db: Db) -> list[CategoryOut]:
    """The active category tree, flat in depth-first order: nest by `parent_id`, siblings are
    ordered by `position`; `depth` is 0 for roots. An inactive category hides its subtree."""
    return await products.category_tree(db)


@api.post("/categories", status_code=201, response_model=CategoryOut, tags=["admin"])
async def create_category(body: CategoryIn, _: Admin, db: Db) -> products.Category:
    """Admin: add a category. Duplicate slug → 409 `slug_taken`; unknown parent → 404."""
    return await products.create_category(db, body)


@api.patch("/categories/{category_id:uuid}", response_model=CategoryOut, tags=["admin"])
async def update_category(category_id: uuid.UUID, body: CategoryPatch, _: Admin, db: Db) -> products.Category:
    """Admin: rename, move or reorder a category. Moving it under itself or a descendant →
    409 `category_cycle`. A rename refreshes its products' search documents."""
    return await products.update_category(db, category_id, body)


# ---------------------------------------------------------------- products


@api.get("", response_model=ProductPage, include_in_schema=False)
@api.get("/", response_model=ProductPage, tags=["products"])
async def list_products(
    db: Db,
    store: StoreChoice,
    category: Annotated[uuid.UUID | None, Query(description="Category id; includes its descendants")] = None,
    cursor: Cursor = None,
    limit: Limit = 20,
) -> ProductPage:
    """Active products by name, cursor-paged. With a store (`store_id`, or `address_id`),
    each item carries that store's availability. Unknown store → 404 `store_not_found`;
    a tampered cursor → 400 `invalid_cursor`."""
    return await products.list_products(db, category_id=category, store_id=store, cursor=cursor, limit=limit)


@api.post("", status_code=201, response_model=ProductDetail, include_in_schema=False)
@api.post("/", status_code=201, response_model=ProductDetail, tags=["admin"])
async def create_product(body: ProductIn, _: Admin, db: Db) -> ProductDetail:
    """Admin: add a product. Prices are integer paise with price <= MRP
    (422 `price_above_mrp`) and a GST slab (422 `invalid_gst_slab`); duplicate SKU → 409."""
    return products.product_detail(await products.create_product(db, body))


@api.post("/import", response_model=ImportResult, tags=["admin"])
async def import_products(body: ProductImport, _: Admin, db: Db) -> ImportResult:
    """Admin: upsert up to 1000 products by SKU in one transaction, all or nothing. Bad rows
    → 422 `import_invalid` with `errors: [{row, code, detail}]` (malformed rows are a 422
    `validation_error` whose `loc` holds the row index); nothing is written."""
    return await products.import_products(db, body)


@api.get("/{product_id:uuid}", response_model=ProductDetail, tags=["products"])
async def get_product(product_id: uuid.UUID, db: Db, store: StoreChoice) -> ProductDetail:
    """One active product: prices, savings, tax rate, images, rating aggregates and, with a
    store, its availability there. Inactive or unknown → 404."""
    return await products.product_view(db, product_id, store)


@api.patch("/{product_id:uuid}", response_model=ProductDetail, tags=["admin"])
async def update_product(product_id: uuid.UUID, body: ProductPatch, _: Admin, db: Db) -> ProductDetail:
    """Admin: edit a product. Read-only fields (id, sku, ratings...) → 422."""
    return products.product_detail(await products.update_product(db, product_id, body))


# ---------------------------------------------------------------- reviews


@api.get("/{product_id:uuid}/reviews", response_model=ReviewPage, tags=["reviews"])
async def list_reviews(product_id: uuid.UUID, db: Db, cursor: Cursor = None, limit: Limit = 20) -> ReviewPage:
    """Reviews of a product, newest first, cursor-paged."""
    return await products.list_reviews(db, product_id, cursor=cursor, limit=limit)


@api.post("/{product_id:uuid}/reviews", response_model=ReviewResult, tags=["reviews"])
async def post_review(product_id: uuid.UUID, body: ReviewIn, principal: CurrentUser, db: Db) -> ReviewResult:
    """Write your review (rating 1..5, optional title and body). One per user per product:
    posting again replaces it. Returns the review and the product's new aggregates."""
    return await products.upsert_review(db, product_id, principal.id, body)


@api.delete("/{product_id:uuid}/reviews/me", response_model=Ratings, tags=["reviews"])
async def delete_review(product_id: uuid.UUID, principal: CurrentUser, db: Db) -> Ratings:
    """Delete your review; returns the product's new aggregates."""
    return await products.delete_review(db, product_id, principal.id)


app = serve_builder(api, "products")
