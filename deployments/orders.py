"""Orders service (`/orders`): checkout, order lifecycle, history, cancellations and refunds."""

from deployments.common import create_api, serve_builder

api = create_api(
    "orders",
    title="Vurksha orders",
    description="Checkout, order lifecycle, history, cancellations and refunds.",
)
app = serve_builder(api, "orders")
