"""Payments service (`/payments`):
payment gateway integration, signed webhooks, refunds and reconciliation."""

from deployments.common import create_api, serve_builder

api = create_api(
    "payments",
    title="Vurksha payments",
    description="Payment gateway integration, signed webhooks, refunds and reconciliation.",
)
app = serve_builder(api, "payments")
