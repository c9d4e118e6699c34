"""Carts service (`/carts`): live carts held by sharded actors, pricing and stock validation.

Every route is one hop: authenticate, then await the method of the caller's shard actor (see
`actors.carts`). A user only ever reaches their own cart (`/carts/me`); the shard validates
against PostgreSQL and writes through to Redis before it answers."""

from __future__ import annotations

import uuid

from actors.carts import on_shard
from deployments.common import CurrentUser, create_api, serve_builder
from models.carts import AddItem, ApplyCoupon, CartView, ChooseAddress, SetQuantity

api = create_api(
    "carts",
    title="Vurksha carts",
    description="Live carts held by sharded actors, pricing and stock validation.",
)


@api.get("/me", response_model=CartView, tags=["cart"])
async def my_cart(principal: CurrentUser) -> CartView:
    """The caller's cart, re-validated and priced against the store serving their address now.
    Lines the store can no longer sell are kept and flagged (`available: false`,
    `available_quantity`, `unavailable_reason`) and count in no total."""
    return await on_shard(principal.id, "view")


@api.post("/me/items", response_model=CartView, tags=["cart"])
async def add_item(body: AddItem, principal: CurrentUser) -> CartView:
    """Add a quantity of a product (added to what the cart already holds). 409
    `insufficient_stock` (with `available_quantity`) beyond what the store can sell, 409
    `cart_full` beyond the distinct-item limit, 422 `quantity_limit` beyond the per-item limit,
    404 `product_not_found`, 409 `product_inactive`, 409 `address_required` without an address."""
    return await on_shard(principal.id, "add_item", body)


@api.patch("/me/items/{product_id}", response_model=CartView, tags=["cart"])
async def set_quantity(product_id: uuid.UUID, body: SetQuantity, principal: CurrentUser) -> CartView:
    """Set a line's quantity (1 to the per-item limit), checked against the store's stock."""
    return await on_shard(principal.id, "set_quantity", product_id, body)


@api.delete("/me/items/{product_id}", response_model=CartView, tags=["cart"])
async def remove_item(product_id: uuid.UUID, principal: CurrentUser) -> CartView:
    """Remove a line; 404 `item_not_in_cart` when it is not there."""
    return await on_shard(principal.id, "remove_item", product_id)


@api.delete("/me", response_model=CartView, tags=["cart"])
async def clear_cart(principal: CurrentUser) -> CartView:
    """Empty the cart (items and coupon). The chosen address stays."""
    return await on_shard(principal.id, "clear")


@api.post("/me/coupon", response_model=CartView, tags=["cart"])
async def apply_coupon(body: ApplyCoupon, principal: CurrentUser) -> CartView:
    """Attach a coupon (replacing any other) if it applies to the cart now. Errors:
    `coupon_not_found` (404), `coupon_not_started`, `coupon_expired`, `coupon_exhausted`,
    `coupon_first_order_only`, `coupon_usage_limit`, `coupon_min_order` (422). A coupon that
    later stops qualifying stays attached and the cart says why (`coupon.reason`)."""
    return await on_shard(principal.id, "apply_coupon", body)


@api.delete("/me/coupon", response_model=CartView, tags=["cart"])
async def remove_coupon(principal: CurrentUser) -> CartView:
    """Detach the coupon."""
    return await on_shard(principal.id, "remove_coupon")


@api.put("/me/address", response_model=CartView, tags=["cart"])
async def choose_address(body: ChooseAddress, principal: CurrentUser) -> CartView:
    """Deliver to one of the caller's addresses: the cart is re-bound to the store serving it
    and re-priced and re-validated there. 404 `address_not_found` (also for another user's
    address), 422 `not_serviceable` when no store delivers there. Without a choice the
    default address is used."""
    return await on_shard(principal.id, "choose_address", body)


app = serve_builder(api, "carts")
