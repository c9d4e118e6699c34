"""Access-token rules: pinned EdDSA, kid, required claims, expiry, issuer and audience."""

import base64
import hashlib
import hmac
import json
import uuid
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from models.db import utcnow
from models.errors import Unauthorized
from models.tokens import TokenService

KEY = Ed25519PrivateKey.generate()


def service(key=KEY, **kw) -> TokenService:
    return TokenService(key, **{"issuer": "vurksha", "audience": "vurksha-api", "ttl": 900, **kw})


def issue(svc: TokenService, **kw) -> str:
    return svc.issue(
        user_id=uuid.uuid4(), session_id=uuid.uuid4(), role="customer", now=kw.get("now", utcnow())
    )


def claims(role: str = "customer") -> dict:
    """A complete, valid claim set, for hand-made tokens."""
    now = int(utcnow().timestamp())
    return {
        "iss": "vurksha",
        "aud": "vurksha-api",
        "sub": str(uuid.uuid4()),
        "sid": str(uuid.uuid4()),
        "role": role,
        "iat": now,
        "exp": now + 900,
        "jti": "x",
    }


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_round_trip_carries_claims():
    svc = service()
    uid, sid = uuid.uuid4(), uuid.uuid4()
    token = svc.issue(user_id=uid, session_id=sid, role="admin", now=utcnow())
    claims = svc.verify(token)
    assert (claims.sub, claims.sid, claims.role) == (uid, sid, "admin")
    assert claims.exp - claims.iat == 900
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": svc.kid, "typ": "JWT"}


def test_expired_token_is_401_token_expired():
    svc = service()
    token = issue(svc, now=utcnow() - timedelta(minutes=16))
    with pytest.raises(Unauthorized) as err:
        svc.verify(token)
    assert err.value.code == "token_expired" and err.value.status_code == 401


@pytest.mark.parametrize(
    "other",
    [
        {"key": Ed25519PrivateKey.generate()},  # wrong key (different kid)
        {"audience": "someone-else"},
        {"issuer": "evil"},
    ],
)
def test_wrong_key_audience_or_issuer_is_rejected(other):
    token = issue(service(**other))
    with pytest.raises(Unauthorized) as err:
        service().verify(token)
    assert err.value.code == "invalid_token"


def test_wrong_key_with_forged_kid_is_rejected():
    svc = service()
    forged = jwt.encode(
        {"sub": "x"}, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": svc.kid}
    )
    with pytest.raises(Unauthorized):
        svc.verify(forged)


def test_alg_none_is_rejected():
    svc = service()
    good = svc.verify(issue(svc)).model_dump(mode="json")
    token = f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': svc.kid})}.{b64({**good, 'iss': 'vurksha', 'aud': 'vurksha-api'})}."
    with pytest.raises(Unauthorized):
        svc.verify(token)


def test_hs256_signed_with_public_key_is_rejected():
    """The classic algorithm-confusion attack: HMAC keyed with the public key bytes."""
    svc = service()
    pub = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = claims(role="admin")
    header = b64({"alg": "HS256", "typ": "JWT", "kid": svc.kid})
    body = f"{header}.{b64(payload)}"
    sig = (
        base64.urlsafe_b64encode(hmac.new(pub, body.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    )
    with pytest.raises(Unauthorized):
        svc.verify(f"{body}.{sig}")


@pytest.mark.parametrize("missing", ["exp", "iat", "jti", "sub", "aud", "iss"])
def test_missing_required_claim_is_rejected(missing):
    svc = service()
    payload = claims()
    del payload[missing]
    token = jwt.encode(payload, KEY, algorithm="EdDSA", headers={"kid": svc.kid})
    with pytest.raises(Unauthorized):
        svc.verify(token)


def test_rsa_key_is_refused_as_signing_key(tmp_path):
    from config.settings import Settings
    from models.tokens import load_private_key

    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError):
        load_private_key(Settings(jwt_private_key=pem.decode(), data_dir=tmp_path))


def test_dev_key_is_generated_once_and_reused(tmp_path):
    from config.settings import Settings

    settings = Settings(data_dir=tmp_path)
    first, second = TokenService.from_settings(settings), TokenService.from_settings(settings)
    assert first.kid == second.kid
    assert (tmp_path / "jwt" / "ed25519.pem").stat().st_mode & 0o077 == 0


def test_a_token_verified_before_still_expires(monkeypatch):
    svc = service()
    token = issue(svc)
    exp = svc.verify(token).exp
    assert svc.verify(token).exp == exp  # served from the per-process cache
    monkeypatch.setattr("models.tokens.time.time", lambda: float(exp))
    with pytest.raises(Unauthorized) as err:
        svc.verify(token)
    assert err.value.code == "token_expired"


def test_a_verified_token_does_not_vouch_for_a_tampered_copy():
    svc = service()
    token = issue(svc)
    svc.verify(token)
    head, body, sig = token.split(".")
    forged_body = b64({**json.loads(base64.urlsafe_b64decode(body + "==")), "role": "admin"})
    flipped = sig[:10] + ("B" if sig[10] == "A" else "A") + sig[11:]
    for forged in (f"{head}.{forged_body}.{sig}", f"{head}.{body}.{flipped}"):
        with pytest.raises(Unauthorized) as err:
            svc.verify(forged)
        assert err.value.code == "invalid_token"


def test_the_verified_cache_is_bounded(monkeypatch):
    monkeypatch.setattr("models.tokens.VERIFIED_CACHE_SIZE", 3)
    svc = service()
    tokens = [issue(svc) for _ in range(5)]
    for token in tokens:
        svc.verify(token)
    assert list(svc._verified) == tokens[2:]  # the oldest went first
    assert svc.verify(tokens[0]).sub  # and is simply verified again
