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
from bus.server import ServerAuth, ServerCluster
from gatefleet.cli_common import EXIT_CONFIG, EXIT_USAGE, fail, settings_or_exit
from gatefleet.config import discover_url, resolve_data_dir, split_host_port
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
# What `nats-config --routes` writes: the cluster's name, and the port every node's routes
# listen on (NATS's usual one).
CLUSTER_NAME = "gatefleet"
ROUTE_PORT = 6222


def _routes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...]:
    """`--routes a:6222,b:6222` -> their route URLs; a usage error for anything else."""
    if value is None:
        return ()
    routes = []
    for address in (part.strip() for part in value.split(",") if part.strip()):
        try:
            split_host_port(address)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        routes.append(f"nats-route://{address}")
    if not routes:
        raise click.BadParameter("expected HOST:PORT of every node, comma-separated")
    return tuple(routes)


@click.command("nats-config")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write into (made if missing).",
)
@click.option(
    "--routes",
    callback=_routes,
    metavar="HOST:PORT,...",
    help=f"Write nats-server.conf for every node of one cluster: the route address of each "
    f"(its own included); each listens for routes on {ROUTE_PORT} and gets its name with "
    "nats-server --server_name.",
)
@click.option(
    "--resolver-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the server keeps account JWTs, on its own disk (default: OUT/jwt, filled "
    "now). Every node of a cluster needs its own; a new one fills itself.",
)
@_config_option
def nats_config(
    out: Path, routes: tuple[str, ...], resolver_dir: Path | None, config: str | None
) -> None:
    """Write what an external nats-server needs to trust gatefleet's credentials.

    OUT gets gatefleet-auth.conf (operator, system account, fleet account and a full
    resolver, in OUT/jwt unless --resolver-dir: `include` it in the server's config),
    gatefleet.creds (for [bus] creds), system.creds (pushes revocations) and
    nats-server.conf, a complete example with JetStream that includes it; with --routes,
    the config of every node of a cluster whose routes need a password (kept with the
    keys; this file is 0600). Keys stay under [bus] data_dir.
    """
    _, authority = _authority(config)
    out = out.resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if resolver_dir is None:
            resolver_dir = out / "jwt"
            resolver_dir.mkdir(exist_ok=True)
            for account, token in authority.account_jwts().items():
                (resolver_dir / f"{account}.jwt").write_text(token)
        (out / "operator.jwt").write_text(authority.operator_jwt + "\n")
        auth = ServerAuth(
            operator_jwt=out / "operator.jwt",
            system_account=authority.system_account,
            resolver_dir=resolver_dir,
            jetstream_account=authority.fleet_account,
            accounts=authority.account_jwts(),
        )
        (out / AUTH_CONF).write_text(auth.config())
        write_private(out / EXAMPLE_CONF, _example_config(authority, routes))
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


def _example_config(authority: Authority, routes: tuple[str, ...]) -> str:
    text = (
        "# An example nats-server configuration for gatefleet (adapt ports and store).\n"
        "port: 4222\n"
        'jetstream {\n  store_dir: "/data"\n  sync_interval: always\n}\n'
    )
    if routes:
        text += "# One config for every node: start each with its own --server_name.\n"
        cluster = ServerCluster(
            CLUSTER_NAME, "", ROUTE_PORT, routes, route_password=authority.route_password()
        )
        text += cluster.config("0.0.0.0")  # noqa: S104 - routes come from the other nodes
    return text + f"include {AUTH_CONF}\n"
