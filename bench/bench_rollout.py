"""Progressive delivery: how fast a failing canary halts a rollout, and how long an automatic
rollback of 1,000 gateways takes next to its lower bound.

    python -m bench rollout [--gateways 1000] [--batch 50] [--runs 5]

Runs an embedded nats-server, the orchestrator and `--gateways` GatewayAgents on one shared
connection, all in this process (one clock for the gateways and the event subscriber).
The canary heartbeats every 0.1 s (its health is measured), the others every 5 s (the
orchestrator's heartbeat interval is long enough that none goes stale).

- Canary nack -> halt: a rollout (canary 1, max_failures 0) whose canary rejects the push;
  from the moment the canary's handler rejects it to the moment this process receives the
  `halted` event. Next to it, the bare-NATS baselines measured in the same run: a publish
  to a subscriber on another connection, and a JetStream key-value put (the halt stores
  its progress before it says so).
- Unhealthy canary -> halt: the canary acks, then its heartbeats score it below the
  threshold inside its health gate; from its `gateway.status_changed` event to the
  `halted` event (both stamped by the orchestrator's clock).
- Rollback of every gateway: a rollout to the whole fleet (no canary, no gate, auto_rollback)
  whose last gateway rejects it; from the `rolling_back` event to the rolled back one's
  `finished`. The lower bound is (batches of the rollback) x (one ConfigPush round trip to
  one gateway, median of 50, measured in the same run).
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.bench_distribution import RTT_SAMPLES, ack_round_trip_s, wait_healthy
from bench.common import (
    bench_settings,
    embedded_server,
    machine_line,
    print_table,
    running_orchestrator,
)
from bus.runtime import Bus, Inbound
from gatefleet.client import GatefleetClient
from gatefleet.gateway import ConfigResult, GatewayAgent, Metrics
from schemas.api import Rollout
from schemas.events import (
    DistributionEvent,
    Event,
    FinishedStep,
    GatewayStatusChanged,
    RollingBackStep,
    decode_event,
)
from schemas.wire import ConfigPush

PREFIX = "bench"
HEALTHY = Metrics(cpu_percent=5.0, memory_percent=20.0, active_connections=10, latency_ms=5.0)
BUSY = Metrics(cpu_percent=95.0, memory_percent=95.0, active_connections=900, latency_ms=400.0)
CANARY_HEARTBEAT_S = 0.1
HEARTBEAT_S = 5.0


class Gateways:
    """The fleet: each gateway rejects a push whose content names it in "reject", and
    reports the metrics a test sets for it."""

    def __init__(self, bus: Bus, count: int) -> None:
        self.rejected_at: dict[int, float] = {}  # push version -> when it was rejected
        self.metrics: dict[str, Metrics] = {}
        self.agents = [self._agent(bus, f"gw-{n:04}", n == 0) for n in range(count)]

        async def start() -> None:
            for agent in self.agents:
                await agent.start(flush=False)
            await bus.nc.flush()

        bus.run(start(), timeout=120)

    def _agent(self, bus: Bus, gateway_id: str, canary: bool) -> GatewayAgent:
        def apply(push: ConfigPush) -> ConfigResult | None:
            if gateway_id in push.config_data.get("reject", ()):
                self.rejected_at[push.version] = time.perf_counter()
                return ConfigResult.reject("rejected by the benchmark")
            return None

        return GatewayAgent(
            bus.nc,
            gateway_id,
            "eu-west",
            prefix=PREFIX,
            interval_s=CANARY_HEARTBEAT_S if canary else HEARTBEAT_S,
            metrics=lambda: self.metrics.get(gateway_id, HEALTHY),
            on_config=apply,
        )

    def stop(self, bus: Bus) -> None:
        async def stop() -> None:
            for agent in self.agents:
                await agent.stop(goodbye=False, flush=False)

        bus.run(stop(), timeout=120)


class Events:
    """Every event, with when this process received it."""

    def __init__(self, bus: Bus) -> None:
        self._cond = threading.Condition()
        self.seen: list[tuple[float, Event]] = []
        bus.subscribe(f"{PREFIX}.events.>", self._on_event)

    def _on_event(self, msg: Inbound) -> None:
        event = decode_event(msg.data)
        with self._cond:
            self.seen.append((time.perf_counter(), event))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.seen)

    def wait(
        self, match: Callable[[Event], bool], timeout: float = 120.0, since: int = 0
    ) -> tuple[float, Event]:
        """The first event after `since` that matches, and when it was received."""
        with self._cond:
            found: list[tuple[float, Event]] = []

            def seen() -> bool:
                found[:] = [(t, e) for t, e in self.seen[since:] if match(e)][:1]
                return bool(found)

            if not self._cond.wait_for(seen, timeout):
                raise SystemExit(f"no matching event within {timeout:g}s")
            return found[0]


def step(dist_id: str, name: str) -> Callable[[Event], bool]:
    return lambda e: (
        isinstance(e, DistributionEvent) and e.distribution_id == dist_id and e.step == name
    )


def nats_one_way_s(url: str) -> float:
    """Median publish -> delivery time to a subscriber on another connection."""
    sender, receiver = Bus(url, name="bench-send"), Bus(url, name="bench-receive")
    sender.start()
    receiver.start()
    got = threading.Event()
    samples: list[float] = []
    sent = [0.0]

    def on_message(_msg: Inbound) -> None:
        samples.append(time.perf_counter() - sent[0])
        got.set()

    receiver.subscribe("bench.oneway", on_message)
    receiver.run(receiver.nc.flush())
    for _ in range(RTT_SAMPLES):
        got.clear()
        sent[0] = time.perf_counter()
        sender.publish("bench.oneway", b"{}")
        got.wait(5)
    sender.stop()
    receiver.stop()
    return statistics.median(samples)


def kv_put_s(bus: Bus) -> float:
    """Median JetStream key-value put (file storage, as the orchestrator's buckets)."""

    async def measure() -> list[float]:
        kv = await bus.js.create_key_value(bucket="bench_put")
        samples = []
        for n in range(RTT_SAMPLES):
            started = time.perf_counter()
            await kv.put("progress", b'{"status": "halted", "n": %d}' % n)
            samples.append(time.perf_counter() - started)
        return samples

    return statistics.median(bus.run(measure(), timeout=60))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(machine_line())

    with embedded_server() as (server, tmp):
        settings = bench_settings(
            server.url,
            PREFIX,
            tmp,
            orchestrator={"distribution_batch_size": args.batch},
            audit={"record_selections": False},
        )
        fleet_bus = Bus(server.url, name="bench-fleet")
        fleet_bus.start()
        try:
            with running_orchestrator(settings):
                gateways = Gateways(fleet_bus, args.gateways)
                events = Events(fleet_bus)
                with GatefleetClient(server.url, prefix=PREFIX, timeout=30) as client:
                    wait_healthy(client, args.gateways)
                    run_all(args, client, gateways, events, fleet_bus, server.url)
                gateways.stop(fleet_bus)
        finally:
            fleet_bus.stop()


def run_all(
    args: argparse.Namespace,
    client: GatefleetClient,
    gateways: Gateways,
    events: Events,
    bus: Bus,
    url: str,
) -> None:
    rtt = ack_round_trip_s(bus, gateways.agents[1].gateway_id)
    one_way, put = nats_one_way_s(url), kv_put_s(bus)
    first = client.distribute("Route", {"v": 1}).distribution_id  # the previous version
    events.wait(step(first, "finished"))
    canary = gateways.agents[0].gateway_id

    nack_halts = []
    for run in range(args.runs):
        content: dict[str, Any] = {"v": 2, "run": run, "reject": [canary]}
        rollout = Rollout(canary=1, max_failures=0)
        dist_id = client.distribute("Route", content, rollout=rollout).distribution_id
        received, event = events.wait(step(dist_id, "halted"))
        assert isinstance(event, DistributionEvent)
        nack_halts.append(received - gateways.rejected_at[event.version])

    unhealthy_halts = []
    for _ in range(min(args.runs, 3)):
        gate = Rollout(canary=1, health_gate_s=30.0, max_failures=0)
        dist_id = client.distribute("Route", {"v": 3}, rollout=gate).distribution_id
        events.wait(step(dist_id, "gate_started"))
        mark = events.mark()
        gateways.metrics[canary] = BUSY
        _, down = events.wait(
            lambda e: (
                isinstance(e, GatewayStatusChanged)
                and e.gateway_id == canary
                and e.new_status != "healthy"
            ),
            since=mark,
        )
        _, halted = events.wait(step(dist_id, "halted"))
        unhealthy_halts.append((halted.ts - down.ts).total_seconds())
        del gateways.metrics[canary]
        wait_healthy(client, args.gateways)

    last = gateways.agents[-1].gateway_id
    rollout = Rollout(max_failures=0, auto_rollback=True)
    whole = client.distribute("Route", {"v": 4, "reject": [last]}, rollout=rollout)
    started, rolling = events.wait(step(whole.distribution_id, "rolling_back"), timeout=300)
    assert isinstance(rolling, DistributionEvent)
    ended, final = events.wait(step(whole.distribution_id, "finished"), timeout=300)
    assert isinstance(final, DistributionEvent)
    match rolling.detail, final.detail:
        case RollingBackStep() as rollback, FinishedStep(status="rolled_back"):
            pass
        case _:
            raise SystemExit(f"the rollback ended {final.details}")
    created, _ = events.wait(step(rollback.rollback_id, "created"))
    done, _ = events.wait(step(rollback.rollback_id, "finished"))
    count = rollback.gateway_count
    batches = math.ceil(count / args.batch)
    elapsed, bound = ended - started, batches * rtt
    # The same fleet, a plain distribution (no rollout), for comparison.
    sent = time.perf_counter()
    plain = client.distribute("Route", {"v": 5}).distribution_id
    plain_done, _ = events.wait(step(plain, "finished"), timeout=300)

    print_table(
        f"Halting a rollout ({args.gateways} gateways; median of {args.runs} runs, min-max)",
        ["measure", "median", "min", "max"],
        [
            [
                "canary nack -> halted event",
                ms(statistics.median(nack_halts)),
                ms(min(nack_halts)),
                ms(max(nack_halts)),
            ],
            [
                "canary degraded -> halted (event times)",
                ms(statistics.median(unhealthy_halts)),
                ms(min(unhealthy_halts)),
                ms(max(unhealthy_halts)),
            ],
            ["bare NATS: publish -> subscriber", ms(one_way), "", ""],
            ["bare NATS: ConfigPush request -> ack", ms(rtt), "", ""],
            ["bare JetStream: key-value put", ms(put), "", ""],
        ],
    )
    print_table(
        f"Automatic rollback of {count} gateways in batches of {args.batch}",
        ["measure", "time"],
        [
            ["rolling_back -> rolled_back", ms(elapsed)],
            ["  of which the rollback's created -> finished", ms(done - created)],
            [f"lower bound: {batches} batches x {ms(rtt)} round trip", ms(bound)],
            ["ratio", f"{elapsed / bound:.1f}x"],
            [f"a plain distribution to all {args.gateways}, same run", ms(plain_done - sent)],
        ],
    )
