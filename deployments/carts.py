"""Carts service (`/carts`): live carts held by sharded actors, pricing and stock validation."""

from deployments.common import create_api, serve_builder

api = create_api(
    "carts",
    title="Vurksha carts",
    description="Live carts held by sharded actors, pricing and stock validation.",
)
app = serve_builder(api, "carts")
