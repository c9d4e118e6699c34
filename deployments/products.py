"""Products service (`/products`):
dark stores, categories, catalog, per-store inventory, reviews and ratings."""

from deployments.common import create_api, serve_builder

api = create_api(
    "products",
    title="Vurksha products",
    description="Dark stores, categories, catalog, per-store inventory, reviews and ratings.",
)
app = serve_builder(api, "products")
