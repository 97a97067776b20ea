"""What every command line entry shares: exit codes, one-line failures, client options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from gatefleet.config import ConfigError, load_settings
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


def client_options(fn: F) -> F:
    """--config, --nats (or GATEFLEET_NATS_URL) and --json, as every client command takes them."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    fn = click.option("--nats", envvar="GATEFLEET_NATS_URL", help="NATS URL (overrides config).")(
        fn
    )
    return click.option("--config", envvar="GATEFLEET_CONFIG", help="Configuration file.")(fn)
