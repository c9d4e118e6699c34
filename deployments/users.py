"""Users service (`/users`): phone OTP login, JWT access + rotating refresh tokens, sessions,
profile and delivery addresses."""

from __future__ import annotations

import uuid

from fastapi import Depends, Request, Response

from config import metrics
from deployments.common import CurrentUser, Db, client_ip, create_api, require_role, resources, serve_builder
from models import notifications, users
from models.channels import otp_sms
from models.db import utcnow
from models.errors import AppError
from models.users import (
    AccountStatusIn,
    AddressIn,
    AddressOut,
    AddressPatch,
    OtpChallengeOut,
    OtpRequest,
    OtpVerify,
    RefreshRequest,
    RoleIn,
    SessionOut,
    TokenPair,
    UserOut,
    UserUpdate,
)

api = create_api(
    "users",
    title="Vurksha users",
    description="Phone OTP login, tokens and sessions, profile and delivery addresses.",
)

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@api.post("/auth/otp", status_code=202, response_model=OtpChallengeOut, tags=["auth"])
async def request_otp(body: OtpRequest, request: Request, db: Db) -> OtpChallengeOut:
    """Send a 6-digit login code by SMS. Resends wait `resend_after` seconds; sends are capped
    per phone and per network per hour."""
    res = resources()
    settings = res.settings
    try:
        challenge, code = await users.request_otp(
            db, phone=body.phone, ip=client_ip(request), settings=settings, now=utcnow()
        )
        await db.commit()  # the SMS goes out only once the challenge is durable
        await res.sms.send(body.phone, otp_sms(code, settings.otp_ttl_seconds))
    except AppError as exc:
        metrics.OTP_SENDS.inc(outcome=exc.code)
        raise
    metrics.OTP_SENDS.inc(outcome="sent")
    return OtpChallengeOut(
        challenge_id=challenge.id,
        expires_in=settings.otp_ttl_seconds,
        resend_after=settings.otp_resend_after_seconds,
    )


@api.post("/auth/verify", response_model=TokenPair, tags=["auth"])
async def verify_otp(body: OtpVerify, request: Request, response: Response, db: Db) -> TokenPair:
    """Exchange a code for tokens. The first successful login creates the account."""
    res = resources()
    response.headers.update(NO_STORE)
    return await users.verify_otp(
        db,
        challenge_id=body.challenge_id,
        code=body.code,
        ip=client_ip(request),
        user_agent=request.headers.get("user-agent"),
        settings=res.settings,
        tokens=res.tokens,
        now=utcnow(),
    )


@api.post("/auth/refresh", response_model=TokenPair, tags=["auth"])
async def refresh(body: RefreshRequest, response: Response, db: Db) -> TokenPair:
    """Rotate the refresh token. Reusing an already-rotated token revokes the session."""
    res = resources()
    response.headers.update(NO_STORE)
    return await users.refresh_tokens(
        db, refresh_token=body.refresh_token, tokens=res.tokens, settings=res.settings, now=utcnow()
    )


@api.post("/auth/logout", status_code=204, tags=["auth"])
async def logout(principal: CurrentUser, db: Db) -> None:
    """End the current session: its refresh token and access tokens stop working at once, and
    the devices it registered for push are forgotten."""
    await users.revoke_session(
        db, user_id=principal.id, session_id=principal.session_id, reason="logout", now=utcnow()
    )
    await notifications.forget_session_devices(db, principal.session_id)


@api.get("/me", response_model=UserOut, tags=["profile"])
async def me(principal: CurrentUser, db: Db) -> users.User:
    """The caller's profile."""
    return await users.get_user(db, principal.id)


@api.patch("/me", response_model=UserOut, tags=["profile"])
async def update_me(body: UserUpdate, principal: CurrentUser, db: Db) -> users.User:
    """Update name, email, language (`en`, `hi`: what messages are written in) and time zone
    (IANA, for quiet hours). Other fields (role, phone) are rejected."""
    return await users.update_profile(db, await users.get_user(db, principal.id), body)


@api.get("/me/sessions", response_model=list[SessionOut], tags=["auth"])
async def my_sessions(principal: CurrentUser, db: Db) -> list[SessionOut]:
    """The caller's live sessions (devices), most recently used first."""
    return await users.list_sessions(db, user_id=principal.id, current=principal.session_id, now=utcnow())


@api.delete("/me/sessions/{session_id}", status_code=204, tags=["auth"])
async def revoke_my_session(session_id: uuid.UUID, principal: CurrentUser, db: Db) -> None:
    """Sign out one device (it gets no more pushes)."""
    await users.revoke_session(
        db, user_id=principal.id, session_id=session_id, reason="revoked_by_user", now=utcnow()
    )
    await notifications.forget_session_devices(db, session_id)


@api.get("/me/addresses", response_model=list[AddressOut], tags=["addresses"])
async def my_addresses(principal: CurrentUser, db: Db) -> list[users.Address]:
    """The caller's delivery addresses, default first."""
    return await users.list_addresses(db, principal.id)


@api.post("/me/addresses", status_code=201, response_model=AddressOut, tags=["addresses"])
async def add_address(body: AddressIn, principal: CurrentUser, db: Db) -> users.Address:
    """Add an address. The first one, or one sent with `is_default`, becomes the default."""
    return await users.create_address(db, principal.id, body)


@api.patch("/me/addresses/{address_id}", response_model=AddressOut, tags=["addresses"])
async def edit_address(
    address_id: uuid.UUID, body: AddressPatch, principal: CurrentUser, db: Db
) -> users.Address:
    """Edit an address; `is_default: true` moves the default here."""
    return await users.update_address(db, principal.id, address_id, body)


@api.delete("/me/addresses/{address_id}", status_code=204, tags=["addresses"])
async def remove_address(address_id: uuid.UUID, principal: CurrentUser, db: Db) -> None:
    """Delete an address; if it was the default, the newest remaining one takes over."""
    await users.delete_address(db, principal.id, address_id)


@api.put(
    "/{user_id}/role",
    response_model=UserOut,
    tags=["admin"],
    dependencies=[Depends(require_role(users.Role.admin))],
)
async def set_role(user_id: uuid.UUID, body: RoleIn, db: Db) -> UserOut:
    """Grant or revoke a role (admins only): `customer`, `partner` (attach them to a store
    with `POST /delivery/partners`), `staff` (with the `store_id` they work in), `ops`,
    `admin`. 409 `last_admin` for the last active admin; 404 `user_not_found`,
    `store_not_found`. It takes effect on the user's next request."""
    return UserOut.model_validate(await users.set_role(db, user_id, body))


@api.put(
    "/{user_id}/status",
    response_model=UserOut,
    tags=["admin"],
    dependencies=[Depends(require_role(users.Role.admin))],
)
async def set_status(user_id: uuid.UUID, body: AccountStatusIn, db: Db) -> UserOut:
    """Disable an account (`active: false`: its tokens stop working on their next request,
    and it can neither refresh nor log in) or enable it again; its sessions are kept, so an
    enabled account's devices work again until they expire. 409 `last_admin` for the last
    active admin; 404 `user_not_found`. Admins only."""
    return UserOut.model_validate(await users.set_status(db, user_id, body))


app = serve_builder(api, "users")
