"""Human output (rich tables) and --json output of the client commands."""

from __future__ import annotations

from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from schemas.api import StatusReply

console = Console()


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
