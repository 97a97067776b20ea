"""Fuzzing every inbound subject of a real orchestrator, then checking nothing broke.

    python -m bench fuzz [--messages 100000] [--seed N] [--bank-size 150]

An embedded nats-server and a gatefleet `Orchestrator` in this process (its log captured
at WARNING and above); the fuzz load in a spawned process (bench/fuzz_load.py) with its
own connections: heartbeats and goodbyes of valid shape with extreme values, wrong types,
deep nesting, huge strings, invalid UTF-8, NaN and Infinity tokens, empty and truncated
bodies, odd subject tokens; a request to every `P.api.*` endpoint (and to subjects nobody
serves); and fuzzed answers to every ping and config push gatefleet sends. The bodies are
Hypothesis's (bench/fuzz_bodies.py), seeded: the seed is printed, and `--seed` replays it.

Afterwards it waits until gatefleet is quiet, then checks and prints:

- every actor alive: no actor died or was restarted, no handler failed, every part of
  `status.health` is "ok";
- no unhandled exception: no log record at ERROR or above, none with a traceback, no
  "nats error" (a subscription callback that raised, a slow consumer), no exception
  escaping a thread;
- every drop counted: `status.malformed_messages`, cause by cause, equals the drops the
  load's oracle expects from what was delivered; the good heartbeats delivered equal
  those accepted plus those counted as replays; every fuzzed pong is counted by the
  prober (answered, bad or late), every fuzzed ack as an acked or nacked step or a drop;
- every API request answered: no timeout, no "no responders" on a served subject, no
  `internal` error;
- gateways that stop beating are detected down, whatever they sent before;
- a well-behaved gateway (GatewayAgent) registers and gets selected, and a client
  (GatefleetClient) sets the strategy and distributes to it as before.

Exit status 1 (via bench/__main__.py) when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pykka

from bench.common import spawn, wait_for
from bench.fuzz_bodies import BYE_POOL, EXTRA_POOL, HB_POOL, POOL
from bench.fuzz_load import LoadOptions, LoadResult, load_main
from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from gatefleet.gateway import GatewayAgent
from schemas.api import GatewaySnapshot, StatusReply
from schemas.events import DistributionEvent, decode_event
from schemas.settings import Settings

log = logging.getLogger("bench.fuzz")

CHECK_GATEWAY = "fz-check"
CHECK_REGION = "fuzz-check"


@dataclass
class FuzzOptions:
    messages: int = 100_000
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(2**32))
    bank_size: int = 150  # Hypothesis examples per field (and per extra)
    prefix: str = "fuzz"
    heartbeat_interval_ms: int = 1000
    probe_interval_ms: int = 250
    settle_timeout_s: float = 180.0
    audit_max_bytes: int = 256 * 1024 * 1024
    load_timeout_s: float = 3600.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class FuzzReport:
    options: FuzzOptions
    load: LoadResult
    checks: list[Check]
    status: StatusReply
    errors: list[str]  # log records that count as unhandled exceptions (the first few)
    warnings: Counter[str]  # WARNING records by logger
    events: Counter[str]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


# Capturing what the orchestrator logs ----------------------------------------------------


class ErrorLog(logging.Handler):
    """Counts WARNING records per logger; keeps ERROR+ ones, those with a traceback, and
    nats-py's error callbacks (a callback that raised, a slow consumer) as errors."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[str] = []
        self.error_count = 0
        self.warnings: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.levelno >= logging.ERROR or record.exc_info or "nats error" in text:
            self.error_count += 1
            if len(self.errors) < 10:
                self.errors.append(text[:500] + (" (with traceback)" if record.exc_info else ""))
        else:
            self.warnings[record.name] += 1

    def thread_died(self, args: threading.ExceptHookArgs) -> None:
        self.error_count += 1
        thread = args.thread.name if args.thread else "?"
        self.errors.append(
            f"exception in thread {thread}: {args.exc_type.__name__}: {args.exc_value}"
        )


@contextlib.contextmanager
def captured_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    old_level, old_hook = root.level, threading.excepthook
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.WARNING) if old_level else logging.WARNING)
    threading.excepthook = handler.thread_died
    try:
        yield handler
    finally:
        threading.excepthook = old_hook
        root.removeHandler(handler)
        root.setLevel(old_level)


class EventCounts:
    """Counts the events published under a prefix (a subscriber of its own)."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        self._lock = threading.Lock()
        self.types: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()  # distribution steps
        bus.subscribe(f"{prefix}.events.>", self._on_event)

    def _on_event(self, msg: Inbound) -> None:
        event = decode_event(msg.data)
        with self._lock:
            self.types[event.type] += 1
            if isinstance(event, DistributionEvent):
                self.steps[event.step] += 1

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self.types), Counter(self.steps)


# The run --------------------------------------------------------------------------------


def fuzz_settings(options: FuzzOptions, url: str, data_dir: Path) -> Settings:
    return msgspec.convert(
        {
            "bus": {"url": url, "subject_prefix": options.prefix, "data_dir": str(data_dir)},
            "health": {
                "heartbeat_interval_ms": options.heartbeat_interval_ms,
                "probe_interval_ms": options.probe_interval_ms,
                "probe_timeout_ms": options.probe_interval_ms,
            },
            "orchestrator": {
                "distribution_batch_size": 50,
                "distribution_retry_count": 1,
                "distribution_retry_delay_ms": 50,
                # Longer than any answer takes: a fuzzed ack is judged, never too late.
                "distribution_ack_timeout_ms": 20_000,
            },
            "load_balancing": {"random_seed": options.seed},
            "audit": {"max_bytes": options.audit_max_bytes},
        },
        Settings,
    )


def run_fuzz(options: FuzzOptions, url: str, data_dir: Path) -> FuzzReport:
    """The whole run against the nats-server at `url`; the orchestrator's store in
    `data_dir`. Returns the report (it raises only when the run itself cannot go on)."""
    started = time.monotonic()
    settings = fuzz_settings(options, url, data_dir)
    with captured_log() as errors:
        orchestrator = Orchestrator(settings)
        orchestrator.start()
        observer = Bus(url, name="fuzz-events", use_uvloop=False)
        observer.start()
        try:
            events = EventCounts(observer, options.prefix)
            load = _run_load(options, url)
            with GatefleetClient(url, prefix=options.prefix, timeout=10) as client:
                status = _settle(client, options.settle_timeout_s)
                types, steps = events.snapshot()
                gateways = {
                    g.gateway_id: g for page in client.gateway_pages() for g in page.gateways
                }
                checks = _checks(load, status, gateways, steps, errors)
                checks.append(_detected_down(client, options))
                checks.append(_well_behaved(client, url, options))
                checks.append(_actors_alive(client))
                checks.append(_no_exceptions(errors))
                types, _ = events.snapshot()
        finally:
            observer.stop()
            orchestrator.stop()
            pykka.ActorRegistry.stop_all(block=True, timeout=5)
    return FuzzReport(
        options=options,
        load=load,
        checks=checks,
        status=status,
        errors=list(errors.errors),
        warnings=errors.warnings,
        events=types,
        elapsed_s=time.monotonic() - started,
    )


def _run_load(options: FuzzOptions, url: str) -> LoadResult:
    ctx = spawn()
    out = ctx.Queue()
    load_options = LoadOptions(
        url=url,
        prefix=options.prefix,
        seed=options.seed,
        messages=options.messages,
        bank_size=options.bank_size,
    )
    process = ctx.Process(target=load_main, args=(load_options, out), name="fuzz-load")
    process.start()
    try:
        status, payload = out.get(timeout=options.load_timeout_s)
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"the fuzz load failed: {payload}")
    return msgspec.json.decode(payload, type=LoadResult)


def _settle(client: GatefleetClient, timeout_s: float) -> StatusReply:
    """Waits until no distribution is active and the drop counts stay put for a second."""
    deadline = time.monotonic() + timeout_s
    previous = None
    while True:
        status = client.status()
        now = (
            status.malformed_messages,
            status.probes.get("answered"),
            status.active_distributions,
        )
        if status.active_distributions == 0 and now == previous:
            return status
        if time.monotonic() > deadline:
            log.warning("gatefleet did not settle within %.0fs", timeout_s)
            return status
        previous = now
        time.sleep(1.0)


# Checks ---------------------------------------------------------------------------------


def _checks(
    load: LoadResult,
    status: StatusReply,
    gateways: dict[str, GatewaySnapshot],
    steps: Counter[str],
    errors: ErrorLog,
) -> list[Check]:
    checks = []
    counted = Counter({k: v for k, v in status.malformed_messages.items() if k != "replay"})
    expected = load.expected_drops()
    shed = status.shed.get("heartbeats", 0)
    differs = {
        cause: (counted.get(cause, 0), expected.get(cause, 0))
        for cause in set(counted) | set(expected)
        if counted.get(cause, 0) != expected.get(cause, 0)
    }
    checks.append(
        Check(
            "every drop counted",
            not differs,
            f"{sum(counted.values())} counted = {sum(expected.values())} expected"
            if not differs
            else f"(counted, expected) per cause differ: {differs}; shed heartbeats {shed}",
        )
    )

    tracked = (*HB_POOL, *EXTRA_POOL)
    delivered = sum(load.valid_heartbeats.get(g, 0) for g in tracked)
    accepted = sum(gateways[g].heartbeats for g in tracked if g in gateways)
    replays = status.malformed_messages.get("replay", 0)
    missing = delivered - accepted - replays - shed
    checks.append(
        Check(
            "every good heartbeat accounted for",
            missing == 0,
            f"{delivered} delivered = {accepted} accepted + {replays} replays + {shed} shed"
            + ("" if missing == 0 else f" + {missing} not counted anywhere"),
        )
    )

    probes = status.probes
    sent = load.sent.get("pong", 0)
    counted_pongs = probes.get("answered", 0) + probes.get("bad_answers", 0) + probes.get("late", 0)
    checks.append(
        Check(
            "every pong counted",
            counted_pongs == sent
            and probes.get("answered", 0) <= load.pongs.get("answered", 0)
            and probes.get("bad_answers", 0) <= load.pongs.get("bad", 0),
            f"{sent} sent ({load.pongs}); prober: answered {probes.get('answered', 0)}, "
            f"bad {probes.get('bad_answers', 0)}, late {probes.get('late', 0)}",
        )
    )

    acked, nacked = steps["gateway_acked"], steps["gateway_nacked"]
    want_acked, want_nacked = load.acks.get("ack", 0), load.acks.get("nack", 0)
    checks.append(
        Check(
            "every ack counted",
            (acked, nacked) == (want_acked, want_nacked) and load.undecodable_pushes == 0,
            f"{load.sent.get('ack', 0)} acks sent: {acked}/{want_acked} acked, "
            f"{nacked}/{want_nacked} nacked steps; the rest dropped (above); "
            f"{load.undecodable_pushes} pushes the fuzz could not decode",
        )
    )

    outcomes: Counter[str] = Counter()
    for per_endpoint in load.api.values():
        outcomes.update(per_endpoint)
    silent = outcomes["timeout"] + outcomes["no_responders"] + outcomes["undecodable reply"]
    checks.append(
        Check(
            "every API request answered",
            silent == 0 and outcomes["internal"] == 0,
            f"{sum(outcomes.values())} requests: {dict(outcomes)}",
        )
    )
    unserved = load.api_subject
    checks.append(
        Check(
            "unserved API subjects answered by the server",
            set(unserved) <= {"no_responders"},
            f"{dict(unserved)}",
        )
    )
    return checks


def _detected_down(client: GatefleetClient, options: FuzzOptions) -> Check:
    """Every fuzzed gateway has stopped beating: each must be down within (fall + 1)
    intervals, whatever its last heartbeat carried."""
    interval_s = options.heartbeat_interval_ms / 1000

    def fuzzed() -> dict[str, str]:
        return {
            g.gateway_id: g.status
            for page in client.gateway_pages()
            for g in page.gateways
            if g.gateway_id in POOL
        }

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: set(fuzzed().values()) <= {"down"}, 5 * interval_s + 10, "down", 0.2)
    statuses = fuzzed()
    up = {g: s for g, s in statuses.items() if s != "down"}
    left = [g for g in BYE_POOL if g not in statuses]
    return Check(
        "silent gateways detected down",
        not up,
        f"{len(statuses)} fuzzed gateways known, all down ({len(left)} bye gateways had left)"
        if not up
        else f"not down: {up}",
    )


def _well_behaved(client: GatefleetClient, url: str, options: FuzzOptions) -> Check:
    """A fresh GatewayAgent registers, is selected in its region, and takes a config."""
    bus = Bus(url, name="fuzz-check", use_uvloop=False)
    bus.start()
    agent = GatewayAgent(
        bus.nc,
        CHECK_GATEWAY,
        CHECK_REGION,
        prefix=options.prefix,
        interval_s=options.heartbeat_interval_ms / 1000 / 4,
    )
    try:
        bus.run(agent.start())

        def healthy() -> bool:
            page = client.gateways(region=CHECK_REGION)
            return any(
                g.gateway_id == CHECK_GATEWAY and g.status == "healthy" for g in page.gateways
            )

        wait_for(healthy, 15, "the well-behaved gateway healthy", 0.1)
        client.update_load_balancing_config("RegionAware", 50.0)
        chosen = client.select_optimal_gateway(CHECK_REGION).gateway_id
        created = client.distribute("FzCheck", {"check": True}, [CHECK_GATEWAY])
        wait_for(
            lambda: client.get_distribution(created.distribution_id).status == "completed",
            15,
            "the check distribution completed",
            0.1,
        )
    except Exception as exc:  # any failure here is the finding
        return Check("well-behaved gateway and client", False, f"{type(exc).__name__}: {exc}")
    finally:
        bus.run(agent.stop(goodbye=True))
        bus.stop()
    return Check(
        "well-behaved gateway and client",
        chosen == CHECK_GATEWAY,
        f"registered, selected ({chosen}), config distributed",
    )


def _actors_alive(client: GatefleetClient) -> Check:
    status = client.status()
    actors = pykka.ActorRegistry.get_all()
    dead = [str(ref) for ref in actors if not ref.is_alive()]
    handler_errors = sum(
        getattr(getattr(ref, "_actor", None), "handler_errors", 0) for ref in actors
    )
    not_ok = {part: state for part, state in status.health.items() if state != "ok"}
    ok = not dead and not not_ok and status.actor_restarts == 0 and handler_errors == 0
    return Check(
        "every actor alive",
        ok,
        f"{len(actors)} actors, restarts {status.actor_restarts}, handler errors "
        f"{handler_errors}, health {not_ok or 'ok'}" + (f", dead {dead}" if dead else ""),
    )


def _no_exceptions(errors: ErrorLog) -> Check:
    return Check(
        "no unhandled exception",
        errors.error_count == 0,
        f"{errors.error_count} error records"
        + (f", first: {errors.errors[:3]}" if errors.errors else ""),
    )


# Output ---------------------------------------------------------------------------------


def print_report(report: FuzzReport, out: Callable[[str], object] = print) -> None:
    load, options = report.load, report.options
    out(
        f"seed {options.seed} (replay: python -m bench fuzz --seed {options.seed} "
        f"--messages {options.messages} --bank-size {options.bank_size})"
    )
    out(
        f"{load.fuzz_messages} fuzzed messages in {load.elapsed_s:.0f}s "
        f"({load.oversize} drawn over max_payload, not sent; {load.keepalives} keepalive beats)"
    )
    out(f"  sent per family: {dict(sorted(load.sent.items()))}")
    out(
        f"  delivered to the gateway edge: {load.delivered_total}: {dict(sorted(load.delivered.items()))}"
    )
    out(f"  pongs: {load.pongs}; acks: {load.acks}")
    out(
        f"  unserved API subjects: {load.api_subject}; published without reply: {load.api_no_reply}"
    )
    for name, outcomes in sorted(load.api.items()):
        out(f"  P.api.{name}: {dict(sorted(outcomes.items()))}")
    out(f"  status.malformed_messages: {dict(sorted(report.status.malformed_messages.items()))}")
    out(f"  status.shed: {report.status.shed}; probes: {report.status.probes}")
    out(f"  events: {dict(sorted(report.events.items()))}")
    out(f"  warnings logged, by logger: {dict(report.warnings)}")
    out("protocol (docs) vs edge, per family:")
    for family, counts in sorted(load.judged.items()):
        out(f"  {family}: {dict(sorted(counts.items()))}")
    for kind, examples in sorted(load.examples.items()):
        out(f"  e.g. {kind}:")
        for example in examples:
            out(f"    {example[:300]}")
    out("checks:")
    for check in report.checks:
        out(f"  [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    if report.errors:
        out("error records:")
        for text in report.errors:
            out(f"  {text}")
    out(f"{'PASSED' if report.ok else 'FAILED'} in {report.elapsed_s:.0f}s")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench fuzz", description=__doc__.split("\n")[0]
    )
    defaults = FuzzOptions()
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--bank-size", type=int, default=defaults.bank_size)
    args = parser.parse_args(argv)
    options = FuzzOptions(messages=args.messages, seed=args.seed, bank_size=args.bank_size)
    print(f"fuzz seed {options.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gatefleet-fuzz-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats", port=0)
        server.start()
        try:
            report = run_fuzz(options, server.url, Path(tmp) / "store")
        finally:
            server.stop()
    print_report(report)
    if not report.ok:
        raise SystemExit(1)
