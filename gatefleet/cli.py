"""The `gatefleet` command line: `up` runs the orchestrator, the rest are clients.

Every client command takes --config, --nats (or GATEFLEET_NATS_URL) and --json. An
expected failure (bad config, server unreachable, not found) is one line on stderr and
a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from bus.connection import BusError
from bus.server import ServerError
from gatefleet import output
from gatefleet.app import Orchestrator, discover_url
from gatefleet.client import GatefleetClient, GatefleetError, NotFound
from gatefleet.config import ConfigError, load_settings
from schemas.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def fail(message: str, code: int = EXIT_FAILURE) -> None:
    click.echo(f"gatefleet: {message}", err=True)
    sys.exit(code)


def _settings(config: str | None, nats: str | None) -> Settings:
    try:
        return load_settings(config, nats_url=nats)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        raise  # unreachable: fail() exits


def common_options(fn: F) -> F:
    """--config, --nats and --json, shared by every client command."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    fn = click.option("--nats", envvar="GATEFLEET_NATS_URL", help="NATS URL (overrides config).")(
        fn
    )
    return click.option("--config", envvar="GATEFLEET_CONFIG", help="Configuration file.")(fn)


@dataclass
class ClientContext:
    settings: Settings
    url: str
    as_json: bool


@contextmanager
def connected(
    config: str | None, nats: str | None, as_json: bool
) -> Iterator[tuple[GatefleetClient, ClientContext]]:
    # Connection retries are logged as warnings by the bus; a client reports failure once.
    logging.basicConfig(level=logging.ERROR)
    settings = _settings(config, nats)
    url = discover_url(settings, os.environ)
    client = GatefleetClient(url, prefix=settings.bus.subject_prefix)
    try:
        client.connect()
        yield client, ClientContext(settings, url, as_json)
    except NotFound as exc:
        fail(f"not found: {exc}")
    except GatefleetError as exc:
        fail(f"{exc.code}: {exc}")
    finally:
        client.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gatefleet: health, load balancing, config distribution and failover for gateway fleets."""


@main.command()
@click.option("--config", envvar="GATEFLEET_CONFIG", help="Configuration file.")
@click.option("--nats", help="Use this NATS server instead of the embedded one.")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def up(config: str | None, nats: str | None, log_level: str) -> None:
    """Run the orchestrator (on an embedded nats-server unless a URL is configured)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings(config, nats)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    orchestrator = Orchestrator(settings)
    started = time.monotonic()
    try:
        url = orchestrator.start()
    except (BusError, ServerError, OSError) as exc:
        fail(f"cannot start: {exc}")
    embedded = "embedded nats-server" if orchestrator.server else "external NATS"
    logging.getLogger("gatefleet").info(
        "gatefleet ready in %.2fs: %s at %s, subject prefix %r",
        time.monotonic() - started,
        embedded,
        url,
        settings.bus.subject_prefix,
    )
    try:
        stop.wait()
    finally:
        logging.getLogger("gatefleet").info("shutting down")
        orchestrator.stop()
        logging.getLogger("gatefleet").info("stopped")


@main.command()
@common_options
def status(config: str | None, nats: str | None, as_json: bool) -> None:
    """Show the orchestrator's status."""
    with connected(config, nats, as_json) as (client, ctx):
        output.show_status(client.status(), as_json=ctx.as_json)
