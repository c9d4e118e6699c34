"""Search service (`/search`): full-text search, autocomplete, facets and recommendations."""

from deployments.common import create_api, serve_builder

api = create_api(
    "search",
    title="Vurksha search",
    description="Full-text search, autocomplete, facets and recommendations.",
)
app = serve_builder(api, "search")
