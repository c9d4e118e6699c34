"""A stand-in for Firebase Cloud Messaging (HTTP v1) outside production, mounted in the
notifications application at `/notifications/dev/fcm`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dev/fcm", tags=["dev"])
