"""How long one distribution to 1,000 simulated gateways takes, next to its lower bound.

    python bench/bench_distribution.py [--gateways 1000] [--batch 50]

Runs an embedded nats-server, the orchestrator and `--gateways` GatewayAgents on one shared
connection, all in this process. The lower bound is (number of batches) x (one ConfigPush
round trip to one gateway, median of 50, measured in the same run): what a distribution
would take if storing records, events and actor hops cost nothing. Prints both and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from gatefleet.gateway import GatewayAgent
from schemas.events import DistributionEvent, decode_event
from schemas.settings import Settings
from schemas.wire import ConfigPush

PREFIX = "bench"
CONFIG = {"routes": [{"path": f"/svc-{n}", "upstream": f"svc-{n}"} for n in range(20)]}
RTT_SAMPLES = 50


def start_agents(bus: Bus, count: int) -> list[GatewayAgent]:
    agents = [GatewayAgent(bus.nc, f"gw-{n:04}", "eu-west", prefix=PREFIX) for n in range(count)]

    async def start() -> None:
        for agent in agents:
            await agent.start(flush=False)
        await bus.nc.flush()

    bus.run(start(), timeout=60)
    return agents


async def stop_agents(agents: list[GatewayAgent]) -> None:
    await asyncio.gather(*(a.stop(goodbye=False, flush=False) for a in agents))


def ack_round_trip_s(bus: Bus, gateway_id: str) -> float:
    """Median time of one ConfigPush request and its ack, from this process."""
    push = ConfigPush(
        distribution_id="dist-rtt", config_type="Bench", version=1, config_data=CONFIG
    )
    subject = Subjects(PREFIX).config(gateway_id)
    samples = []
    for _ in range(RTT_SAMPLES):
        started = time.perf_counter()
        bus.ask(subject, push, timeout=5)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def wait_healthy(client: GatefleetClient, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.status().gateways_healthy < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the fleet did not become healthy within {timeout_s:g}s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "nats", port=0)
        server.start()
        settings = msgspec.convert(
            {
                "bus": {"url": server.url, "subject_prefix": PREFIX, "data_dir": tmp},
                "health": {"probe_interval_ms": 0},
                "orchestrator": {"distribution_batch_size": args.batch},
                "audit": {"record_selections": False},
            },
            Settings,
        )
        fleet_bus = Bus(server.url, name="bench-fleet")
        fleet_bus.start()
        orchestrator = Orchestrator(settings)
        try:
            orchestrator.start()
            agents = start_agents(fleet_bus, args.gateways)
            with GatefleetClient(server.url, prefix=PREFIX, timeout=30) as client:
                wait_healthy(client, args.gateways)
                rtt = ack_round_trip_s(fleet_bus, agents[0].gateway_id)
                elapsed = timed_distribution(fleet_bus, client)
            batches = -(-args.gateways // args.batch)
            bound = batches * rtt
            print(
                f"{args.gateways} gateways in {batches} batches of {args.batch}: "
                f"{elapsed * 1000:.0f} ms; lower bound {batches} x {rtt * 1000:.2f} ms = "
                f"{bound * 1000:.0f} ms; ratio {elapsed / bound:.1f}"
            )
            fleet_bus.run(stop_agents(agents), timeout=60)
        finally:
            orchestrator.stop()
            fleet_bus.stop()
            server.stop()


def timed_distribution(bus: Bus, client: GatefleetClient) -> float:
    """Seconds from the distribute request to its `finished` event; all must ack."""
    finished: set[str] = set()
    changed = threading.Condition()

    def on_event(msg: Inbound) -> None:
        event = decode_event(msg.data)
        if isinstance(event, DistributionEvent) and event.step == "finished":
            with changed:
                finished.add(event.distribution_id)
                changed.notify_all()

    bus.subscribe(f"{PREFIX}.events.>", on_event)
    started = time.perf_counter()
    dist_id = client.distribute("Route", CONFIG).distribution_id
    with changed:
        if not changed.wait_for(lambda: dist_id in finished, timeout=120):
            raise SystemExit("the distribution did not finish within 120 s")
    elapsed = time.perf_counter() - started
    record = client.get_distribution(dist_id)
    if record.status != "completed":
        raise SystemExit(f"distribution ended {record.status}: {record.reason}")
    return elapsed


if __name__ == "__main__":
    main()
