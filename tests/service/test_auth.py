"""OTP login, tokens and sessions, through the real Serve deployment over HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest

from config.settings import get_settings
from models.db import utcnow
from models.tokens import TokenService
from tests.conftest import Live, Session, fake_ip, fake_phone


def verify(client: httpx.Client, challenge: dict, code: str) -> httpx.Response:
    return client.post("/users/auth/verify", json={"challenge_id": challenge["challenge_id"], "code": code})


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def backdate_challenges(live: Live, phone: str, seconds: int) -> None:
    """Move this phone's challenges into the past, as if `seconds` had gone by."""
    live.sql(
        "UPDATE otp_challenges SET created_at = created_at - make_interval(secs => :s),"
        " expires_at = expires_at - make_interval(secs => :s) WHERE phone = :p",
        s=seconds,
        p=phone,
    )


def test_first_login_creates_user_and_returns_tokens(live: Live):
    client, phone = live.client(), fake_phone()
    challenge = live.request_otp(client, phone)
    assert challenge["expires_in"] == 300 and challenge["resend_after"] == 30
    response = verify(client, challenge, live.outbox_code(client, phone))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert body["user"]["phone"] == phone and body["user"]["role"] == "customer"
    me = client.get("/users/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200 and me.json()["id"] == body["user"]["id"]
    # A second login finds the same user.
    assert live.login(phone).user_id == body["user"]["id"]


def test_phone_is_normalised_and_invalid_phone_is_422(live: Live):
    client = live.client()
    digits = fake_phone()[3:]
    live.request_otp(client, f"0{digits[:5]} {digits[5:]}")
    assert live.outbox_code(client, "+91" + digits)
    response = client.post("/users/auth/otp", json={"phone": "12345"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "invalid_phone"


def test_code_is_stored_only_as_keyed_hash(live: Live):
    client, phone = live.client(), fake_phone()
    live.request_otp(client, phone)
    code = live.outbox_code(client, phone)
    [(code_hash,)] = live.sql("SELECT code_hash FROM otp_challenges WHERE phone = :p", p=phone)
    assert len(code_hash) == 32 and code.encode() not in code_hash
    row = live.sql("SELECT * FROM otp_challenges WHERE phone = :p", p=phone)[0]
    assert code not in repr(row)


def test_code_is_single_use(live: Live):
    client, phone = live.client(), fake_phone()
    challenge = live.request_otp(client, phone)
    code = live.outbox_code(client, phone)
    assert verify(client, challenge, code).status_code == 200
    again = verify(client, challenge, code)
    assert again.status_code == 400 and again.json()["code"] == "otp_inactive"


def test_expired_code_is_rejected(live: Live):
    client, phone = live.client(), fake_phone()
    challenge = live.request_otp(client, phone)
    code = live.outbox_code(client, phone)
    backdate_challenges(live, phone, 301)
    response = verify(client, challenge, code)
    assert response.status_code == 400 and response.json()["code"] == "otp_expired"


def test_five_wrong_codes_kill_the_challenge(live: Live):
    client, phone = live.client(), fake_phone()
    challenge = live.request_otp(client, phone)
    code = live.outbox_code(client, phone)
    for left in (4, 3, 2, 1):
        response = verify(client, challenge, wrong(code))
        assert response.status_code == 400
        assert response.json()["code"] == "otp_invalid" and response.json()["attempts_left"] == left
    assert verify(client, challenge, wrong(code)).json()["code"] == "otp_attempts_exceeded"
    # Even the right code is useless now.
    assert verify(client, challenge, code).json()["code"] == "otp_inactive"


def test_resend_waits_and_invalidates_previous_code(live: Live):
    client, phone = live.client(), fake_phone()
    first = live.request_otp(client, phone)
    first_code = live.outbox_code(client, phone)
    too_soon = client.post("/users/auth/otp", json={"phone": phone})
    assert too_soon.status_code == 429 and too_soon.json()["code"] == "otp_resend_too_soon"
    assert 1 <= int(too_soon.headers["retry-after"]) <= 30
    backdate_challenges(live, phone, 31)
    second = live.request_otp(client, phone)
    second_code = live.outbox_code(client, phone)
    assert verify(client, first, first_code).json()["code"] == "otp_inactive"
    assert verify(client, second, second_code).status_code == 200


def test_sends_per_phone_per_hour_are_capped(live: Live):
    phone = fake_phone()
    for _ in range(5):  # each from its own network, so only the phone cap can bite
        live.request_otp(live.client(), phone)
        backdate_challenges(live, phone, 31)
    capped = live.client().post("/users/auth/otp", json={"phone": phone})
    assert capped.status_code == 429 and capped.json()["code"] == "otp_phone_limit"
    backdate_challenges(live, phone, 3600)  # an hour later the window has moved on
    live.request_otp(live.client(), phone)


def test_sends_per_ip_per_hour_are_capped(live: Live):
    client = live.client(ip=fake_ip())
    for _ in range(20):
        live.request_otp(client, fake_phone())
    capped = client.post("/users/auth/otp", json={"phone": fake_phone()})
    assert capped.status_code == 429 and capped.json()["code"] == "otp_ip_limit"
    assert live.client().post("/users/auth/otp", json={"phone": fake_phone()}).status_code == 202


def test_concurrent_sends_from_one_ip_never_exceed_the_cap(live: Live):
    ip = fake_ip()

    async def send(http: httpx.AsyncClient) -> int:
        return (await http.post("/users/auth/otp", json={"phone": fake_phone()})).status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=live.base_url, headers={"X-Forwarded-For": ip}, timeout=60
        ) as http:
            return await asyncio.gather(*(send(http) for _ in range(30)))

    statuses = asyncio.run(burst())
    assert statuses.count(202) == 20 and statuses.count(429) == 10


def test_consecutive_failures_lock_the_phone(live: Live):
    client, phone = live.client(), fake_phone()
    challenge = live.request_otp(client, phone)
    code = live.outbox_code(client, phone)
    # 99 failures so far (across earlier challenges); the 100th locks the phone.
    live.sql("INSERT INTO otp_phone_guards (phone, consecutive_failures) VALUES (:p, 99)", p=phone)
    locked = verify(client, challenge, wrong(code))
    assert locked.status_code == 429 and locked.json()["code"] == "otp_locked"
    assert int(locked.headers["retry-after"]) > 3000
    # Locked: the right code does not work, and no new code is sent.
    assert verify(client, challenge, code).json()["code"] == "otp_locked"
    assert client.post("/users/auth/otp", json={"phone": phone}).json()["code"] == "otp_locked"


def test_failures_count_across_challenges_and_reset_on_success(live: Live):
    client, phone = live.client(), fake_phone()
    challenge = live.request_otp(client, phone)
    code = live.outbox_code(client, phone)
    for _ in range(3):
        verify(client, challenge, wrong(code))
    assert live.sql("SELECT consecutive_failures FROM otp_phone_guards WHERE phone = :p", p=phone) == [(3,)]
    assert verify(client, challenge, code).status_code == 200
    assert live.sql("SELECT consecutive_failures FROM otp_phone_guards WHERE phone = :p", p=phone) == [(0,)]


def test_unknown_challenge_is_404(live: Live):
    response = live.client().post(
        "/users/auth/verify", json={"challenge_id": "00000000-0000-4000-8000-000000000000", "code": "123456"}
    )
    assert response.status_code == 404 and response.json()["code"] == "otp_challenge_not_found"


# ---------------------------------------------------------------- tokens and sessions


def refresh(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/users/auth/refresh", json={"refresh_token": token})


def test_refresh_rotates_and_reuse_revokes_the_family(live: Live, user: Session):
    old = user.tokens["refresh_token"]
    rotated = refresh(user.client, old)
    assert rotated.status_code == 200
    new = rotated.json()
    assert new["refresh_token"] != old and new["access_token"] != user.tokens["access_token"]
    # The old token again: theft assumed, the whole session dies...
    reused = refresh(user.client, old)
    assert reused.status_code == 401 and reused.json()["code"] == "refresh_token_reused"
    # ...including the newest refresh token and the access tokens of the session.
    assert refresh(user.client, new["refresh_token"]).json()["code"] == "session_revoked"
    me = user.client.get("/users/me", headers={"Authorization": f"Bearer {new['access_token']}"})
    assert me.status_code == 401 and me.json()["code"] == "session_revoked"


def test_concurrent_refresh_with_one_token_has_one_winner(live: Live, user: Session):
    token = user.tokens["refresh_token"]

    async def race() -> list[int]:
        async with httpx.AsyncClient(base_url=live.base_url, headers={"X-Forwarded-For": fake_ip()}) as http:
            responses = await asyncio.gather(
                *(http.post("/users/auth/refresh", json={"refresh_token": token}) for _ in range(5))
            )
            return [r.status_code for r in responses]

    statuses = asyncio.run(race())
    assert statuses.count(200) <= 1 and all(s in (200, 401) for s in statuses)


def test_invalid_refresh_token_is_401(live: Live):
    response = refresh(live.client(), "rt_not-a-real-token-at-all-000000000")
    assert response.status_code == 401 and response.json()["code"] == "invalid_refresh_token"


def test_logout_revokes_session_at_once(live: Live, user: Session):
    assert user.request("POST", "/users/auth/logout").status_code == 204
    me = user.request("GET", "/users/me")
    assert me.status_code == 401 and me.json()["code"] == "session_revoked"
    assert refresh(user.client, user.tokens["refresh_token"]).status_code == 401


def test_sessions_list_and_revoke_other_device(live: Live, user: Session):
    phone_b = live.login(user.phone)  # a second device
    sessions = user.request("GET", "/users/me/sessions").json()
    assert len(sessions) == 2 and [s["current"] for s in sessions].count(True) == 1
    other = next(s for s in sessions if not s["current"])
    assert user.request("DELETE", f"/users/me/sessions/{other['id']}").status_code == 204
    assert phone_b.request("GET", "/users/me").status_code == 401
    assert user.request("GET", "/users/me").status_code == 200
    # Revoking it again, or somebody else's session, is a 404.
    assert user.request("DELETE", f"/users/me/sessions/{other['id']}").status_code == 404
    stranger = live.login()
    stranger_sid = stranger.request("GET", "/users/me/sessions").json()[0]["id"]
    response = user.request("DELETE", f"/users/me/sessions/{stranger_sid}")
    assert response.status_code == 404 and response.json()["code"] == "session_not_found"
    assert stranger.request("GET", "/users/me").status_code == 200


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer not.a.jwt", "Basic dXNlcjpwYXNz", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."],
)
def test_bad_authorization_is_401(live: Live, header: str):
    response = live.client().get("/users/me", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] in ("not_authenticated", "invalid_token")


@pytest.fixture
def admin(live: Live) -> Session:
    session = live.login()
    live.sql("UPDATE users SET role = 'admin' WHERE id = :id", id=session.user_id)
    return session


def test_disabled_user_loses_access_at_once_and_gets_it_back_when_enabled(
    live: Live, user: Session, admin: Session
):
    assert user.request("GET", "/users/me").status_code == 200  # now cached in Redis
    disabled = admin.request("PUT", f"/users/{user.user_id}/status", json={"active": False})
    assert disabled.status_code == 200 and disabled.json()["is_active"] is False
    me = user.request("GET", "/users/me")
    assert me.status_code == 401 and me.json()["code"] == "session_revoked"
    assert refresh(user.client, user.tokens["refresh_token"]).json()["code"] == "user_disabled"
    assert admin.request("PUT", f"/users/{user.user_id}/status", json={"active": True}).status_code == 200
    assert user.request("GET", "/users/me").json()["is_active"] is True


def test_account_status_is_for_admins_and_known_users(live: Live, user: Session, admin: Session):
    response = user.request("PUT", f"/users/{admin.user_id}/status", json={"active": False})
    assert response.status_code == 403 and response.json()["code"] == "forbidden_role"
    response = admin.request("PUT", f"/users/{uuid.uuid4()}/status", json={"active": False})
    assert response.status_code == 404 and response.json()["code"] == "user_not_found"
    response = admin.request("PUT", f"/users/{user.user_id}/status", json={"active": "no"})
    assert response.status_code == 422
    assert user.request("GET", "/users/me").status_code == 200


def test_sessions_are_answered_from_redis_until_postgres_is_announced_to_have_changed(
    live: Live, user: Session
):
    """A revocation made by hand in SQL is not seen until `vurksha auth reset`: proof that
    authenticated requests are answered from the cache, and that the command works."""
    assert user.request("GET", "/users/me").status_code == 200
    live.sql(
        "UPDATE auth_sessions SET revoked_at = now() WHERE user_id = :id", id=user.user_id, announce=False
    )
    assert user.request("GET", "/users/me").status_code == 200
    reset = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "auth", "reset"],
        env={**os.environ, "REDIS_URL": live.redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reset.returncode == 0, reset.stderr
    me = user.request("GET", "/users/me")
    assert me.status_code == 401 and me.json()["code"] == "session_revoked"


def test_no_request_started_after_logout_answers_succeeds_while_requests_race_it(live: Live):
    """Readers hammer the session while it logs out: before, they are served (from the cache);
    once the logout has answered, every request is a 401, however the cache fills raced it."""
    user = live.login()
    auth = {"Authorization": f"Bearer {user.tokens['access_token']}"}
    results: list[tuple[float, int]] = []
    logged_out = threading.Event()

    def read() -> None:
        with live.client() as client:
            for _ in range(25):  # 3 readers x 25 stays under the per-user limit
                started = time.monotonic()
                results.append((started, client.get("/users/me", headers=auth).status_code))
                if len(results) >= 15:
                    logged_out.set()

    with ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(read) for _ in range(3)]
        logged_out.wait(30)
        assert user.request("POST", "/users/auth/logout").status_code == 204
        answered = time.monotonic()
        for reader in readers:
            reader.result()
    before = [status for started, status in results if started < answered]
    after = [status for started, status in results if started > answered]
    assert 200 in before and after, results
    assert set(after) == {401}, results


def test_admin_is_seeded_and_logs_in_through_otp(live: Live):
    admin = live.login(get_settings().admin_phone)
    assert admin.tokens["user"]["role"] == "admin"


def test_access_token_expiry_is_enforced_by_the_service(live: Live, user: Session):
    """A token signed with the service key but already expired is refused."""
    tokens = TokenService.from_settings(get_settings())
    me = user.request("GET", "/users/me").json()
    sid = user.request("GET", "/users/me/sessions").json()[0]["id"]
    expired = tokens.issue(
        user_id=uuid.UUID(me["id"]),
        session_id=uuid.UUID(sid),
        role="customer",
        now=utcnow() - timedelta(seconds=901 + 5),
    )
    response = user.client.get("/users/me", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401 and response.json()["code"] == "token_expired"
    fresh = tokens.issue(
        user_id=uuid.UUID(me["id"]), session_id=uuid.UUID(sid), role="customer", now=utcnow()
    )
    assert user.client.get("/users/me", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
