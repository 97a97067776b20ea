"""The NATS trust chain gatefleet keeps under `[bus] data_dir`/auth: operator, accounts, users.

Made on first use (by `gatefleet up` or any `credentials` command), kept across
restarts, every secret 0600 in a 0700 directory:

    operator.nk  system.nk  fleet.nk      nkey seeds: operator, system account, fleet account
    operator.jwt system.jwt fleet.jwt     their JWTs (fleet.jwt carries the revocations)
    admin.creds                           gatefleet's own user (and the local CLI's)
    system.creds                          a system-account user: pushes account updates
    route.password                        what the nodes of a NATS cluster route with (nats-config)
    users.json                            every credential handed out: name, kind, key
    creds/                                where `credentials` writes without --out
    resolver/                             the embedded server's account store (full resolver)

Every change runs under an exclusive lock on `.lock`, so a `credentials` command and a
running gatefleet can both use the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bus.server import ServerAuth
from gatefleet.security.jwt import (
    CredsError,
    KeyPair,
    Role,
    creds_text,
    encode_jwt,
    read_creds,
    write_private,
)
from gatefleet.security.permissions import TEST_TAG, Kind, permissions

AUTH_DIR = "auth"
FLEET_ACCOUNT_NAME = "GATEFLEET"
_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
# A user's own limits: 0 (the default when absent) would allow no subscription at all.
_USER_LIMITS = {"subs": -1, "data": -1, "payload": -1}
# JetStream for the fleet account: without these limits its streams would be refused.
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


class AuthorityError(ValueError):
    """A credential that cannot be issued or revoked; str is one line."""


@dataclass(frozen=True)
class IssuedUser:
    name: str  # the gateway id for a gateway
    kind: Kind
    public_key: str
    issued_at: int
    revoked_at: int | None = None


class Authority:
    """Operator, system and fleet accounts, and the users issued in the fleet account."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / AUTH_DIR
        self.resolver_dir = self.dir / "resolver"
        self.creds_dir = self.dir / "creds"
        self.admin_creds = self.dir / "admin.creds"
        self.system_creds = self.dir / "system.creds"
        with self._locked():
            self._operator = self._key("operator", "operator")
            self._system = self._key("system", "account")
            self._fleet = self._key("fleet", "account")
            if not (self.dir / "operator.jwt").exists():
                self._write_trust_chain()

    @property
    def operator_jwt(self) -> str:
        return (self.dir / "operator.jwt").read_text().strip()

    @property
    def system_account(self) -> str:
        return self._system.public_key

    @property
    def fleet_account(self) -> str:
        return self._fleet.public_key

    @property
    def fleet_jwt(self) -> str:
        """The fleet account's JWT as last signed (with every revocation)."""
        return (self.dir / "fleet.jwt").read_text().strip()

    def account_jwts(self) -> dict[str, str]:
        """Public key -> JWT of the system and the fleet account, as last signed."""
        return {
            self._system.public_key: (self.dir / "system.jwt").read_text().strip(),
            self._fleet.public_key: (self.dir / "fleet.jwt").read_text().strip(),
        }

    # Issuing and revoking -----------------------------------------------------------------

    def issue(self, kind: Kind, name: str, prefix: str, out: Path | None = None) -> Path:
        """Writes a new `.creds` file for a user of `kind` (`name` is the gateway id of a
        gateway) and records it; the path written (by default under creds/)."""
        path = out if out is not None else self.creds_dir / f"{kind}-{name}.creds"
        user = KeyPair.generate("user")
        claims: dict[str, Any] = {
            "type": "user",
            **permissions(kind, prefix, name),
            **_USER_LIMITS,
            "tags": [f"gatefleet:{kind}"] + ([TEST_TAG] if kind == "simulator" else []),
        }
        token = encode_jwt(
            claims, subject=user.public_key, name=f"{kind}:{name}", issuer=self._fleet
        )
        with self._locked():
            write_private(path, creds_text(token, user.seed))
            users = self._read_users()
            users.append(IssuedUser(name, kind, user.public_key, int(time.time())))
            self._write_users(users)
        return path

    def local_creds(self, kind: Kind, name: str, prefix: str) -> Path:
        """The credential creds/<kind>-<name>.creds when it is usable and not revoked, else
        a new one there (what `gatefleet simulate` uses on gatefleet's machine)."""
        path = self.creds_dir / f"{kind}-{name}.creds"
        revoked = {u.public_key for u in self._read_users() if u.revoked_at is not None}
        try:
            if read_creds(path).user not in revoked:
                return path
        except CredsError:
            pass
        return self.issue(kind, name, prefix)

    @staticmethod
    def exists(data_dir: Path) -> bool:
        """Whether gatefleet made its keys under this data_dir already."""
        return (data_dir / AUTH_DIR / "operator.jwt").exists()

    def revoke(self, name: str) -> list[IssuedUser]:
        """Revokes every live credential issued under `name` (a name or a gateway id), and
        signs the fleet account again with the revocations: AuthorityError if none."""
        with self._locked():
            users = self._read_users()
            now = int(time.time())
            hit = [u for u in users if u.name == name and u.revoked_at is None]
            if not hit:
                raise AuthorityError(f"no credential named {name!r} to revoke")
            revoked = {u.public_key for u in hit}
            users = [
                IssuedUser(u.name, u.kind, u.public_key, u.issued_at, now)
                if u.public_key in revoked
                else u
                for u in users
            ]
            self._write_users(users)
            self._sign_fleet_account(users)
        return [u for u in users if u.public_key in revoked]

    def users(self) -> list[IssuedUser]:
        return self._read_users()

    def test_credentials(self) -> list[str]:
        """`simulator:NAME` of each simulator credential issued and not revoked."""
        live = {u.name for u in self._read_users() if u.kind == "simulator" and not u.revoked_at}
        return [f"simulator:{name}" for name in sorted(live)]

    def user_named(self, public_key: str) -> str:
        """`kind:name` of an issued user, `gatefleet` for the admin, else the key itself."""
        if public_key == self._admin_key():
            return "gatefleet"
        for user in self._read_users():
            if user.public_key == public_key:
                return f"{user.kind}:{user.name}"
        return public_key

    # The server's side --------------------------------------------------------------------

    def route_password(self) -> str:
        """The password the nodes of one NATS cluster route with: made once and kept, so a
        node started again with a config written later still routes with the others."""
        path = self.dir / "route.password"
        with self._locked():
            if not path.exists():
                write_private(path, secrets.token_hex(24) + "\n")
            return path.read_text().strip()

    def server_auth(self) -> ServerAuth:
        """What the embedded server needs for operator mode with the full resolver."""
        return ServerAuth(
            operator_jwt=self.dir / "operator.jwt",
            system_account=self._system.public_key,
            resolver_dir=self.resolver_dir,
            jetstream_account=self._fleet.public_key,
            accounts=self.account_jwts(),
        )

    # Internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _key(self, name: str, role: Role) -> KeyPair:
        path = self.dir / f"{name}.nk"
        if path.exists():
            return KeyPair(path.read_bytes().strip())
        key = KeyPair.generate(role)
        write_private(path, key.seed.decode() + "\n")
        return key

    def _write_trust_chain(self) -> None:
        """The operator and account JWTs, gatefleet's own users: once, on first use."""
        operator = encode_jwt(
            {"type": "operator", "system_account": self._system.public_key},
            subject=self._operator.public_key,
            name="gatefleet",
            issuer=self._operator,
        )
        system = encode_jwt(
            {"type": "account", "limits": _UNLIMITED, "default_permissions": {}},
            subject=self._system.public_key,
            name="SYS",
            issuer=self._operator,
        )
        write_private(self.dir / "system.jwt", system + "\n")
        self._sign_fleet_account([])
        self._write_user(self.system_creds, self._system, "gatefleet-system")
        self._write_user(self.admin_creds, self._fleet, "gatefleet")
        write_private(self.dir / "operator.jwt", operator + "\n")  # last: marks it complete

    def _sign_fleet_account(self, users: list[IssuedUser]) -> None:
        revocations = {u.public_key: u.revoked_at for u in users if u.revoked_at is not None}
        claims: dict[str, Any] = {
            "type": "account",
            "limits": {**_UNLIMITED, **_JETSTREAM},
            "default_permissions": {},
        }
        if revocations:
            claims["revocations"] = revocations
        fleet = encode_jwt(
            claims,
            subject=self._fleet.public_key,
            name=FLEET_ACCOUNT_NAME,
            issuer=self._operator,
        )
        write_private(self.dir / "fleet.jwt", fleet + "\n")

    def _write_user(self, path: Path, account: KeyPair, name: str) -> None:
        user = KeyPair.generate("user")
        token = encode_jwt(
            {"type": "user", **_USER_LIMITS}, subject=user.public_key, name=name, issuer=account
        )
        write_private(path, creds_text(token, user.seed))

    def _admin_key(self) -> str:
        return read_creds(self.admin_creds).user

    def _read_users(self) -> list[IssuedUser]:
        path = self.dir / "users.json"
        if not path.exists():
            return []
        return [IssuedUser(**entry) for entry in json.loads(path.read_text())["users"]]

    def _write_users(self, users: list[IssuedUser]) -> None:
        body = {"users": [asdict(u) for u in users]}
        write_private(self.dir / "users.json", json.dumps(body, indent=1) + "\n")
