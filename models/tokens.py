"""Access tokens: EdDSA (Ed25519) JWTs with a `kid`, pinned algorithm and required claims.

Refresh tokens are opaque random strings (see models/users.py); only access tokens are JWTs.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from config.settings import Settings
from models.errors import Unauthorized

ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "iat", "jti"]
# Tokens whose signature and claims were verified, per process (oldest dropped first). The
# signature check cost ~0.18 ms of CPU on every request; the same bytes verify the same way
# until the token expires, and revocation is checked per request elsewhere (users.authenticate).
VERIFIED_CACHE_SIZE = 4096


class AccessClaims(BaseModel):
    sub: uuid.UUID
    sid: uuid.UUID
    role: str
    jti: str
    exp: int
    iat: int


def write_once(path: Path, secret: bytes) -> None:
    """Write a generated secret (mode 0600) unless the file exists, atomically: of processes
    racing here the first to link its file wins and all read that one (a replace would let a
    later writer change the secret under a process that already read it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    try:
        os.link(tmp, path)  # fails if another process won the race: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _create_key_file(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_once(path, pem)


def load_private_key(settings: Settings) -> Ed25519PrivateKey:
    if settings.jwt_private_key is not None:
        pem = settings.jwt_private_key.get_secret_value().encode()
    else:
        path = settings.key_file
        if not path.exists() and settings.env != "production":
            _create_key_file(path)
        pem = path.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the JWT private key must be an Ed25519 key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _expired() -> Unauthorized:
    return Unauthorized("Access token expired", code="token_expired")


class TokenService:
    """Issues and verifies access tokens for one signing key."""

    def __init__(self, private_key: Ed25519PrivateKey, *, issuer: str, audience: str, ttl: int):
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self.kid = key_id(self._public_key)
        self.issuer, self.audience, self.ttl = issuer, audience, ttl
        self._verified: dict[str, AccessClaims] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenService:
        return cls(
            load_private_key(settings),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl=settings.access_token_ttl_seconds,
        )

    def issue(self, *, user_id: uuid.UUID, session_id: uuid.UUID, role: str, now: datetime) -> str:
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(user_id),
            "sid": str(session_id),
            "role": role,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=self.ttl)).timestamp()),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def verify(self, token: str) -> AccessClaims:
        """Any defect (alg, kid, signature, iss, aud, exp, missing claim) is one 401. A token
        verified before is checked only for expiry (exactly as PyJWT checks it)."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)), None)
            self._verified[token] = claims
        elif claims.exp <= int(time.time()):
            self._verified.pop(token, None)
            raise _expired()
        return claims

    def _verify(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != ALGORITHM or header.get("kid") != self.kid:
                raise jwt.InvalidTokenError("unexpected alg or kid")
            payload = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": REQUIRED_CLAIMS},
            )
            return AccessClaims.model_validate(payload)
        except jwt.ExpiredSignatureError:
            raise _expired() from None
        except (jwt.InvalidTokenError, ValueError):
            raise Unauthorized("Invalid access token", code="invalid_token") from None
