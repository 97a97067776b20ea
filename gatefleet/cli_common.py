"""What every command line entry shares: exit codes, one-line failures, client options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from bus.connection import ClientAuth
from gatefleet.config import ConfigError, load_settings, resolve_data_dir
from gatefleet.security.access import CREDS_ENV, command_auth, gateway_auths, simulator_auth
from gatefleet.security.jwt import CredsError
from schemas.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """An expected failure: one line on stderr, a non-zero exit status, no traceback."""
    click.echo(f"gatefleet: {message}", err=True)
    sys.exit(code)


def settings_or_exit(config: str | None, nats: str | None) -> Settings:
    try:
        return load_settings(config, nats_url=nats)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Keeps --creds/--tls-ca for `client_auth` (given to a group or to its subcommand)."""
    if value:
        ctx.meta[f"gatefleet.{param.name}"] = value


def client_auth(settings: Settings, *, simulator: bool = False) -> ClientAuth:
    """The credentials and CA of this command's connection (see gatefleet.security.access;
    `simulator`: the simulator's); an unusable file is one line and exit 2."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    find = simulator_auth if simulator else command_auth
    try:
        return find(
            settings,
            resolve_data_dir(settings),
            meta.get("gatefleet.creds", ""),
            meta.get("gatefleet.tls_ca", ""),
        )
    except CredsError as exc:
        fail(str(exc), EXIT_CONFIG)


def per_gateway_auth(settings: Settings) -> Callable[[str], ClientAuth]:
    """`simulate --per-gateway-creds`: each gateway's credentials and the CA (see
    gatefleet.security.access.gateway_auths); a problem is one line and exit 2."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    if meta.get("gatefleet.creds"):
        fail(f"--per-gateway-creds takes no --creds (nor {CREDS_ENV})", EXIT_USAGE)
    try:
        return gateway_auths(settings, resolve_data_dir(settings), meta.get("gatefleet.tls_ca", ""))
    except CredsError as exc:
        fail(str(exc), EXIT_CONFIG)


def client_options(fn: F) -> F:
    """--config, --nats (or GATEFLEET_NATS_URL), --creds (or GATEFLEET_CREDS), --tls-ca and
    --json, as every client command takes them (read --creds/--tls-ca with client_auth)."""
    fn = click.option(
        "--tls-ca",
        metavar="FILE",
        expose_value=False,
        callback=_remember,
        help="CA to check the server's TLS certificate with (overrides [bus] tls_ca).",
    )(fn)
    fn = click.option(
        "--creds",
        envvar=CREDS_ENV,
        metavar="FILE",
        expose_value=False,
        callback=_remember,
        help="NATS credentials (.creds); default: gatefleet's own, found with --config.",
    )(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    fn = click.option("--nats", envvar="GATEFLEET_NATS_URL", help="NATS URL (overrides config).")(
        fn
    )
    return click.option("--config", envvar="GATEFLEET_CONFIG", help="Configuration file.")(fn)
