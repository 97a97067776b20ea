"""A simulated gateway fleet: `count` GatewayAgents on ONE shared NATS connection.

Gateways are named `sim-<region>-<n>` (n counts from 1 within each region) and dealt
round-robin over the regions. Within a region every `backup_every`-th gateway (n = 5,
10, ... by default; 0 turns this off) is a `backup` for the one just before it; the
rest are `primary`. Metrics are a random walk seeded per gateway from `seed`, so a run
is reproducible: cpu 5-95 % (drawn towards the connection load), memory 20-90 %,
connections 0..max_connections (500, 750 or 1000), latency 1-80 ms. Heartbeats are
spread over the interval instead of all firing at once.

Faults (`Faults`) pick an exact, seeded share of the gateways for each kind:
`stop_beating` (heartbeats stop after `after_s`, still connected), `crash` (gone after
`after_s`, no goodbye), `flap` (heartbeats paused and resumed every `flap_period_s`),
`slow_acks` (config acks after `slow_ack_s`), `fail_acks` (every push NACKed) and
`silent` (pushes never answered). With `recover_after_s`, stopped gateways beat again
and crashed ones restart (seq from 1) that long after the fault.

This module prints nothing; it logs one INFO line when the fleet is up and one when it
stops. `run_simulation` is the asyncio entry; `run_simulation_blocking` runs its own
loop in the calling thread until a `threading.Event` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bus.agent import GatewayAgent, Metrics, connect
from schemas.types import Role

log = logging.getLogger(__name__)

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_STOP_POLL_S = 0.1


@dataclass(frozen=True)
class Faults:
    """Shares (0-1) of the fleet given each fault; all zero means a healthy fleet."""

    stop_beating: float = 0.0
    crash: float = 0.0
    flap: float = 0.0
    slow_acks: float = 0.0
    fail_acks: float = 0.0
    silent: float = 0.0
    after_s: float = 10.0  # when stop_beating and crash strike, from the start
    recover_after_s: float | None = None  # stopped/crashed gateways come back this much later
    flap_period_s: float = 5.0
    slow_ack_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("stop_beating", "crash", "flap", "slow_acks", "fail_acks", "silent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fault share {name} must be within 0-1")
        if self.after_s < 0 or self.flap_period_s <= 0 or self.slow_ack_s < 0:
            raise ValueError("need after_s >= 0, flap_period_s > 0, slow_ack_s >= 0")

    def describe(self) -> str:
        shares = {
            "stop": self.stop_beating,
            "crash": self.crash,
            "flap": self.flap,
            "slow": self.slow_acks,
            "fail": self.fail_acks,
            "silent": self.silent,
        }
        active = [f"{name} {share:.0%}" for name, share in shares.items() if share > 0]
        return ", ".join(active) or "none"


@dataclass(frozen=True)
class GatewayPlan:
    gateway_id: str
    region: str
    role: Role
    backup_for: str | None
    max_connections: int


@dataclass
class SimulationSummary:
    gateways: int
    regions: list[str]
    backups: int
    faulty: dict[str, list[str]] = field(default_factory=dict)  # fault kind -> gateway ids
    heartbeats_sent: int = 0
    config_pushes: int = 0
    duration_s: float = 0.0


def region_token(region: str) -> str:
    """`region` made safe for a gateway id (`eu west` -> `eu-west`)."""
    return _ID_UNSAFE.sub("-", region).strip("-")[:40] or "region"


def plan_gateways(
    count: int, regions: Sequence[str], *, seed: int = 0, backup_every: int = 5
) -> list[GatewayPlan]:
    """Names, regions, roles and capacities of a simulated fleet (deterministic)."""
    if count < 0 or not regions:
        raise ValueError("need count >= 0 and at least one region")
    rng = random.Random(seed)
    per_region: dict[str, int] = {}
    plans: list[GatewayPlan] = []
    for i in range(count):
        region = regions[i % len(regions)]
        n = per_region[region] = per_region.get(region, 0) + 1
        name = f"sim-{region_token(region)}-{n}"
        is_backup = backup_every > 0 and n % backup_every == 0
        backup_for = f"sim-{region_token(region)}-{n - 1}" if is_backup else None
        capacity = rng.choice((500, 750, 1000))
        role: Role = "backup" if is_backup else "primary"
        plans.append(GatewayPlan(name, region, role, backup_for, capacity))
    return plans


def assign_faults(gateway_ids: Sequence[str], faults: Faults, seed: int) -> dict[str, list[str]]:
    """For each fault kind with a share > 0, exactly round(share * count) gateways."""
    rng = random.Random(f"faults:{seed}")
    chosen: dict[str, list[str]] = {}
    for kind in ("stop_beating", "crash", "flap", "slow_acks", "fail_acks", "silent"):
        share: float = getattr(faults, kind)
        if share > 0:
            chosen[kind] = sorted(rng.sample(list(gateway_ids), round(share * len(gateway_ids))))
    return chosen


class MetricsWalk:
    """A gateway's load as a bounded random walk; each call is one step."""

    def __init__(self, seed: int, gateway_id: str, max_connections: int) -> None:
        self._rng = random.Random(f"metrics:{seed}:{gateway_id}")
        self.max_connections = max_connections
        self.connections = self._rng.randint(0, max_connections // 2)
        self.cpu = self._rng.uniform(10.0, 60.0)
        self.memory = self._rng.uniform(30.0, 70.0)
        self.latency = self._rng.uniform(2.0, 30.0)

    def __call__(self) -> Metrics:
        rng, cap = self._rng, self.max_connections
        step = round(rng.gauss(0.0, cap * 0.03))
        self.connections = int(min(max(self.connections + step, 0), cap))
        target_cpu = 5.0 + 90.0 * self.connections / cap
        self.cpu = _bounded(self.cpu + 0.2 * (target_cpu - self.cpu) + rng.gauss(0, 3), 5, 95)
        self.memory = _bounded(self.memory + rng.gauss(0.0, 1.5), 20.0, 90.0)
        self.latency = _bounded(self.latency + rng.gauss(0.0, 2.0), 1.0, 80.0)
        return Metrics(
            cpu_percent=round(self.cpu, 1),
            memory_percent=round(self.memory, 1),
            active_connections=self.connections,
            latency_ms=round(self.latency, 2),
            max_connections=cap,
        )


def _bounded(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


async def run_simulation(
    url: str,
    count: int,
    regions: Sequence[str],
    *,
    prefix: str = "gatefleet",
    interval_s: float = 1.0,
    seed: int = 0,
    faults: Faults | None = None,
    duration_s: float | None = None,
    stop_event: asyncio.Event | None = None,
    backup_every: int = 5,
) -> SimulationSummary:
    """Runs the fleet until `stop_event` is set or `duration_s` passes, then says goodbye."""
    faults = faults or Faults()
    plans = plan_gateways(count, regions, seed=seed, backup_every=backup_every)
    chosen = assign_faults([p.gateway_id for p in plans], faults, seed)
    stagger = random.Random(f"stagger:{seed}")
    nc = await connect(url, name="gatefleet-simulator")
    agents: list[GatewayAgent] = []
    started = time.monotonic()
    try:
        for plan in plans:
            agent = GatewayAgent(
                nc,
                plan.gateway_id,
                plan.region,
                prefix=prefix,
                metrics=MetricsWalk(seed, plan.gateway_id, plan.max_connections),
                interval_s=interval_s,
                role=plan.role,
                backup_for=plan.backup_for,
                labels={"simulated": "true"},
            )
            _configure_acks(agent, chosen, faults)
            await agent.start(initial_delay_s=stagger.uniform(0, interval_s), flush=False)
            agents.append(agent)
        await nc.flush()
        summary = SimulationSummary(
            gateways=len(agents),
            regions=list(regions),
            backups=sum(p.role == "backup" for p in plans),
            faulty=chosen,
        )
        log.info(
            "simulating %d gateways in %d regions (%d backups) on %s, prefix %s, faults: %s",
            summary.gateways,
            len(regions),
            summary.backups,
            url,
            prefix,
            faults.describe(),
        )
        by_id = {a.gateway_id: a for a in agents}
        injector = asyncio.create_task(_inject_faults(by_id, chosen, faults))
        try:
            await _wait_until_stopped(stop_event, duration_s)
        finally:
            injector.cancel()
            await asyncio.gather(injector, return_exceptions=True)
    finally:
        # Crashed gateways are not running and stay silent; everyone else says goodbye.
        await asyncio.gather(*(a.stop(goodbye=True, flush=False) for a in agents))
        await nc.close()  # flushes what is buffered, goodbyes included
    summary.heartbeats_sent = sum(a.beats_sent for a in agents)
    summary.config_pushes = sum(len(a.received) for a in agents)
    summary.duration_s = time.monotonic() - started
    log.info(
        "simulation stopped after %.1fs: %d heartbeats, %d config pushes",
        summary.duration_s,
        summary.heartbeats_sent,
        summary.config_pushes,
    )
    return summary


def _configure_acks(agent: GatewayAgent, chosen: dict[str, list[str]], faults: Faults) -> None:
    gid = agent.gateway_id
    if gid in chosen.get("slow_acks", ()):
        agent.ack_delay_s = faults.slow_ack_s
    agent.fail_acks = gid in chosen.get("fail_acks", ())
    agent.silent_config = gid in chosen.get("silent", ())


async def _wait_until_stopped(stop_event: asyncio.Event | None, duration_s: float | None) -> None:
    event = stop_event or asyncio.Event()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), duration_s)


async def _inject_faults(
    agents: dict[str, GatewayAgent], chosen: dict[str, list[str]], faults: Faults
) -> None:
    """Runs the fault timeline: flapping throughout, stop/crash at after_s, then recovery."""
    flappers = [agents[g] for g in chosen.get("flap", ())]
    timeline = [asyncio.create_task(_flap(flappers, faults.flap_period_s))] if flappers else []
    timeline.append(asyncio.create_task(_strike(agents, chosen, faults)))
    try:
        await asyncio.gather(*timeline)
    finally:
        for task in timeline:
            task.cancel()
        await asyncio.gather(*timeline, return_exceptions=True)


async def _flap(agents: list[GatewayAgent], period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        for agent in agents:
            if agent.heartbeats_paused:
                agent.resume_heartbeats()
            else:
                agent.pause_heartbeats()


async def _strike(
    agents: dict[str, GatewayAgent], chosen: dict[str, list[str]], faults: Faults
) -> None:
    stoppers = [agents[g] for g in chosen.get("stop_beating", ())]
    crashers = [agents[g] for g in chosen.get("crash", ())]
    if not stoppers and not crashers:
        return
    await asyncio.sleep(faults.after_s)
    for agent in stoppers:
        agent.pause_heartbeats()
    await asyncio.gather(*(a.crash() for a in crashers))
    log.info("faults: %d gateways stopped beating, %d crashed", len(stoppers), len(crashers))
    if faults.recover_after_s is None:
        return
    await asyncio.sleep(faults.recover_after_s)
    for agent in stoppers:
        agent.resume_heartbeats()
    await asyncio.gather(*(a.restart() for a in crashers))
    log.info("faults: %d gateways recovered", len(stoppers) + len(crashers))


def run_simulation_blocking(
    url: str,
    count: int,
    regions: Sequence[str],
    *,
    stop: threading.Event,
    prefix: str = "gatefleet",
    interval_s: float = 1.0,
    seed: int = 0,
    faults: Faults | None = None,
    duration_s: float | None = None,
    backup_every: int = 5,
) -> SimulationSummary:
    """`run_simulation` on a fresh event loop in this thread, until `stop` is set.

    On the main thread SIGINT and SIGTERM also stop it (cleanly, with goodbyes).
    """

    async def main() -> SimulationSummary:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop_event.set)
        watcher = asyncio.create_task(_watch(stop, stop_event))
        try:
            return await run_simulation(
                url,
                count,
                regions,
                prefix=prefix,
                interval_s=interval_s,
                seed=seed,
                faults=faults,
                duration_s=duration_s,
                stop_event=stop_event,
                backup_every=backup_every,
            )
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if on_main:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return asyncio.run(main())


async def _watch(stop: threading.Event, stop_event: asyncio.Event) -> None:
    while not stop.is_set():  # noqa: ASYNC110 - a threading.Event cannot be awaited: poll it
        await asyncio.sleep(_STOP_POLL_S)
    stop_event.set()
