"""Human output (rich tables) and --json output of the client commands."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.live import Live
from rich.table import Table

from schemas.api import (
    DistributeReply,
    DistributionListReply,
    DistributionPage,
    DistributionPlan,
    GatewaysReply,
    LoadBalancingConfig,
    MaintenanceReply,
    SelectReply,
    StatusReply,
)

if TYPE_CHECKING:
    from gatefleet.simulate import SimulationSummary
    from schemas.micro import Replica

# Piped output is not wrapped at 80 columns: tables stay one row per gateway.
console = Console(width=None if sys.stdout.isatty() else 160)
# Reading every page of a list shows progress on stderr once it has taken this long.
PROGRESS_AFTER_S = 1.0
R = TypeVar("R")


def print_json(obj: Any) -> None:
    # Plain stdout, no colour or wrapping: meant for jq and scripts.
    print(msgspec.json.encode(obj).decode())


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def show_status(reply: StatusReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    rows: list[tuple[str, Any]] = [
        ("status", reply.status),
        (
            "replica",
            f"{reply.replica_id} ({reply.role}; leader {reply.leader or 'unknown'})"
            if reply.replica_id
            else "-",
        ),
        ("gateways managed", reply.gateways_managed),
        ("gateways healthy", reply.gateways_healthy),
        ("gateways flapping", reply.gateways_flapping),
        ("gateways in maintenance", reply.gateways_in_maintenance),
        ("strategy", reply.load_balancing_strategy),
        ("health threshold", f"{reply.health_check_threshold:g}%"),
        ("HA", "enabled" if reply.ha_enabled else "disabled"),
        ("distributions active", reply.active_distributions),
        ("distributions completed", reply.successfully_completed_distributions),
        ("distributions failed", reply.failed_distributions),
        ("actor restarts", reply.actor_restarts),
        ("orchestrator lag", f"{reply.orchestrator_lag_ms:.0f} ms"),
        (
            "detection",
            "suspended (gatefleet cannot see: missed heartbeats do not count)"
            if reply.detection_suspended
            else f"on ({reply.detection_suspended_s:.1f}s suspended since start)",
        ),
    ]
    rows += [
        (f"{config_type} held by", dist_id)
        for config_type, dist_id in sorted(reply.distribution_blockers.items())
    ]
    rows += [(f"shed: {kind}", n) for kind, n in sorted(reply.shed.items()) if n]
    rows += [(f"dropped: {cause}", n) for cause, n in sorted(reply.malformed_messages.items())]
    rows += [(f"violations: {user}", n) for user, n in sorted(reply.permission_violations.items())]
    rows += [(f"test credential: {name}", "may connect") for name in reply.test_credentials]
    console.print(key_value_table("gatefleet", rows))


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


STATUS_STYLE = {"healthy": "green", "degraded": "yellow", "down": "red", "unknown": "dim"}


def _ago(when: datetime | None) -> str:
    if when is None:
        return "never"
    seconds = (datetime.now(UTC) - when).total_seconds()
    return f"{seconds:.1f}s ago" if seconds < 120 else when.strftime("%Y-%m-%d %H:%M:%S")


def show_replicas(replicas: list[Replica], *, as_json: bool) -> None:
    if as_json:
        print_json(replicas)
        return
    table = Table(title=f"{len(replicas)} replicas", title_justify="left")
    for column in ("replica", "role", "leader", "epoch", "lease renewed", "version"):
        table.add_column(column, no_wrap=True)
    for r in replicas:
        renewed = datetime.fromisoformat(r.lease_renewed_at) if r.lease_renewed_at else None
        role = f"[bold green]{r.role}[/]" if r.role == "leader" else r.role
        table.add_row(
            r.replica_id,
            role,
            r.leader or "unknown",
            "-" if r.epoch is None else str(r.epoch),
            _ago(renewed),
            r.version,
        )
    console.print(table)


def read_pages(
    pages: Iterable[R],
    rows: Callable[[R], Sequence[Any]],
    cursor: Callable[[R], str | None],
    what: str,
    *,
    quiet_s: float = PROGRESS_AFTER_S,
) -> tuple[list[Any], str | None]:
    """Every row of `pages`, and the last page's next_cursor (set when a row limit cut the
    listing short). Progress goes to stderr, and only once reading takes `quiet_s`."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    shown = False
    collected: list[Any] = []
    next_cursor: str | None = None
    for page in pages:
        collected += rows(page)
        next_cursor = cursor(page)
        if next_cursor is not None and time.monotonic() - started >= quiet_s:
            line = f"gatefleet: read {len(collected)} {what} so far..."
            click.echo(f"\r{line}" if tty else line, err=True, nl=not tty)
            shown = True
    if shown and tty:
        click.echo("\r\033[K", err=True, nl=False)  # the table replaces the progress line
    return collected, next_cursor


def read_gateways(pages: Iterable[GatewaysReply]) -> GatewaysReply:
    """One reply holding every page's rows (what `gatefleet gateways --json` prints)."""
    rows, cursor = read_pages(pages, lambda p: p.gateways, lambda p: p.next_cursor, "gateways")
    return GatewaysReply(gateways=rows, next_cursor=cursor)


def read_distributions(pages: Iterable[DistributionListReply]) -> DistributionListReply:
    rows, cursor = read_pages(
        pages, lambda p: p.distributions, lambda p: p.next_cursor, "distributions"
    )
    return DistributionListReply(distributions=rows, next_cursor=cursor)


_MORE = "more follow: --limit 0 lists them all"


def show_gateways(reply: GatewaysReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    table = Table(title=f"{len(reply.gateways)} gateways", title_justify="left")
    if reply.next_cursor is not None:
        table.caption = _MORE
    for column in (
        "id",
        "region",
        "role",
        "status",
        "score",
        "CPU",
        "memory",
        "connections",
        "latency",
        "failures",
        "last seen",
    ):
        table.add_column(column, justify="right" if column in NUMERIC else "left", no_wrap=True)
    for g in reply.gateways:
        role = g.role if not g.backup_for else f"{g.role} of {g.backup_for}"
        connections = (
            "-"
            if g.active_connections is None
            else (
                f"{g.active_connections}" + (f"/{g.max_connections}" if g.max_connections else "")
            )
        )
        table.add_row(
            g.gateway_id,
            g.region,
            role,
            f"[{STATUS_STYLE.get(g.status, '')}]{g.status}[/]"
            + (" [magenta]flapping[/]" if g.flapping else "")
            + (" [cyan]maintenance[/]" if g.maintenance else ""),
            f"{g.score:.1f}",
            _fmt(g.cpu_percent, "%"),
            _fmt(g.memory_percent, "%"),
            connections,
            _fmt(g.latency_ms, " ms"),
            str(g.consecutive_failures),
            _ago(g.last_seen),
        )
    console.print(table)


NUMERIC = {"score", "CPU", "memory", "connections", "latency", "failures"}


def show_selection(reply: SelectReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    chosen = reply.gateway_id or "none"
    console.print(f"[bold]{chosen}[/]  ({reply.strategy}: {reply.reason})")
    if reply.selection_id:
        console.print(f"[dim]explain: gatefleet audit explain {reply.selection_id}[/]")


def show_load_balancing(config: LoadBalancingConfig, *, as_json: bool) -> None:
    if as_json:
        print_json(config)
        return
    console.print(
        f"strategy [bold]{config.strategy}[/], health threshold {config.health_threshold:g}%"
    )


def show_maintenance(reply: MaintenanceReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    if reply.enabled:
        why = f" ({reply.reason})" if reply.reason else ""
        console.print(f"{reply.gateway_id}: in maintenance{why}; its traffic moves to a backup")
    else:
        console.print(
            f"{reply.gateway_id}: maintenance off; selectable again after its next good heartbeats"
        )


def show_simulation(summary: SimulationSummary, *, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    rows: list[tuple[str, Any]] = [
        ("gateways", summary.gateways),
        ("regions", ", ".join(summary.regions)),
        ("backups", summary.backups),
        ("heartbeats sent", summary.heartbeats_sent),
        ("config pushes", summary.config_pushes),
        ("ran for", f"{summary.duration_s:.1f}s"),
    ]
    rows += [(f"fault: {kind}", len(ids)) for kind, ids in summary.faulty.items() if ids]
    console.print(key_value_table("simulation", rows))


STATE_STYLE = {
    "acked": "green",
    "nacked": "red",
    "failed": "red",
    "unhealthy": "red",
    "skipped": "dim",
    "timed_out": "yellow",
    "retrying": "yellow",
    "sent": "cyan",
    "pending": "dim",
}


def show_created(reply: DistributeReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    if reply.plan is not None:
        console.print(plan_table(reply.plan))
        return
    console.print(
        f"{reply.distribution_id} {reply.status}  "
        f"[dim](gatefleet distributions {reply.distribution_id})[/]"
    )


def plan_table(plan: DistributionPlan) -> Table:
    """A dry run: the targets in batch order, and the version each holds now."""
    title = f"dry run: {plan.config_type} v{plan.version}, {len(plan.batches)} batches"
    if plan.waits_behind:
        title += f", after {plan.waits_behind}"
    if plan.not_before:
        title += f", not before {plan.not_before.isoformat()}"
    table = Table(title=title, title_justify="left")
    for column in ("batch", "gateway", "holds now"):
        table.add_column(column, no_wrap=True)
    canary = set(plan.canary)
    for n, batch in enumerate(plan.batches, 1):
        for gateway_id in batch:
            version = plan.versions_now.get(gateway_id)
            label = f"{n} (canary)" if gateway_id in canary else str(n)
            table.add_row(label, gateway_id, "-" if version is None else f"v{version}")
    if plan.unknown_gateways:
        table.caption = f"unknown, not pushed: {', '.join(plan.unknown_gateways)}"
    return table


def distribution_table(record: DistributionPage) -> Table:
    """The distribution and the per-gateway states it holds (one page, or all of them)."""
    done = record.successful_count + record.failed_count
    title = (
        f"{record.id}  {record.config_type} v{record.version}  {record.status}  "
        f"{record.phase or f'batch {record.batch}'}  {done}/{record.target_count} done"
    )
    table = Table(title=title, title_justify="left")
    for column in ("gateway", "state", "attempts", "error"):
        table.add_column(column, no_wrap=column != "error")
    for gateway_id in record.target_gateways:
        delivery = record.gateways.get(gateway_id)
        if delivery is None:
            continue
        style = STATE_STYLE.get(delivery.state, "")
        table.add_row(
            gateway_id,
            f"[{style}]{delivery.state}[/]",
            str(delivery.attempts),
            delivery.error or "",
        )
    if record.reason:
        table.caption = record.reason
    return table


def show_distribution(record: DistributionPage, *, as_json: bool) -> None:
    if as_json:
        print_json(record)
        return
    console.print(distribution_table(record))


def show_distributions(reply: DistributionListReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    table = Table(title=f"{len(reply.distributions)} distributions", title_justify="left")
    if reply.next_cursor is not None:
        table.caption = _MORE
    columns = ("id", "type", "version", "status", "phase", "acked", "failed", "targets", "created")
    for column in columns:
        table.add_column(column, no_wrap=column != "phase")
    for d in reply.distributions:
        style = STATUS_STYLES.get(d.status, "")
        table.add_row(
            d.id,
            d.config_type,
            str(d.version),
            f"[{style}]{d.status}[/]",
            d.phase,
            str(len(d.successful_gateways)),
            str(len(d.failed_gateways)),
            str(len(d.target_gateways)),
            d.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


STATUS_STYLES = {
    "completed": "green",
    "failed": "red",
    "halted": "red",
    "partially_failed": "yellow",
    "rolled_back": "yellow",
    "rolling_back": "yellow",
    "paused": "cyan",
    "scheduled": "cyan",
    "aborted": "dim",
}
FINISHED = ("completed", "partially_failed", "failed", "halted", "aborted", "rolled_back")
POLL_S = 0.2


def follow_distribution(
    fetch: Callable[[], DistributionPage],
    fetch_all: Callable[[], DistributionPage],
    *,
    as_json: bool,
) -> DistributionPage:
    """Re-reads the record (`fetch`: its first page) until it ends, showing progress: a
    live table on a terminal, a line per change otherwise; then shows it whole
    (`fetch_all`: every page). --json prints only the final record, whole."""
    record = fetch()
    if as_json:
        while record.status not in FINISHED:
            time.sleep(POLL_S)
            record = fetch()
        record = fetch_all()
        print_json(record)
        return record
    with Live(
        distribution_table(record),
        console=console,
        refresh_per_second=8,
        transient=not console.is_terminal,
    ) as live:
        last = ""
        while True:
            live.update(distribution_table(record))
            line = _progress_line(record)
            if not console.is_terminal and line != last:
                console.print(line)
                last = line
            if record.status in FINISHED:
                break
            time.sleep(POLL_S)
            record = fetch()
    record = fetch_all()
    if not console.is_terminal:
        console.print(distribution_table(record))
    return record


def _progress_line(record: DistributionPage) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(record.state_counts.items()))
    return f"{record.id} {record.status} {record.phase or f'batch {record.batch}'}: {counts}"
