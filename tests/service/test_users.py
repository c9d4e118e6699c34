"""Profile and addresses: validation, mass assignment, ownership, the default-address rule."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Live, Session, fake_ip

HOME = {
    "label": "home",
    "line1": "12 MG Road",
    "city": "Bengaluru",
    "pincode": "560001",
    "lat": 12.97,
    "lng": 77.59,
}


def test_profile_update_and_mass_assignment_rejected(live: Live, user: Session):
    ok = user.request("PATCH", "/users/me", json={"name": "  Asha  ", "email": "asha@example.com"})
    assert ok.status_code == 200 and ok.json()["name"] == "Asha" and ok.json()["email"] == "asha@example.com"
    for field, value in (("role", "admin"), ("phone", "+919812345678"), ("id", "x"), ("is_active", False)):
        response = user.request("PATCH", "/users/me", json={"name": "B", field: value})
        assert response.status_code == 422 and response.json()["code"] == "validation_error"
    me = user.request("GET", "/users/me").json()
    assert me["role"] == "customer" and me["phone"] == user.phone and me["name"] == "Asha"
    assert user.request("PATCH", "/users/me", json={"email": "not-an-email"}).status_code == 422
    assert user.request("PATCH", "/users/me", json={"email": None}).json()["email"] is None


def test_first_address_is_default_and_default_moves(live: Live, user: Session):
    first = user.request("POST", "/users/me/addresses", json=HOME)
    assert first.status_code == 201 and first.json()["is_default"] is True
    second = user.request("POST", "/users/me/addresses", json={**HOME, "label": "work"}).json()
    assert second["is_default"] is False
    moved = user.request("PATCH", f"/users/me/addresses/{second['id']}", json={"is_default": True})
    assert moved.status_code == 200 and moved.json()["is_default"] is True
    listing = user.request("GET", "/users/me/addresses").json()
    assert [a["id"] for a in listing if a["is_default"]] == [second["id"]]
    # Un-defaulting the only default would leave none: refused.
    refused = user.request("PATCH", f"/users/me/addresses/{second['id']}", json={"is_default": False})
    assert refused.status_code == 409 and refused.json()["code"] == "default_address_required"
    # Deleting the default promotes the remaining one.
    assert user.request("DELETE", f"/users/me/addresses/{second['id']}").status_code == 204
    listing = user.request("GET", "/users/me/addresses").json()
    assert [(a["id"], a["is_default"]) for a in listing] == [(first.json()["id"], True)]


def test_concurrent_default_addresses_leave_exactly_one(live: Live, user: Session):
    async def create_all() -> list[int]:
        async with httpx.AsyncClient(
            base_url=live.base_url, headers={**user.auth, "X-Forwarded-For": fake_ip()}, timeout=60
        ) as http:
            responses = await asyncio.gather(
                *(
                    http.post("/users/me/addresses", json={**HOME, "label": f"a{i}", "is_default": True})
                    for i in range(10)
                )
            )
            return [r.status_code for r in responses]

    assert asyncio.run(create_all()) == [201] * 10
    listing = user.request("GET", "/users/me/addresses").json()
    assert len(listing) == 10 and sum(a["is_default"] for a in listing) == 1


def test_address_validation_errors(live: Live, user: Session):
    for bad in ({"lat": 95}, {"lng": 200}, {"pincode": "12"}, {"line1": "   "}, {"user_id": "x"}):
        response = user.request("POST", "/users/me/addresses", json={**HOME, **bad})
        assert response.status_code == 422, bad
        assert response.json()["errors"], response.json()
    assert user.request("GET", "/users/me/addresses").json() == []


def test_another_users_address_is_404(live: Live, user: Session):
    mine = user.request("POST", "/users/me/addresses", json=HOME).json()
    other = live.login()
    for method, kw in (("PATCH", {"json": {"label": "stolen"}}), ("DELETE", {})):
        response = other.request(method, f"/users/me/addresses/{mine['id']}", **kw)
        assert response.status_code == 404 and response.json()["code"] == "address_not_found"
    assert other.request("GET", "/users/me/addresses").json() == []
    assert user.request("GET", "/users/me/addresses").json()[0]["label"] == "home"


def test_address_limit(live: Live, user: Session):
    for i in range(20):
        assert user.request("POST", "/users/me/addresses", json={**HOME, "label": f"a{i}"}).status_code == 201
    over = user.request("POST", "/users/me/addresses", json=HOME)
    assert over.status_code == 409 and over.json()["code"] == "address_limit"
