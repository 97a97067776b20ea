"""NATS JWTs (v2) signed with nkeys, and the standard `.creds` file around a user JWT.

Written here rather than taken from PyPI: the one Python JWT library for NATS there
(`nats-jwt`) says of itself that it is not well tested and in development, and pulls in
pycryptodome, pytz and dataclasses-json. What NATS needs is small: a fixed header, the
claims as JSON, an ed25519 signature by the issuer's nkey (the official `nkeys`
package), all base64url without padding; `jti` is the base32 SHA-512/256 of the claims,
as the Go library makes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nkeys

Role = Literal["operator", "account", "user"]
_PREFIXES: dict[Role, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_CREDS_RE = re.compile(
    r"-----BEGIN NATS USER JWT-----\s*(?P<jwt>\S+)\s*------END NATS USER JWT------.*?"
    r"-----BEGIN USER NKEY SEED-----\s*(?P<seed>\S+)\s*------END USER NKEY SEED------",
    re.DOTALL,
)


class CredsError(ValueError):
    """A credential (a `.creds` file, a CA file) that cannot be used; str is one line
    naming the file and the cause."""


class KeyPair:
    """An nkey: its seed (the secret), public key, and signatures."""

    def __init__(self, seed: bytes) -> None:
        self._keys = nkeys.from_seed(bytearray(seed))
        self.seed = bytes(seed)
        self.public_key: str = self._keys.public_key.decode()

    @classmethod
    def generate(cls, role: Role) -> KeyPair:
        return cls(nkeys.encode_seed(os.urandom(32), _PREFIXES[role]))

    def sign(self, data: bytes) -> bytes:
        return bytes(self._keys.sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(
    nats: dict[str, Any],
    *,
    subject: str,
    name: str,
    issuer: KeyPair,
    expires_at: int | None = None,
) -> str:
    """A JWT for `subject` with the `nats` claims given, signed by `issuer`."""
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public_key,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    if expires_at is not None:
        claims["exp"] = expires_at
    digest = hashlib.new("sha512_256", _json(claims)).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signed = f"{_b64(_json(_HEADER))}.{_b64(_json(claims))}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies): ValueError if it is no JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    try:
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a JWT") from exc
    if not isinstance(claims, dict):
        raise ValueError("not a JWT")  # noqa: TRY004 - bad input, as above
    return claims


def creds_text(user_jwt: str, seed: bytes) -> str:
    """The standard `.creds` file, as `nsc` writes it and every NATS client reads it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


@dataclass(frozen=True)
class Creds:
    path: Path
    jwt: str
    claims: dict[str, Any]

    @property
    def user(self) -> str:
        """The user's public key."""
        return str(self.claims.get("sub", ""))


def read_creds(path: Path, now: float | None = None) -> Creds:
    """A `.creds` file checked as far as a client can: readable, well formed, a user JWT
    whose seed matches it, not expired. CredsError otherwise."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CredsError(f"creds file {path}: cannot read it: {reason}") from None
    match = _CREDS_RE.search(text)
    if match is None:
        raise CredsError(f"creds file {path}: not a NATS .creds file (no user JWT and seed)")
    try:
        claims = decode_claims(match["jwt"])
        key = KeyPair(match["seed"].encode())
    except (ValueError, nkeys.NkeysError):
        raise CredsError(f"creds file {path}: the JWT or the seed is damaged") from None
    if claims.get("nats", {}).get("type") != "user" or claims.get("sub") != key.public_key:
        raise CredsError(f"creds file {path}: the seed does not belong to its user JWT")
    expires = claims.get("exp")
    if isinstance(expires, int) and expires <= (time.time() if now is None else now):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise CredsError(f"creds file {path}: the credential expired at {when}")
    return Creds(path, match["jwt"], claims)


def write_private(path: Path, text: str) -> None:
    """Writes a secret readable by its owner only (0600 from creation, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)  # an older tmp file may have had wider bits
    os.replace(tmp, path)
