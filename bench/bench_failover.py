"""Failure detection and failover time, at a 100 ms heartbeat interval.

A primary with a backup beats every 100 ms; the primary stops, and we time, from its last
heartbeat as this process received it: the `gateway.down` event, the redirect notice on
`P.redirect.<id>`, and the first selection that returns the backup. Then it beats again
and fails back, and the trial repeats. The reference is the design bound (fall + 1) x
interval; the floor is (fall + 0.5) x interval, when detection is declared.

    python -m bench failover [--trials 20]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence

import msgspec

from bench.common import (
    bench_settings,
    embedded_server,
    machine_line,
    percentile,
    print_table,
    running_orchestrator,
    wait_for,
)
from bus.runtime import Bus, Inbound
from gatefleet.gateway import GatewayAgent, Metrics
from schemas.api import SelectReply, SelectRequest
from schemas.codec import decode

INTERVAL_MS = 100
FALL = 3
PREFIX = "benchfo"


class Clock:
    """Arrival times (this process's monotonic clock) of what the trial waits for."""

    def __init__(self) -> None:
        self.last_heartbeat = 0.0
        self.down_at = 0.0
        self.redirect_at = 0.0
        self.failback_at = 0.0
        self.changed = threading.Event()

    def on_heartbeat(self, _msg: Inbound) -> None:
        self.last_heartbeat = time.monotonic()

    def on_event(self, msg: Inbound) -> None:
        kind = msg.subject.rsplit(".events.", 1)[1]
        if kind == "gateway.down":
            self.down_at = time.monotonic()
        elif kind == "ha.failback":
            self.failback_at = time.monotonic()
        self.changed.set()

    def on_redirect(self, msg: Inbound) -> None:
        if msgspec.json.decode(msg.data).get("to") == "backup":
            self.redirect_at = time.monotonic()


def run_trials(trials: int) -> list[tuple[float, float, float]]:
    results: list[tuple[float, float, float]] = []
    with embedded_server() as (server, tmp):
        settings = bench_settings(
            server.url,
            PREFIX,
            tmp / "data",
            health={"heartbeat_interval_ms": INTERVAL_MS, "fall": FALL, "rise": 2},
            orchestrator={"load_balancing_strategy": "RegionAware"},
        )
        with running_orchestrator(settings):
            bus = Bus(server.url)
            bus.start()
            clock = Clock()
            bus.subscribe(f"{PREFIX}.gw.primary.heartbeat", clock.on_heartbeat)
            bus.subscribe(f"{PREFIX}.events.>", clock.on_event)
            bus.subscribe(f"{PREFIX}.redirect.primary", clock.on_redirect)
            idle = Metrics(cpu_percent=5, memory_percent=20, active_connections=1)
            primary = GatewayAgent(
                bus.nc,
                "primary",
                "r",
                prefix=PREFIX,
                metrics=lambda: idle,
                interval_s=INTERVAL_MS / 1000,
            )
            backup = GatewayAgent(
                bus.nc,
                "backup",
                "r",
                prefix=PREFIX,
                metrics=lambda: idle,
                interval_s=INTERVAL_MS / 1000,
                role="backup",
                backup_for="primary",
            )
            bus.run(primary.start())
            bus.run(backup.start())

            def selected() -> str | None:
                data = bus.ask(f"{PREFIX}.api.select-gateway", SelectRequest(region="r"), 2.0)
                return decode(data, SelectReply).gateway_id

            wait_for(lambda: selected() == "primary", 10, "primary selected")
            for _ in range(trials):
                clock.down_at = clock.redirect_at = clock.failback_at = 0.0
                primary.pause_heartbeats()
                wait_for(lambda: selected() == "backup", 5, "backup selected", poll=0.002)
                backup_at = time.monotonic()
                wait_for(lambda: clock.redirect_at > 0 and clock.down_at > 0, 5, "redirect")
                last = clock.last_heartbeat
                results.append((clock.down_at - last, clock.redirect_at - last, backup_at - last))
                primary.resume_heartbeats()
                wait_for(lambda: clock.failback_at > 0, 5, "failback")
                wait_for(lambda: selected() == "primary", 5, "primary again")
            bus.run(primary.stop())
            bus.run(backup.stop())
            bus.stop()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench failover", description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args(argv)
    results = run_trials(args.trials)
    bound = (FALL + 1) * INTERVAL_MS
    rows = []
    for name, index in (("down event", 0), ("redirect published", 1), ("backup selected", 2)):
        samples = [r[index] * 1000 for r in results]
        rows.append(
            [
                name,
                f"{percentile(samples, 50):.0f}",
                f"{max(samples):.0f}",
                f"{bound}",
                f"{max(samples) / bound:.2f}x",
            ]
        )
    print(machine_line())
    print_table(
        f"Failover at a {INTERVAL_MS} ms heartbeat, fall {FALL}: ms after the primary's "
        f"last heartbeat ({len(results)} trials; floor {(FALL + 0.5) * INTERVAL_MS:.0f} ms)",
        ["time to", "p50 ms", "max ms", "bound ms", "max/bound"],
        rows,
    )
