"""Take-over: the leading gatefleet replica SIGKILLed again and again (issue 16).

    python -m bench takeover [--kills 20] [--lease-ms 10000[,2000]] [--gateways 50]
                             [--rate 100] [--seed N] [--keep DIR]

Per `--lease-ms` value (one row each, on fresh processes), everything as an operator
would run it, each in its own process:

- a three-node nats-server cluster (tests/cluster.py: the bundled binary, routes on
  loopback ports, JetStream on disk), gatefleet's stream and buckets replicated on all
  three (`[bus] replicas = 3`);
- two replicas, `gatefleet up --config FILE` with `[cluster] replica_id` "a" and "b" and
  `[cluster] lease_ms` (default 10000, as shipped); every other setting is the default;
- the fleet, `gatefleet simulate --count N` (1 s heartbeats);
- a client process asking `P.api.select-gateway` `--rate` times a second, each with a
  1 s timeout, recording every outcome.

`--kills` times: once one replica leads and the other stands by knowing it (and a seeded
0.5-2 s more, so that the kill falls anywhere between two renewals), the leader is
SIGKILLed. The take-over time runs from the kill until the standby reports role
`leader`, polled with `$SRV.PING` (GatefleetClient.replicas, each poll waiting 0.1 s for
answers: the figure is up to that much late), and, exactly, until the time of its own
`orchestrator.leader` event. Then the killed replica is started again (same id) and
becomes the new standby.

Figures: take-over time p50 / p99 / max next to lease_ms (the aim: within lease_ms +
1 s); selections that failed during each take-over (from the kill to the new leader) and
over the whole run; polls that found two leaders (there must be none). Exit status 1
when a take-over did not happen or two leaders were seen.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine_line, percentile, print_table, spawn, workdir
from bus.runtime import Bus, Inbound
from gatefleet.client import GatefleetClient, GatefleetError
from schemas.events import OrchestratorLeader, decode_event
from tests.cluster import NatsCluster

REPO = Path(__file__).resolve().parent.parent
PREFIX = "takeover"
REPLICAS = ("a", "b")
POLL_WAIT_S = 0.1  # how long each $SRV.PING poll waits for the replicas' answers
SELECT_TIMEOUT_S = 1.0
READY_TIMEOUT_S = 60.0


@dataclass
class Options:
    kills: int = 20
    lease_ms: int = 10_000
    gateways: int = 50
    rate: float = 100.0  # selections per second
    seed: int = 1234


@dataclass
class Takeover:
    killed: str
    polled_s: float  # from the kill until the standby answered as leader
    event_s: float | None  # until the time of its orchestrator.leader event
    failed: int  # selections sent in that window that failed
    sent: int  # selections sent in that window


@dataclass
class Run:
    options: Options
    takeovers: list[Takeover] = field(default_factory=list)
    two_leaders: int = 0  # polls that found two replicas answering as leader
    selections: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # by error code
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after


# The processes ---------------------------------------------------------------------------


class Replicas:
    """The two `gatefleet up` processes (this repository's code), logs in `workdir`."""

    def __init__(self, workdir: Path, url: str, lease_ms: int) -> None:
        self.workdir = workdir
        self.url = url
        self.lease_ms = lease_ms
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def config(self, replica_id: str) -> Path:
        directory = self.workdir / replica_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "gatefleet.toml"
        path.write_text(
            f'[bus]\nurl = "{self.url}"\nreplicas = 3\nsubject_prefix = "{PREFIX}"\n'
            f'data_dir = "{directory}"\n'
            f"[audit]\nmax_bytes = {64 * 1024 * 1024}\n"
            f'[cluster]\nreplica_id = "{replica_id}"\nlease_ms = {self.lease_ms}\n'
        )
        return path

    def start(self, replica_id: str) -> None:
        self.processes[replica_id] = _spawn(
            self.workdir / f"{replica_id}.log",
            "up", "--config", str(self.config(replica_id)), "--log-level", "WARNING",
        )  # fmt: skip

    def kill(self, replica_id: str) -> None:
        process = self.processes.pop(replica_id)
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def stop(self) -> None:
        _stop(self.processes.values())
        self.processes.clear()


def _spawn(log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gatefleet", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _stop(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL what has not ended 20 s later."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def select_loop(url: str, rate: float, stop: Any, out: Any) -> None:
    """The client process: `select-gateway` at `rate` per second until `stop` is set;
    puts [(sent at, answered at, "ok" or failure_kind)] (monotonic clock, the same in
    every process) on `out`."""
    outcomes: list[tuple[float, float, str]] = []
    with GatefleetClient(url, prefix=PREFIX, timeout=SELECT_TIMEOUT_S) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                client.select_optimal_gateway()
                outcome = "ok"
            except GatefleetError as exc:
                outcome = failure_kind(exc)
            outcomes.append((sent, time.monotonic(), outcome))
            next_at = max(next_at + 1 / rate, time.monotonic() - 1)  # no burst to catch up
            time.sleep(max(0.0, next_at - time.monotonic()))
    out.put(outcomes)


def failure_kind(exc: GatefleetError) -> str:
    """ "timeout" (no answer: say, the request went to the killed replica), "no
    responders", else the error reply's code."""
    text = str(exc)
    if text.startswith("no answer on"):
        return "timeout"
    if text.startswith("nobody answers on"):
        return "no responders"
    return exc.code


class LeaderEvents:
    """Every `orchestrator.leader` event as published: (replica, role, its time)."""

    def __init__(self, url: str) -> None:
        self.seen: list[tuple[str, str, float]] = []
        self.bus = Bus(url, name="takeover-events", use_uvloop=False)
        self.bus.start()
        self.bus.subscribe(f"{PREFIX}.events.orchestrator.leader", self._on_event)

    def _on_event(self, msg: Inbound) -> None:
        event = decode_event(msg.data)
        if isinstance(event, OrchestratorLeader):
            self.seen.append((event.replica_id, event.role, event.ts.timestamp()))

    def took_over(self, replica_id: str, since_wall: float) -> float | None:
        """When `replica_id` reported leading, first after `since_wall` (Unix time)."""
        return next(
            (
                at
                for r, role, at in self.seen
                if r == replica_id and role == "leader" and at >= since_wall
            ),
            None,
        )

    def close(self) -> None:
        self.bus.stop()


# The run ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.run = Run(options)
        # Each take-over's window (monotonic clock): from the kill to the new leader.
        self._windows: list[tuple[float, float]] = []

    def go(self) -> Run:
        self.run.load = (os.getloadavg()[0], 0.0)
        cluster = NatsCluster(self.workdir / "cluster")
        cluster.start()
        replicas = Replicas(self.workdir, cluster.url, self.options.lease_ms)
        simulator: subprocess.Popen[bytes] | None = None
        ctx = spawn()
        stop, results = ctx.Event(), ctx.Queue()
        selector = ctx.Process(
            target=select_loop, args=(cluster.url, self.options.rate, stop, results)
        )
        events = LeaderEvents(cluster.url)
        try:
            with GatefleetClient(cluster.url, prefix=PREFIX) as client:
                for replica_id in REPLICAS:  # "a" first: it takes the fresh lease
                    replicas.start(replica_id)
                    self._pair(client, wanted=REPLICAS.index(replica_id) + 1)
                simulator = _spawn(
                    self.workdir / "simulator.log",
                    "simulate", "--count", str(self.options.gateways), "--nats", cluster.url,
                    "--config", str(replicas.config("a")), "--seed", str(self.options.seed),
                )  # fmt: skip
                self._fleet(client)
                selector.start()
                for _ in range(self.options.kills):
                    self._kill_once(client, replicas, events)
            stop.set()
            outcomes = results.get(timeout=30)
            selector.join(10)
        finally:
            stop.set()
            if selector.is_alive():
                selector.kill()
            events.close()
            replicas.stop()
            if simulator is not None:
                _stop([simulator])
            cluster.stop()
        self._count(outcomes)
        self.run.load = (self.run.load[0], os.getloadavg()[0])
        return self.run

    def _pair(self, client: GatefleetClient, wanted: int = 2) -> tuple[str, str | None]:
        """Waits until `wanted` replicas answer, one leading and any other standing by
        knowing it: (leader, standby)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(GatefleetError):
                found = client.replicas(POLL_WAIT_S)
                leaders = [r.replica_id for r in found if r.role == "leader"]
                standbys = [r for r in found if r.role == "standby"]
                known = len(leaders) == 1 and all(r.leader == leaders[0] for r in standbys)
                if len(found) == wanted and known:
                    return leaders[0], standbys[0].replica_id if standbys else None
            time.sleep(0.05)
        raise RuntimeError(f"no leader and standby within {READY_TIMEOUT_S:g}s: see {self.workdir}")

    def _fleet(self, client: GatefleetClient) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(GatefleetError):
                if client.status().gateways_managed >= self.options.gateways:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the {self.options.gateways} gateways did not register in time")

    def _kill_once(self, client: GatefleetClient, replicas: Replicas, events: LeaderEvents) -> None:
        leader, standby = self._pair(client)
        assert standby is not None
        time.sleep(self.rng.uniform(0.5, 2.0))
        killed_wall, killed = time.time(), time.monotonic()
        replicas.kill(leader)
        limit = 3 * self.options.lease_ms / 1000 + 30
        while True:
            with contextlib.suppress(GatefleetError):
                roles = {r.replica_id: r.role for r in client.replicas(POLL_WAIT_S)}
                self.run.two_leaders += list(roles.values()).count("leader") > 1
                if roles.get(standby) == "leader":
                    break
            if time.monotonic() - killed > limit:
                raise RuntimeError(f"{standby} did not take over within {limit:g}s")
        led = time.monotonic()
        event_at = events.took_over(standby, killed_wall)
        self.run.takeovers.append(
            Takeover(
                killed=leader,
                polled_s=led - killed,
                event_s=None if event_at is None else event_at - killed_wall,
                failed=0,
                sent=0,
            )
        )
        self._windows.append((killed, led))
        replicas.start(leader)  # the new standby

    def _count(self, outcomes: list[tuple[float, float, str]]) -> None:
        run = self.run
        run.selections = len(outcomes)
        run.failures = Counter(outcome for _, _, outcome in outcomes if outcome != "ok")
        for takeover, (start, end) in zip(run.takeovers, self._windows, strict=True):
            during = [o for sent, _, o in outcomes if start <= sent <= end]
            takeover.sent = len(during)
            takeover.failed = sum(o != "ok" for o in during)


# Output ----------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f}s"


def report(runs: Sequence[Run]) -> None:
    print(f"machine: {machine_line()}")
    rows = []
    for run in runs:
        polled = [t.polled_s for t in run.takeovers]
        exact = [t.event_s for t in run.takeovers if t.event_s is not None]
        during = sum(t.failed for t in run.takeovers)
        lease_s = run.options.lease_ms / 1000
        rows.append(
            [
                f"{run.options.lease_ms}",
                f"{len(run.takeovers)}",
                fmt_s(percentile(polled, 50)),
                fmt_s(percentile(polled, 99)),
                f"{min(polled):.2f}-{max(polled):.2f}s",
                fmt_s(percentile(exact, 50)) if exact else "n/a",
                fmt_s(percentile(exact, 99)) if exact else "n/a",
                "yes" if max(polled) <= lease_s + 1 else "NO",
                f"{during} of {sum(t.sent for t in run.takeovers)}",
                f"{max((t.failed for t in run.takeovers), default=0)}",
                f"{sum(run.failures.values())} of {run.selections}",
                f"{run.two_leaders}",
                f"{run.load[0]:.1f} / {run.load[1]:.1f}",
            ]
        )
    print_table(
        "take-over after SIGKILL of the leading replica (3-node NATS cluster, R3)",
        [
            "lease_ms",
            "kills",
            "p50",
            "p99",
            "min-max",
            "event p50",
            "event p99",
            "<= lease+1s",
            "sel. failed in take-overs",
            "worst one",
            "sel. failed in all",
            "two leaders",
            "load before / after",
        ],
        rows,
    )
    for run in runs:
        per_kill = " ".join(f"{t.polled_s:.1f}" for t in run.takeovers)
        print(f"lease_ms {run.options.lease_ms}: take-overs (s, polled) {per_kill}")
        if run.failures:
            print(f"  failed selections by kind: {dict(run.failures)}")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench takeover", description=__doc__.split("\n")[0]
    )
    defaults = Options()
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument(
        "--lease-ms",
        default=str(defaults.lease_ms),
        help="[cluster] lease_ms; several, comma-separated: a row each",
    )
    parser.add_argument("--gateways", type=int, default=defaults.gateways)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="selections/s")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--keep", help="keep the logs and stores in this directory")
    args = parser.parse_args(argv)
    runs = []
    for lease_ms in (int(value) for value in args.lease_ms.split(",")):
        options = Options(
            kills=args.kills,
            lease_ms=lease_ms,
            gateways=args.gateways,
            rate=args.rate,
            seed=args.seed,
        )
        print(f"lease_ms {lease_ms}: {options.kills} kills of the leader ...", flush=True)
        keep = args.keep and f"{args.keep}/lease-{lease_ms}"
        with workdir(keep, "gatefleet-takeover-") as path:
            runs.append(Bench(options, path).go())
    report(runs)
    if any(run.two_leaders or len(run.takeovers) < run.options.kills for run in runs):
        raise SystemExit(1)
