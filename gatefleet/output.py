"""Human output (rich tables) and --json output of the client commands."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from rich.console import Console
from rich.table import Table

from schemas.api import GatewaysReply, LoadBalancingConfig, SelectReply, StatusReply

if TYPE_CHECKING:
    from gatefleet.simulate import SimulationSummary

# Piped output is not wrapped at 80 columns: tables stay one row per gateway.
console = Console(width=None if sys.stdout.isatty() else 160)


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
        ("gateways managed", reply.gateways_managed),
        ("gateways healthy", reply.gateways_healthy),
        ("strategy", reply.load_balancing_strategy),
        ("health threshold", f"{reply.health_check_threshold:g}%"),
        ("HA", "enabled" if reply.ha_enabled else "disabled"),
        ("distributions active", reply.active_distributions),
        ("distributions completed", reply.successfully_completed_distributions),
        ("distributions failed", reply.failed_distributions),
        ("actor restarts", reply.actor_restarts),
    ]
    rows += [(f"dropped: {cause}", n) for cause, n in sorted(reply.malformed_messages.items())]
    console.print(key_value_table("gatefleet", rows))


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


STATUS_STYLE = {"healthy": "green", "degraded": "yellow", "down": "red", "unknown": "dim"}


def _ago(when: datetime | None) -> str:
    if when is None:
        return "never"
    seconds = (datetime.now(UTC) - when).total_seconds()
    return f"{seconds:.1f}s ago" if seconds < 120 else when.strftime("%Y-%m-%d %H:%M:%S")


def show_gateways(reply: GatewaysReply, *, as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    table = Table(title=f"{len(reply.gateways)} gateways", title_justify="left")
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
            f"[{STATUS_STYLE.get(g.status, '')}]{g.status}[/]",
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
