"""`gatefleet credentials ...`: issue and revoke NATS credentials from gatefleet's keys.

They work on the keys under `[bus] data_dir` (made on first use), so they run on
gatefleet's machine with its `--config`. Without `--out` a credential is written under
`data_dir/auth/creds/`; the path written is printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bus.claims import ClaimsRefused, push_account_blocking
from bus.connection import AccessRefused, BusError
from bus.server import ServerAuth
from gatefleet.cli_common import EXIT_CONFIG, EXIT_USAGE, fail, settings_or_exit
from gatefleet.config import discover_url, resolve_data_dir
from gatefleet.security.access import system_auth
from gatefleet.security.authority import Authority, AuthorityError
from gatefleet.security.jwt import CredsError, write_private
from gatefleet.security.permissions import Kind
from schemas.settings import Settings
from schemas.types import GATEWAY_ID_RE

F = TypeVar("F", bound=Callable[..., Any])


def _config_option(fn: F) -> F:
    return click.option("--config", envvar="GATEFLEET_CONFIG", help="Configuration file.")(fn)


def _out_option(fn: F) -> F:
    return click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write the .creds file here (default: under data_dir/auth/creds/).",
    )(fn)


def _authority(config: str | None) -> tuple[Settings, Authority]:
    settings = settings_or_exit(config, None)
    data_dir = resolve_data_dir(settings)
    try:
        return settings, Authority(data_dir)
    except OSError as exc:
        fail(f"cannot use the keys under {data_dir}: {exc}", EXIT_CONFIG)


def _issue(kind: Kind, name: str, config: str | None, out: Path | None) -> None:
    what = "gateway id" if kind == "gateway" else "name"
    if not GATEWAY_ID_RE.fullmatch(name):
        fail(f"invalid {what} {name!r}: need 1-64 of [A-Za-z0-9_-]", EXIT_USAGE)
    settings, authority = _authority(config)
    try:
        path = authority.issue(kind, name, settings.bus.subject_prefix, out)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", EXIT_CONFIG)
    if not settings.bus.url and not settings.bus.auth:
        click.echo(
            "gatefleet: note: [bus] auth = false: the embedded server checks no one", err=True
        )
    click.echo(str(path))


@click.group()
def credentials() -> None:
    """Issue and revoke NATS credentials (.creds files any NATS client can use)."""


@credentials.command("gateway")
@click.argument("gateway_id")
@_out_option
@_config_option
def gateway(gateway_id: str, out: Path | None, config: str | None) -> None:
    """For gateway GATEWAY_ID: its own heartbeat, goodbye, config, ping; redirects."""
    _issue("gateway", gateway_id, config, out)


@credentials.command("operator")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="Only status, gateways, select and reads.")
@_out_option
@_config_option
def operator(name: str, read_only: bool, out: Path | None, config: str | None) -> None:
    """For a person or a tool: the API, service discovery and the audit log."""
    _issue("read-only" if read_only else "operator", name, config, out)


@credentials.command("simulator")
@click.argument("name")
@_out_option
@_config_option
def simulator(name: str, out: Path | None, config: str | None) -> None:
    """A test credential with every gateway's permissions (for `gatefleet simulate`)."""
    _issue("simulator", name, config, out)


@credentials.command("revoke")
@click.argument("name_or_id")
@click.option("--nats", envvar="GATEFLEET_NATS_URL", help="NATS URL (overrides config).")
@_config_option
def revoke(name_or_id: str, nats: str | None, config: str | None) -> None:
    """Revoke every credential issued as NAME_OR_ID; live connections are closed."""
    settings, authority = _authority(config)
    try:
        revoked = authority.revoke(name_or_id)
    except AuthorityError as exc:
        fail(str(exc))
    for user in revoked:
        click.echo(f"revoked {user.kind} {user.name} ({user.public_key})")
    if nats:
        settings = settings_or_exit(config, nats)
    url = discover_url(settings, os.environ)
    try:
        push_account_blocking(url, system_auth(settings, authority), authority.fleet_jwt)
    except (ClaimsRefused, AccessRefused, CredsError) as exc:
        fail(f"the server at {url} was not told ({exc}); it refuses them from its next start")
    except BusError:
        click.echo(f"no server answers at {url}: it refuses them when it starts")
        return
    click.echo(f"the server at {url} closed their connections and refuses them from now on")


AUTH_CONF = "gatefleet-auth.conf"
EXAMPLE_CONF = "nats-server.conf"


@click.command("nats-config")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write into (made if missing).",
)
@_config_option
def nats_config(out: Path, config: str | None) -> None:
    """Write what an external nats-server needs to trust gatefleet's credentials.

    OUT gets gatefleet-auth.conf (operator, system account, fleet account and a full
    resolver in OUT/jwt: `include` it in the server's config), gatefleet.creds (for
    [bus] creds), system.creds (pushes revocations) and nats-server.conf, a complete
    example with JetStream that includes it. Keys stay under [bus] data_dir.
    """
    _, authority = _authority(config)
    out = out.resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        resolver = out / "jwt"
        resolver.mkdir(exist_ok=True)
        for account, token in authority.account_jwts().items():
            (resolver / f"{account}.jwt").write_text(token)
        (out / "operator.jwt").write_text(authority.operator_jwt + "\n")
        auth = ServerAuth(
            operator_jwt=out / "operator.jwt",
            system_account=authority.system_account,
            resolver_dir=resolver,
            jetstream_account=authority.fleet_account,
            accounts=authority.account_jwts(),
        )
        (out / AUTH_CONF).write_text(auth.config())
        (out / EXAMPLE_CONF).write_text(
            "# An example nats-server configuration for gatefleet (adapt port and store).\n"
            "port: 4222\n"
            'jetstream {\n  store_dir: "/data"\n  sync_interval: always\n}\n'
            f"include {AUTH_CONF}\n"
        )
        write_private(out / "gatefleet.creds", authority.admin_creds.read_text())
        write_private(out / "system.creds", authority.system_creds.read_text())
    except OSError as exc:
        fail(f"cannot write into {out}: {exc.strerror or exc}", EXIT_CONFIG)
    click.echo(str(out / AUTH_CONF))
    click.echo(
        f"include {AUTH_CONF} in the server's config (a path relative to that file), and "
        f'give gatefleet [bus] creds = "{out / "gatefleet.creds"}"',
        err=True,
    )
