"""Delivery service (`/delivery`): partner presence and positions, assignment, routing and live tracking."""

from deployments.common import create_api, serve_builder

api = create_api(
    "delivery",
    title="Vurksha delivery",
    description="Partner presence and positions, assignment, routing and live tracking.",
)
app = serve_builder(api, "delivery")
