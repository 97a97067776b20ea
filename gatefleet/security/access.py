"""Which credentials and CA a connection uses: gatefleet's own, and a command's.

gatefleet itself uses the admin user of its `[bus] data_dir` on the embedded server, and
`[bus] creds` on an external one. A client command (status, distribute, audit, ...)
takes `--creds FILE` (or $GATEFLEET_CREDS); without it, it finds the same credentials
gatefleet uses with the same `--config` on the same machine. The CA likewise: `--tls-ca
FILE`, else `[bus] tls_ca`, else the CA gatefleet generated under `data_dir`.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from bus.connection import ClientAuth
from bus.server import ServerTls
from gatefleet.config import split_host_port
from gatefleet.security.authority import AUTH_DIR, Authority
from gatefleet.security.jwt import CredsError, read_creds
from gatefleet.security.tls import TLS_DIR, ensure_tls
from schemas.settings import Settings

CREDS_ENV = "GATEFLEET_CREDS"
ADMIN_CREDS = "admin.creds"
GENERATED_CA = f"{TLS_DIR}/ca.pem"  # under data_dir/auth: see gatefleet.security.tls
log = logging.getLogger(__name__)


def server_tls(settings: Settings, data_dir: Path) -> ServerTls | None:
    """The embedded server's TLS: `[bus] tls_cert`/`tls_key`; else, beyond loopback, a
    certificate from a CA gatefleet makes (its path logged, for clients' --tls-ca)."""
    bus = settings.bus
    if bus.tls_cert:
        return ServerTls(Path(bus.tls_cert), Path(bus.tls_key))
    if is_loopback(bus.listen):
        return None
    cert, key, ca = ensure_tls(data_dir / AUTH_DIR, bus.listen)
    log.info("TLS on: clients check the server with the CA %s (--tls-ca, [bus] tls_ca)", ca)
    return ServerTls(cert, key)


def own_auth(settings: Settings, data_dir: Path) -> ClientAuth:
    """gatefleet's own connection: checked, so a bad file is one line at start."""
    if settings.bus.url:
        return checked(settings.bus.creds, settings.bus.tls_ca)
    creds = data_dir / AUTH_DIR / ADMIN_CREDS if settings.bus.auth else ""
    return checked(str(creds), str(_ca(settings, data_dir)))


def command_auth(
    settings: Settings, data_dir: Path, creds: str = "", tls_ca: str = ""
) -> ClientAuth:
    """A client command's connection: the flags, else what gatefleet itself would use
    (when its files are there: a command on another machine connects without)."""
    if not creds:
        if settings.bus.url:
            creds = settings.bus.creds
        elif settings.bus.auth and (data_dir / AUTH_DIR / ADMIN_CREDS).exists():
            creds = str(data_dir / AUTH_DIR / ADMIN_CREDS)
    return checked(creds, tls_ca or str(_ca(settings, data_dir)))


def system_auth(settings: Settings, authority: Authority) -> ClientAuth:
    """The system-account user that pushes account updates to the server."""
    return checked(str(authority.system_creds), str(_ca(settings, authority.dir.parent)))


def simulator_auth(
    settings: Settings, data_dir: Path, creds: str = "", tls_ca: str = ""
) -> ClientAuth:
    """The simulator's connection: the flags, else a simulator credential of gatefleet's
    keys on this machine (found, or made), else as a command's."""
    authority = None if creds else _local_authority(settings, data_dir)
    if authority is not None:
        prefix = settings.bus.subject_prefix
        creds = str(authority.local_creds("simulator", f"simulate-{prefix}", prefix))
    return command_auth(settings, data_dir, creds, tls_ca)


def gateway_auths(
    settings: Settings, data_dir: Path, tls_ca: str = ""
) -> Callable[[str], ClientAuth]:
    """`simulate --per-gateway-creds`: for each gateway id, its gateway credential of
    gatefleet's keys on this machine (found, or made) and the CA as a command's.
    CredsError (one line) when there are no keys here to issue them from."""
    authority = _local_authority(settings, data_dir)
    if authority is None:
        raise CredsError(
            f"no gatefleet keys under {data_dir} to issue gateway credentials from: "
            "run it on gatefleet's machine, with its --config"
        )
    prefix = settings.bus.subject_prefix
    ca = checked("", tls_ca or str(_ca(settings, data_dir))).tls_ca

    def auth(gateway_id: str) -> ClientAuth:
        return ClientAuth(str(authority.local_creds("gateway", gateway_id, prefix)), ca)

    return auth


def _local_authority(settings: Settings, data_dir: Path) -> Authority | None:
    """gatefleet's keys on this machine: there, or to be made as gatefleet would (the
    embedded server with auth); else None."""
    if Authority.exists(data_dir) or (settings.bus.auth and not settings.bus.url):
        return Authority(data_dir)
    return None


def _ca(settings: Settings, data_dir: Path) -> str | Path:
    if settings.bus.tls_ca:
        return settings.bus.tls_ca
    generated = data_dir / AUTH_DIR / GENERATED_CA
    return generated if generated.exists() else ""


def checked(creds: str, tls_ca: str) -> ClientAuth:
    """ClientAuth for these files once each is usable; CredsError (one line) if not."""
    if creds:
        read_creds(Path(creds))
    if tls_ca:
        try:
            ssl.create_default_context(cafile=tls_ca)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise CredsError(f"TLS CA file {tls_ca}: cannot use it: {reason}") from None
    return ClientAuth(creds=creds, tls_ca=tls_ca)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_problem(settings: Settings, http_listen: str | None = None) -> str:
    """Why gatefleet must not start open to the network with these settings (one line),
    or "": an unauthenticated bus, or an HTTP API without a token, beyond loopback."""
    bus = settings.bus
    if not bus.url and not bus.auth and not is_loopback(bus.listen):
        return f"[bus] listen = {bus.listen!r} is not loopback: that needs [bus] auth = true"
    listen = http_listen or settings.http.listen
    try:
        host = split_host_port(listen)[0] if listen else "localhost"
    except ValueError:
        return ""  # reported as a bad address where it is used
    if not is_loopback(host) and not settings.http.token:
        return f"HTTP API on {listen} is not loopback: that needs [http] token"
    return ""
