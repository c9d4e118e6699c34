"""A stand-in for Firebase Cloud Messaging (HTTP v1) outside production, served by the sandbox
gateway application at `/sandbox-gateway/fcm` (its own process: the notifications replica that
sends does not also pay for answering).

It serves Google's OAuth2 token endpoint for service accounts (`/token`) and FCM's
`/v1/projects/{project}/messages:send`, answering errors in Google's formats, so
`models.push.FcmPush` runs against it unchanged. The `/sandbox/...` controls do what a device
or FCM itself would: unregister a token, fail the next sends, show what was delivered. The
rules are in `models/sandbox_fcm.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from config.settings import get_settings
from deployments.common import resources
from models.channels import OutboxMessage
from models.push import JWT_BEARER, TOKEN_ALPHABET, TOKEN_MAX, load_service_account
from models.sandbox_fcm import (
    AccessToken,
    FaultRequest,
    GoogleErrorBody,
    OAuthErrorBody,
    SandboxFcm,
    SandboxFcmError,
    SendRequest,
    SendResponse,
    invalid_argument,
    validation_error,
)


class GoogleErrorRoute(APIRoute):
    """Errors of these routes in Google's formats, bad input included. Caught per route, not
    by app-wide handlers: the router is mounted into the sandbox gateway, whose other routes
    answer in Razorpay's format."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                error: SandboxFcmError = validation_error(exc.errors(), exc.body)
            except SandboxFcmError as exc:
                error = exc
            except StarletteHTTPException as exc:  # a body FastAPI could not parse at all
                if exc.status_code != 400:
                    raise
                error = invalid_argument(None, "Invalid JSON payload received.")
            return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)

        return handle


router = APIRouter(prefix="/fcm", tags=["fcm"], route_class=GoogleErrorRoute)

BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="FcmAccessToken",
    description="An access token from /sandbox-gateway/fcm/token",
)


@lru_cache
def sandbox() -> SandboxFcm:
    """The replica's stand-in, made on first use (the service-account key is parsed once)."""
    return SandboxFcm(resources().redis, load_service_account(get_settings()))


def _google(description: str) -> dict[str, Any]:
    return {"model": GoogleErrorBody, "description": description}


GOOGLE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _google("INVALID_ARGUMENT: a bad message or token, or a queued fault (Google's format)"),
    401: _google("UNAUTHENTICATED: no live access token; or a queued THIRD_PARTY_AUTH_ERROR"),
    403: _google("PERMISSION_DENIED: another project; or a queued SENDER_ID_MISMATCH"),
    404: _google("NOT_FOUND: the token is UNREGISTERED"),
    429: _google("RESOURCE_EXHAUSTED: a queued QUOTA_EXCEEDED (Retry-After when queued so)"),
    500: _google("INTERNAL: a queued fault"),
    503: _google("UNAVAILABLE: a queued fault (Retry-After when queued so)"),
}
BAD_INPUT: dict[int | str, dict[str, Any]] = {400: _google("INVALID_ARGUMENT: bad input (Google's format)")}

TOKEN_FORM = {
    "required": True,
    "content": {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["grant_type", "assertion"],
                "properties": {
                    "grant_type": {"type": "string", "enum": [JWT_BEARER]},
                    "assertion": {"type": "string", "description": "The RS256 JWT signed with the key"},
                },
            }
        }
    },
}


@router.post(
    "/token",
    response_model=AccessToken,
    responses={400: {"model": OAuthErrorBody, "description": "The grant is refused (Google's OAuth format)"}},
    openapi_extra={"requestBody": TOKEN_FORM},
)
async def token(request: Request) -> AccessToken:
    """Google's OAuth2 token endpoint for service accounts (RFC 7523 JWT-bearer grant): an
    RS256 JWT signed with the service-account key, for an access token that lives an hour."""
    # Parsed here: FastAPI's form support needs python-multipart, for two ASCII fields.
    form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
    return await sandbox().mint(form.get("grant_type"), form.get("assertion"))


async def authorize(
    project: str, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> None:
    """A dependency, so the credential is checked before the body, as FCM does."""
    await sandbox().authorize(credentials.credentials if credentials else None, project)


@router.post(
    "/v1/projects/{project}/messages:send",
    response_model=SendResponse,
    responses=GOOGLE_ERRORS,
    dependencies=[Depends(authorize)],
)
async def send(project: str, body: SendRequest) -> SendResponse:
    """FCM HTTP v1: send a message to a token, a topic or a condition. Validated as FCM does
    (one target, string data values, at most 4 KB); a token then answers as its sandbox state
    says (unregistered, a queued fault); what is delivered shows in `/sandbox/messages`.
    `validate_only` checks without delivering."""
    return await sandbox().send(project, body)


# A token in a path or query: in the token alphabet, so a request line stays within what the
# ingress accepts (HAProxy answers an oversized one itself, in HTML).
TOKEN = Path(min_length=1, max_length=TOKEN_MAX, pattern=TOKEN_ALPHABET)


@router.post("/sandbox/tokens/{token}/unregister", status_code=204, responses=BAD_INPUT)
async def unregister(token: Annotated[str, TOKEN]) -> None:
    """From now on sends to the token answer 404 UNREGISTERED, as after the app is uninstalled."""
    await sandbox().unregister(token)


@router.post("/sandbox/faults", status_code=204, responses=BAD_INPUT)
async def add_fault(body: FaultRequest) -> None:
    """The next `times` sends to the token fail with the FCM error `status` (its HTTP status,
    and `Retry-After` when `retry_after_seconds` is given)."""
    await sandbox().add_fault(body)


@router.get("/sandbox/messages", response_model=list[OutboxMessage], responses=BAD_INPUT)
async def messages(
    token: Annotated[
        str,
        Query(min_length=1, max_length=TOKEN_MAX, pattern=TOKEN_ALPHABET, description="A registration token"),
    ],
) -> list[OutboxMessage]:
    """The messages delivered to a token, newest first."""
    return await sandbox().messages(token)
