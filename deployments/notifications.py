"""Notifications service (`/notifications`): push, SMS and email delivery. Outside production
it also serves the dev outbox, where development and tests read the messages "sent"."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from config.settings import get_settings
from deployments import sandbox_fcm
from deployments.common import create_api, resources, serve_builder
from models.channels import DevOutbox, OutboxMessage
from models.users import Phone

api = create_api(
    "notifications",
    title="Vurksha notifications",
    description="Push (FCM), SMS and email; per-user preferences; templates; retries.",
    # The FCM stand-in (outside production only): its callers are our own replicas, which a
    # real FCM would not count against our per-IP limits.
    unlimited=sandbox_fcm.router if get_settings().dev_endpoints else None,
)

if get_settings().dev_endpoints:
    # Registered only outside production, so in production the path is a plain 404.

    @api.get("/dev/outbox", response_model=list[OutboxMessage], tags=["dev"])
    async def dev_outbox(
        to: Annotated[Phone, Query(description="Recipient, any phone format")],
    ) -> list[OutboxMessage]:
        """Messages recorded for a recipient, newest first (development and test only)."""
        return await DevOutbox(resources().redis).read(to)


app = serve_builder(api, "notifications")
