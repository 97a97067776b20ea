"""The `gatefleet` command line: `up` runs the orchestrator, the rest are clients.

Every client command takes --config, --nats (or GATEFLEET_NATS_URL) and --json. An
expected failure (bad config, server unreachable, not found) is one line on stderr and
a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, TypeVar, get_args

import click
import msgspec

from bus.connection import AccessRefused, BusError, ClientAuth
from bus.server import ServerError
from gatefleet import output
from gatefleet.app import Orchestrator
from gatefleet.audit import audit
from gatefleet.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_USAGE,
    client_auth,
    client_options,
    fail,
    per_gateway_auth,
    settings_or_exit,
)
from gatefleet.client import GatefleetClient, GatefleetError, NotFound, Refused
from gatefleet.config import config_warnings, discover_url, split_host_port
from gatefleet.http import HttpApi
from gatefleet.schema_cli import schema
from gatefleet.security.access import exposure_problem
from gatefleet.security.command import credentials, nats_config
from gatefleet.security.jwt import CredsError
from gatefleet.simulate import Faults, PushRecord, Recorder, run_simulation_blocking
from schemas.api import Rollout
from schemas.codec import decode
from schemas.settings import Settings
from schemas.types import STRATEGIES, DistributionStatus, GatewayStatus

F = TypeVar("F", bound=Callable[..., Any])


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
    settings = settings_or_exit(config, nats)
    url = discover_url(settings, os.environ)
    auth = client_auth(settings)
    client = GatefleetClient(url, prefix=settings.bus.subject_prefix, auth=auth)
    try:
        client.connect()
        yield client, ClientContext(settings, url, as_json)
    except NotFound as exc:
        fail(f"not found: {exc}")
    except Refused as exc:
        fail(str(exc), EXIT_CONFIG)
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
    "--http",
    "http_listen",
    metavar="HOST:PORT",
    help="Serve the HTTP API here (overrides [http] listen).",
)
@click.option(
    "--http-token",
    envvar="GATEFLEET_HTTP_TOKEN",
    help="Bearer token of the HTTP API (overrides [http] token); or GATEFLEET_HTTP_TOKEN.",
)
@click.option(
    "--simulate",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Also run N simulated gateways, so there is a live fleet to look at.",
)
@click.option(
    "--regions",
    default="us-west,us-east,eu-west",
    show_default=True,
    help="Regions of the simulated gateways.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def up(
    config: str | None,
    nats: str | None,
    http_listen: str | None,
    http_token: str | None,
    simulate: int,
    regions: str,
    log_level: str,
) -> None:
    """Run the orchestrator (on an embedded nats-server unless a URL is configured)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("gatefleet")
    settings = settings_or_exit(config, nats)
    if http_token:
        settings = msgspec.structs.replace(
            settings, http=msgspec.structs.replace(settings.http, token=http_token)
        )
    if not settings.orchestrator.enabled:
        log.warning("orchestrator.enabled is false in the configuration: nothing to run")
        return
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    fatal: list[str] = []

    def give_up(why: str) -> None:
        fatal.append(why)
        stop.set()

    if problem := exposure_problem(settings, http_listen):
        fail(problem, EXIT_CONFIG)
    if not settings.bus.url and not settings.bus.auth:
        log.warning("[bus] auth = false: anyone who can reach the NATS port can do anything")
    for line in config_warnings(settings):
        log.warning("%s", line)
    orchestrator = Orchestrator(settings, on_fatal=give_up)
    started = time.monotonic()
    try:
        url = orchestrator.start()
    except (CredsError, AccessRefused) as exc:
        fail(str(exc), EXIT_CONFIG)
    except (BusError, ServerError, OSError) as exc:
        fail(f"cannot start: {exc}")
    embedded = "embedded nats-server" if orchestrator.server else "external NATS"
    log.info(
        "gatefleet ready in %.2fs: %s at %s, subject prefix %r",
        time.monotonic() - started,
        embedded,
        url,
        settings.bus.subject_prefix,
    )
    http_api = _start_http(http_listen or settings.http.listen, url, settings, orchestrator)
    simulation = (
        _start_simulation(url, simulate, regions, settings, orchestrator, stop)
        if simulate
        else None
    )
    try:
        stop.wait()
    finally:
        log.info("shutting down")
        if simulation is not None:
            simulation.join(10)
        if http_api is not None:
            http_api.stop()  # drains its own connection while the server is still up
        orchestrator.stop()
        log.info("stopped")
    if fatal:
        fail(fatal[0])


def _start_http(
    listen: str, url: str, settings: Settings, orchestrator: Orchestrator
) -> HttpApi | None:
    if not listen:
        return None
    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        orchestrator.stop()
        fail(f"--http: {exc}", EXIT_USAGE)
    http_api = HttpApi(per_gateway_metrics_max=settings.http.per_gateway_metrics_max)
    try:
        http_api.start(
            url,
            settings.bus.subject_prefix,
            host,
            port,
            settings.http.token,
            read_only_token=settings.http.read_only_token,
            auth=orchestrator.client_auth,
        )
    except (BusError, OSError) as exc:
        orchestrator.stop()
        fail(f"cannot serve HTTP on {listen}: {exc}")
    return http_api


def _start_simulation(
    url: str,
    count: int,
    regions: str,
    settings: Settings,
    orchestrator: Orchestrator,
    stop: threading.Event,
) -> threading.Thread:
    """Simulated gateways on their own thread and loop; they say goodbye when `stop` is set.
    On the embedded server with auth, they connect with a simulator credential."""
    auth = orchestrator.client_auth
    if orchestrator.authority is not None:
        prefix = settings.bus.subject_prefix
        creds = orchestrator.authority.local_creds("simulator", f"simulate-{prefix}", prefix)
        auth = ClientAuth(creds=str(creds), tls_ca=auth.tls_ca)

    def run() -> None:
        try:
            run_simulation_blocking(
                url,
                count,
                _regions(regions),
                stop=stop,
                prefix=settings.bus.subject_prefix,
                interval_s=settings.health.heartbeat_interval_ms / 1000,
                auth=auth,
            )
        except BusError as exc:
            logging.getLogger("gatefleet").error("simulation stopped: %s", exc)  # noqa: TRY400 - expected, no traceback

    thread = threading.Thread(target=run, name="gatefleet-simulation")
    thread.start()
    return thread


def _regions(text: str) -> list[str]:
    regions = [r.strip() for r in text.split(",") if r.strip()]
    if not regions:
        fail("--regions needs at least one region", EXIT_USAGE)
    return regions


@main.command()
@client_options
def status(config: str | None, nats: str | None, as_json: bool) -> None:
    """Show the orchestrator's status."""
    with connected(config, nats, as_json) as (client, ctx):
        output.show_status(client.status(), as_json=ctx.as_json)


@main.command()
@client_options
def replicas(config: str | None, nats: str | None, as_json: bool) -> None:
    """List the running gatefleet replicas, with their role and the lease's last renewal."""
    with connected(config, nats, as_json) as (client, ctx):
        found = client.replicas()
        if not found:
            fail("no gatefleet replica answered: is gatefleet running?", EXIT_FAILURE)
        output.show_replicas(found, as_json=ctx.as_json)


def _limit_option(what: str) -> Callable[[F], F]:
    return click.option(
        "--limit",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help=f"List at most this many {what} (0: all of them, page after page).",
    )


@main.command()
@click.option("--status", type=click.Choice(get_args(GatewayStatus)), help="Only these.")
@click.option("--region", help="Only gateways of this region.")
@_limit_option("gateways")
@client_options
def gateways(
    status: GatewayStatus | None,
    region: str | None,
    limit: int,
    config: str | None,
    nats: str | None,
    as_json: bool,
) -> None:
    """List the gateways with their health, by id."""
    with connected(config, nats, as_json) as (client, ctx):
        pages = client.gateway_pages(status=status, region=region, max_rows=limit or None)
        output.show_gateways(output.read_gateways(pages), as_json=ctx.as_json)


@main.command()
@click.option("--region", help="The client's region (used by RegionAware).")
@click.option("--client-id", help="Stick to the same gateway for this client.")
@client_options
def select(
    region: str | None, client_id: str | None, config: str | None, nats: str | None, as_json: bool
) -> None:
    """Ask which gateway a client should use."""
    with connected(config, nats, as_json) as (client, ctx):
        output.show_selection(client.select_optimal_gateway(region, client_id), as_json=ctx.as_json)


@main.command()
@click.argument("name", required=False, type=click.Choice(STRATEGIES))
@click.option("--threshold", type=click.FloatRange(0, 100), help="Health threshold, 0-100.")
@client_options
def strategy(
    name: str | None, threshold: float | None, config: str | None, nats: str | None, as_json: bool
) -> None:
    """Show the load-balancing strategy, or set it (and/or the threshold)."""
    with connected(config, nats, as_json) as (client, ctx):
        if name is None and threshold is None:
            in_force = client.get_load_balancing_config()
        else:
            in_force = client.update_load_balancing_config(name, threshold)  # type: ignore[arg-type]
        output.show_load_balancing(in_force, as_json=ctx.as_json)


@main.command()
@click.argument("gateway_id")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--reason", help="Why (shown in tables and recorded in the audit trail).")
@client_options
def maintenance(
    gateway_id: str,
    state: str,
    reason: str | None,
    config: str | None,
    nats: str | None,
    as_json: bool,
) -> None:
    """Drain a gateway for maintenance (on), or return it to service (off)."""
    with connected(config, nats, as_json) as (client, ctx):
        reply = client.set_maintenance(gateway_id, state == "on", reason)
        output.show_maintenance(reply, as_json=ctx.as_json)


@main.command()
@click.option("--count", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--regions", default="us-west,us-east,eu-west", show_default=True)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between heartbeats.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@click.option(
    "--backup-every",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Every Nth gateway of a region is a backup for the one before (0: none).",
)
@click.option(
    "--stop-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of gateways that stop beating after --fault-after.",
)
@click.option(
    "--crash-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share that crash (no goodbye) after --fault-after.",
)
@click.option(
    "--flap-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share that keep going silent and coming back.",
)
@click.option("--slow-rate", type=click.FloatRange(0, 1), default=0.0, help="Share with slow acks.")
@click.option(
    "--fail-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share that reject (nack) every config push.",
)
@click.option(
    "--silent-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share that never answer config pushes.",
)
@click.option("--fault-after", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option(
    "--recover-after",
    type=click.FloatRange(min=0),
    help="Stopped and crashed gateways come back this many seconds later.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False),
    help="Append every config push answered to this file, one JSON object a line.",
)
@click.option(
    "--per-gateway-creds",
    is_flag=True,
    help="Each gateway on a connection of its own with its own gateway credential "
    "(made from gatefleet's keys here), not one simulator credential: for small fleets.",
)
@client_options
def simulate(
    count: int,
    regions: str,
    interval: float,
    seed: int,
    duration: float | None,
    backup_every: int,
    stop_rate: float,
    crash_rate: float,
    flap_rate: float,
    slow_rate: float,
    fail_rate: float,
    silent_rate: float,
    fault_after: float,
    recover_after: float | None,
    record: str | None,
    per_gateway_creds: bool,
    config: str | None,
    nats: str | None,
    as_json: bool,
) -> None:
    """Run simulated gateways with changing metrics and optional faults, until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = settings_or_exit(config, nats)
    url = discover_url(settings, os.environ)
    gateway_auth = per_gateway_auth(settings) if per_gateway_creds else None
    auth = None if gateway_auth else client_auth(settings, simulator=True)
    faults = Faults(
        stop_beating=stop_rate,
        crash=crash_rate,
        flap=flap_rate,
        slow_acks=slow_rate,
        fail_acks=fail_rate,
        silent=silent_rate,
        after_s=fault_after,
        recover_after_s=recover_after,
    )
    with contextlib.ExitStack() as stack:
        recorder = _recorder(stack.enter_context(open(record, "ab"))) if record else None
        try:
            summary = run_simulation_blocking(
                url,
                count,
                _regions(regions),
                stop=threading.Event(),
                prefix=settings.bus.subject_prefix,
                interval_s=interval,
                seed=seed,
                faults=faults,
                duration_s=duration,
                backup_every=backup_every,
                auth=auth,
                gateway_auth=gateway_auth,
                record=recorder,
            )
        except AccessRefused as exc:
            fail(str(exc), EXIT_CONFIG)
        except BusError as exc:
            fail(str(exc))
    output.show_simulation(summary, as_json=as_json)


def _recorder(out: IO[bytes]) -> Recorder:
    """Writes each record as a line of JSON, flushed (a killed run keeps what it wrote)."""

    def record(push: PushRecord) -> None:
        out.write(msgspec.json.encode(push) + b"\n")
        out.flush()

    return record


def _target_list(targets: str | None) -> list[str] | None:
    return [t.strip() for t in targets.split(",") if t.strip()] if targets else None


def _wait_option(f: F) -> F:
    return click.option(
        "--wait", is_flag=True, help="Show progress until it ends; exit 0 only if all acked."
    )(f)


def _follow(client: GatefleetClient, dist_id: str, ctx: ClientContext) -> None:
    """`--wait`: the live table until it ends; exit status 1 unless it completed."""
    record = output.follow_distribution(
        lambda: client.get_distribution(dist_id),
        lambda: client.whole_distribution(dist_id),
        as_json=ctx.as_json,
    )
    if record.status != "completed":
        sys.exit(EXIT_FAILURE)


def _rollout(
    canary: str | None,
    health_gate: float | None,
    max_failures: int | None,
    auto_rollback: bool,
    pause_after_canary: bool,
    not_before: str | None,
) -> Rollout | None:
    """The rollout the distribute options ask for (None: none of them given)."""
    fields: dict[str, Any] = {
        "canary": int(canary) if canary is not None and canary.isdigit() else canary,
        "health_gate_s": health_gate,
        "max_failures": max_failures,
        "auto_rollback": auto_rollback or None,
        "pause_after_canary": pause_after_canary or None,
    }
    if not_before is not None:
        try:
            when = datetime.fromisoformat(not_before)
        except ValueError:
            fail(f"--not-before: not an ISO 8601 time: {not_before!r}", EXIT_USAGE)
        fields["not_before"] = when if when.tzinfo else when.astimezone()  # local time
    given = {key: value for key, value in fields.items() if value is not None}
    if not given:
        return None
    try:
        return msgspec.convert(given, Rollout)
    except msgspec.ValidationError as exc:
        fail(f"bad rollout option: {exc}", EXIT_USAGE)


@main.command()
@click.argument("config_type")
@click.argument("source", required=False, type=click.File("rb"), default="-")
@click.option("--targets", help="Comma-separated gateway ids (default: every active gateway).")
@_wait_option
@click.option("--canary", metavar="N", help="Push N gateways (or a share, e.g. 10%) first, alone.")
@click.option(
    "--health-gate",
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="After each batch its gateways must stay healthy this long, or they count as failed.",
)
@click.option(
    "--max-failures",
    type=click.IntRange(0),
    metavar="N",
    help="Failures tolerated before it halts (with any rollout option: default 0).",
)
@click.option(
    "--auto-rollback",
    is_flag=True,
    help="On a halt, push the previous version's content back to the gateways that got it.",
)
@click.option("--pause-after-canary", is_flag=True, help="Wait for `distributions resume` then.")
@click.option(
    "--not-before",
    metavar="TIME",
    help="Push nothing before this ISO 8601 time (local time unless it has an offset).",
)
@click.option("--dry-run", is_flag=True, help="Only show what it would do: batches, versions now.")
@client_options
def distribute(
    config_type: str,
    source: IO[bytes],
    targets: str | None,
    wait: bool,
    canary: str | None,
    health_gate: float | None,
    max_failures: int | None,
    auto_rollback: bool,
    pause_after_canary: bool,
    not_before: str | None,
    dry_run: bool,
    config: str | None,
    nats: str | None,
    as_json: bool,
) -> None:
    """Push configuration CONFIG_TYPE from SOURCE (a JSON object; a file, or - for stdin)."""
    name = getattr(source, "name", "-")
    try:
        config_data = decode(source.read(), object)
    except msgspec.DecodeError as exc:
        fail(f"{name}: not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(config_data, dict):
        fail(f"{name}: the configuration must be a JSON object", EXIT_USAGE)
    rollout = _rollout(
        canary, health_gate, max_failures, auto_rollback, pause_after_canary, not_before
    )
    with connected(config, nats, as_json) as (client, ctx):
        created = client.distribute(
            config_type, config_data, _target_list(targets), rollout=rollout, dry_run=dry_run
        )
        if wait and not dry_run:
            _follow(client, created.distribution_id, ctx)
        else:
            output.show_created(created, as_json=ctx.as_json)


@main.command()
@click.argument("config_type")
@click.option(
    "--to",
    "to_version",
    type=click.IntRange(1),
    metavar="VERSION",
    help=("The version whose content to push again (default: the one before the desired version)."),
)
@click.option("--targets", help="Comma-separated gateway ids (default: every active gateway).")
@_wait_option
@client_options
def rollback(
    config_type: str,
    to_version: int | None,
    targets: str | None,
    wait: bool,
    config: str | None,
    nats: str | None,
    as_json: bool,
) -> None:
    """Push an earlier version of CONFIG_TYPE again, as a new version (origin rollback)."""
    with connected(config, nats, as_json) as (client, ctx):
        created = client.rollback(config_type, to_version, _target_list(targets))
        if wait:
            _follow(client, created.distribution_id, ctx)
        else:
            output.show_created(created, as_json=ctx.as_json)


ACTIONS = ("pause", "resume", "abort")


@main.command()
@click.argument("words", nargs=-1, metavar="[ID | pause ID | resume ID | abort ID]")
@click.option("--all", "include_completed", is_flag=True, help="Include finished ones.")
@click.option(
    "--status",
    type=click.Choice(get_args(DistributionStatus)),
    help="Only these (finished ones included: implies --all).",
)
@click.option("--type", "config_type", help="Only distributions of this config type.")
@_limit_option("distributions")
@client_options
def distributions(
    words: tuple[str, ...],
    include_completed: bool,
    status: DistributionStatus | None,
    config_type: str | None,
    limit: int,
    config: str | None,
    nats: str | None,
    as_json: bool,
) -> None:
    """List distributions, oldest first (unfinished ones, or --all), show one by id, or
    pause, resume or abort a running one (`distributions pause ID`)."""
    action = words[0] if words and words[0] in ACTIONS else None
    if len(words) > 2 or (len(words) == 2) != (action is not None):
        fail("usage: gatefleet distributions [ID | pause ID | resume ID | abort ID]", EXIT_USAGE)
    distribution_id = words[-1] if words else None
    with connected(config, nats, as_json) as (client, ctx):
        if action is not None and distribution_id is not None:
            changed = {
                "pause": client.pause_distribution,
                "resume": client.resume_distribution,
                "abort": client.abort_distribution,
            }[action](distribution_id)
            output.show_distribution(changed, as_json=ctx.as_json)
        elif distribution_id:
            whole = client.whole_distribution(distribution_id)  # every page of its gateways
            output.show_distribution(whole, as_json=ctx.as_json)
        else:
            pages = client.distribution_pages(
                include_completed or status is not None,
                status=status,
                config_type=config_type,
                max_rows=limit or None,
            )
            output.show_distributions(output.read_distributions(pages), as_json=ctx.as_json)


main.add_command(audit)
main.add_command(schema)
main.add_command(credentials)
main.add_command(nats_config)
