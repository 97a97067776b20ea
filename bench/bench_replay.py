"""Reading the audit log back: `gatefleet audit --json` next to a bare ordered-consumer
read; `gatefleet audit replay` re-running recorded selections; and the audit's write load
next to what the store sustains.

    python -m bench replay [--events 100000] [--rounds 3] [--selections 100000]
                           [--write-gateways 10000]

One embedded nats-server holds a `GATEFLEET_EVENTS` stream of `--events` events, a mix
like a busy fleet's (60% selections with three candidates each, 25% status changes, 15%
distribution steps). Then, in rounds, in the same run:

- `bare`: nats-py alone in this process: an ordered consumer (`js.subscribe(...,
  ordered_consumer=True)`) on `gatefleet.events.>` counting messages until the last one;
  the baseline the aim is stated against;
- `audit --json`: the real command in a subprocess, stdout read through a pipe (each line
  counted). End to end includes starting Python and connecting; `net` takes off the time
  the same command needs for an empty replay (`--type ha.alarm`), measured alongside;
- `audit --json --gateway g-0001`: every event decoded and filtered (the slow path);
- `audit` (table): decoded and formatted, for reference.

Aim: `audit --json` net at least half the bare rate. The figures are the best of the rounds.

Selections (issue 15). A load balancer (the product's `Balancer` and `SelectionLog`, on a
simulated clock, no NATS) records a fleet's life: 1,000 gateways beating at 1 Hz (each
heartbeat changes their connections and latency), `--selections` selections at 1,000/s,
LeastConnections then WeightedRandom. Its events are stored, and `gatefleet audit replay
--json` (a subprocess, end to end) must reproduce every selection within 10 s (aim).

Write load. The same at `--write-gateways` (10,000) gateways for 10 simulated seconds at
1,000 selections/s: the messages and bytes per second the audit writes, next to what the
store sustains when the event outbox stores those very messages as fast as it can (the
embedded server, `sync_interval: always`). Aim: under half of it, in messages and bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from actors.balancer import Balancer, selection_rules
from actors.selection_log import SelectionLog, selection_event
from bench.common import (
    embedded_server,
    fmt_rate,
    fmt_ratio,
    machine_line,
    print_table,
    safe_div,
    wait_for,
)
from bus.jetstream import JetStream, stream_name
from bus.outbox import EventOutbox
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.api import GatewaySnapshot, LoadBalancingConfig, SelectRequest
from schemas.codec import encode
from schemas.events import (
    CandidateView,
    DistributionEvent,
    Event,
    GatewaySelected,
    GatewayStatusChanged,
    new_event_id,
)
from schemas.settings import Settings

PREFIX = "gatefleet"
SEED = 1234
PUBLISH_CHUNK = 5_000
# The command under test: the registered `gatefleet audit` once the CLI has it, else the
# group itself (same code, same process shape).
AUDIT_FALLBACK = "from gatefleet.audit import audit; audit(prog_name='gatefleet audit')"


# The stream -------------------------------------------------------------------------------


def make_events(count: int) -> list[Event]:
    rng = random.Random(SEED)
    start = datetime.now(UTC) - timedelta(hours=1)
    gateways = [f"g-{n:04}" for n in range(200)]
    events: list[Event] = []
    for n in range(count):
        ts = start + timedelta(milliseconds=n)
        roll = rng.random()
        if roll < 0.60:
            picks = rng.sample(gateways, 3)
            candidates = [
                CandidateView(
                    gateway_id=g,
                    region="eu-west",
                    score=round(rng.uniform(70, 100), 1),
                    measure=round(rng.uniform(0, 1), 3),
                    cpu_percent=round(rng.uniform(0, 60), 1),
                    memory_percent=round(rng.uniform(0, 60), 1),
                    active_connections=rng.randrange(1000),
                    max_connections=1000,
                    latency_ms=round(rng.uniform(1, 20), 1),
                )
                for g in picks
            ]
            events.append(
                GatewaySelected(
                    region="eu-west",
                    client_id=None,
                    strategy="LeastConnections",
                    threshold=70.0,
                    gateway_id=picks[0],
                    reason="LeastConnections over 3 eligible gateways: lowest load 0.120",
                    candidates=candidates,
                    excluded={rng.choice(gateways): "status down"},
                    ts=ts,
                )
            )
        elif roll < 0.85:
            events.append(
                GatewayStatusChanged(
                    gateway_id=rng.choice(gateways),
                    old_status="healthy",
                    new_status="degraded",
                    score=61.5,
                    reason="score 61.5 below 70 (heartbeat)",
                    ts=ts,
                )
            )
        else:
            events.append(
                DistributionEvent(
                    distribution_id=f"dist-{n // 50:08}",
                    config_type="Route",
                    version=n // 50 + 1,
                    step="gateway_acked",
                    gateway_id=rng.choice(gateways),
                    details={"attempts": 1},
                    ts=ts,
                )
            )
    return events


def fill_stream(bus: Bus, events: list[Event]) -> int:
    """Publishes every event (each with its Nats-Msg-Id) and waits until all are stored;
    returns the stream's size in bytes."""
    subjects = Subjects(PREFIX)
    JetStream(bus, subjects).setup(max_age_s=0, max_bytes=-1)
    messages = [(subjects.event(e.type), encode(e), {"Nats-Msg-Id": e.id}) for e in events]

    async def publish() -> None:
        js = bus.js
        for start in range(0, len(messages), PUBLISH_CHUNK):
            for subject, data, headers in messages[start : start + PUBLISH_CHUNK]:
                await js.publish_async(subject, data, headers=headers)
            await js.publish_async_completed()

    bus.run(publish(), timeout=600)
    info = bus.run(bus.js.stream_info(stream_name(PREFIX)))
    if info.state.messages != len(events):
        raise RuntimeError(f"stored {info.state.messages} of {len(events)} events")
    return int(info.state.bytes)


# Recorded selections ------------------------------------------------------------------------

TICK_S = 0.01  # simulated time step
FLUSH_EVERY = 10  # ticks: the load balancer's 100 ms batch timer


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Recorded:
    """What a load balancer recorded: (simulated second emitted, event), in order."""

    events: list[tuple[float, Event]]
    selections: int
    seconds: float
    one_selection_bytes: int  # an lb.selected event, as recorded before batches


def _beat(rng: random.Random, n: int, seq: int) -> GatewaySnapshot:
    connections = rng.randrange(0, 800)
    latency = round(rng.uniform(1, 20), 2)
    cpu = round(rng.uniform(5, 60), 1)
    return GatewaySnapshot(
        gateway_id=f"g-{n:05}",
        region=("eu-west", "us-east")[n % 2],
        status="healthy",
        score=round(100 - cpu / 2 - latency / 4, 2),
        cpu_percent=cpu,
        memory_percent=round(rng.uniform(20, 60), 1),
        active_connections=connections,
        max_connections=1000,
        reported_latency_ms=latency,
        last_seq=seq,
    )


def record_fleet(gateways: int, selections: int, rate: float = 1000.0) -> Recorded:
    """A load balancer's record of `selections` at `rate`/s, `gateways` beating at 1 Hz
    (LeastConnections for the first half, then WeightedRandom)."""
    rng = random.Random(SEED)
    clock = SimClock()
    settings = msgspec.convert({"load_balancing": {"random_seed": SEED}}, Settings)
    config = LoadBalancingConfig(strategy="LeastConnections", health_threshold=50.0)
    events: list[tuple[float, Event]] = []
    log = SelectionLog(
        lambda event: events.append((clock.now, event)),
        rules=selection_rules(settings),
        config=config,
        events_lost=lambda: 0,
        schedule_flush=lambda _delay: None,
        clock=clock,
    )
    lb = Balancer(settings, config, log=log, clock=clock)
    seqs = [1] * gateways
    for n in range(gateways):
        lb.update(_beat(rng, n, 1))
    beats_per_tick, picks_per_tick = gateways * TICK_S, rate * TICK_S
    owed_beats = owed_picks = 0.0
    made = beat = ticks = 0
    one_selection_bytes = 0
    while made < selections:
        clock.now += TICK_S
        ticks += 1
        owed_beats += beats_per_tick
        while owed_beats >= 1:
            n = beat % gateways
            seqs[n] += 1
            lb.update(_beat(rng, n, seqs[n]))
            beat, owed_beats = beat + 1, owed_beats - 1
        owed_picks += picks_per_tick
        while owed_picks >= 1 and made < selections:
            if made == selections // 2:
                lb.set_config(LoadBalancingConfig(strategy="WeightedRandom", health_threshold=50.0))
            choice = lb.choose(SelectRequest(client_id=f"c-{rng.randrange(5000)}"))
            if not one_selection_bytes:
                old = selection_event("evt", choice.request, choice.selection, lb.pool, lb.config)
                one_selection_bytes = len(encode(old))
            lb.commit(choice)
            made, owed_picks = made + 1, owed_picks - 1
        if ticks % FLUSH_EVERY == 0:
            log.flush()
    log.flush()
    return Recorded(events, made, clock.now, one_selection_bytes)


def store_all(bus: Bus, events: list[Event]) -> float:
    """Stores `events` through the event outbox, as fast as it can: seconds until all
    are acked."""
    subjects = Subjects(PREFIX)
    JetStream(bus, subjects).setup(max_age_s=0, max_bytes=-1)
    box = EventOutbox(bus, subjects, retry_for_s=30.0)
    box.start()
    started = time.perf_counter()
    for event in events:
        box.emit(event)
    wait_for(lambda: box.acked >= len(events), 600, "audit events stored", poll=0.002)
    elapsed = time.perf_counter() - started
    if box.lost or box.failed:
        raise RuntimeError(f"outbox: {box.lost} lost, {box.failed} sends failed")
    box.close()
    return elapsed


def run_command(url: str, *args: str) -> tuple[float, bytes]:
    """`gatefleet audit ARGS` end to end: (seconds, stdout)."""
    command = [*audit_command(), "--nats", url, *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')}")
    return elapsed, done.stdout


def bench_replay_selections(count: int, rounds: int) -> None:
    print(f"recording {count:,} selections over 1,000 gateways ...", flush=True)
    recorded = record_fleet(1000, count)
    events = [event for _, event in recorded.events]
    with embedded_server() as (server, _data):
        bus = Bus(server.url)
        bus.start()
        try:
            store_all(bus, events)
        finally:
            bus.stop()
        size = sum(len(encode(e)) for e in events)
        print(f"stored {len(events):,} events ({size / 1e6:.1f} MB)", flush=True)
        replays, whatifs = [], []
        for _ in range(rounds):
            seconds, out = run_command(server.url, "replay", "--json")
            report = msgspec.json.decode(out)
            if (report["selections"], report["reproduced"]) != (count, count):
                raise RuntimeError(f"replay: {report['selections']} selections, not {count}")
            replays.append(seconds)
            seconds, out = run_command(server.url, "whatif", "--strategy", "RoundRobin", "--json")
            whatifs.append(seconds)
    best, best_whatif = min(replays), min(whatifs)
    print_table(
        f"Re-running {count:,} recorded selections (1,000 gateways at 1 Hz, 1,000 selections/s:"
        f" {recorded.seconds:.0f} s of a fleet), best of {rounds}, end to end",
        ["command", "seconds", "selections/s", "aim"],
        [
            [
                "gatefleet audit replay --json",
                f"{best:.2f}",
                fmt_rate(count / best),
                "< 10 s: " + ("met" if best < 10 else "missed"),
            ],
            [
                "gatefleet audit whatif --strategy RoundRobin --json",
                f"{best_whatif:.2f}",
                fmt_rate(count / best_whatif),
                "-",
            ],
        ],
    )
    print(f"every one of the {count:,} selections reproduced exactly")


def bench_write_load(gateways: int) -> None:
    seconds = 10.0
    print(f"recording {seconds:g} s of {gateways:,} gateways at 1 Hz, 1,000 selections/s ...")
    recorded = record_fleet(gateways, int(seconds * 1000))
    events = [event for _, event in recorded.events]
    data = [encode(event) for event in events]
    load_msgs, load_bytes = len(data) / recorded.seconds, sum(map(len, data)) / recorded.seconds
    snapshots = sum(1 for e in events if e.type == "lb.snapshot")
    with embedded_server() as (server, _data):
        bus = Bus(server.url)
        bus.start()
        try:
            repeat = max(1, 2000 // len(events))  # enough to measure the store's pace
            copies = [
                msgspec.structs.replace(event, id=new_event_id())  # not duplicates: stored
                for _ in range(repeat)
                for event in events
            ]
            elapsed = store_all(bus, copies)
        finally:
            bus.stop()
    store_msgs = len(events) * repeat / elapsed
    store_bytes = sum(map(len, data)) * repeat / elapsed
    old_bytes = recorded.one_selection_bytes * 1000
    rows = [
        [
            "audit write load (lb.selections + lb.snapshot)",
            f"{load_msgs:,.1f}",
            f"{load_bytes / 1e6:.2f}",
            fmt_ratio(load_msgs / store_msgs),
            fmt_ratio(load_bytes / store_bytes),
        ],
        [
            "the store sustains (event outbox, as fast as acked)",
            f"{store_msgs:,.0f}",
            f"{store_bytes / 1e6:.1f}",
            "1.00x",
            "1.00x",
        ],
        [
            "for reference: one lb.selected per selection (before)",
            "1,000",
            f"{old_bytes / 1e6:.2f}",
            fmt_ratio(1000 / store_msgs),
            fmt_ratio(old_bytes / store_bytes),
        ],
    ]
    print_table(
        f"Audit write load at {gateways:,} gateways (1 Hz) and 1,000 selections/s: "
        f"{len(events)} events in {recorded.seconds:.0f} simulated s ({snapshots} snapshot parts)",
        ["", "messages/s", "MB/s", "of store msgs", "of store bytes"],
        rows,
    )
    worst = max(load_msgs / store_msgs, load_bytes / store_bytes)
    verdict = "meets" if worst < 0.5 else "misses"
    print(f"the audit writes {worst:.0%} of what the store sustains: {verdict} the aim of < 50%")


# The readers ------------------------------------------------------------------------------


def bare_read(bus: Bus, expected: int) -> float:
    """Seconds for a bare nats-py ordered consumer to receive the whole stream."""

    async def read() -> float:
        done = asyncio.get_running_loop().create_future()
        count = 0

        async def on_msg(_msg: Any) -> None:
            nonlocal count
            count += 1
            if count == expected and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        sub = await bus.js.subscribe(
            Subjects(PREFIX).all_events,
            stream=stream_name(PREFIX),
            cb=on_msg,
            ordered_consumer=True,
        )
        await asyncio.wait_for(done, 300)
        elapsed = time.perf_counter() - started
        await sub.unsubscribe()
        return elapsed

    return bus.run(read(), timeout=320)


def audit_command() -> list[str]:
    from gatefleet.cli import main as cli  # noqa: PLC0415 - only to see what is wired

    if "audit" in getattr(cli, "commands", {}):
        return [sys.executable, "-m", "gatefleet", "audit"]
    return [sys.executable, "-c", AUDIT_FALLBACK]


@dataclass(frozen=True)
class Run:
    seconds: float
    lines: int


def run_audit(url: str, *args: str) -> Run:
    """The command end to end, stdout through a pipe, every line counted."""
    command = [*audit_command(), "--nats", url, *args]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    lines = 0
    while chunk := process.stdout.read(1 << 20):
        lines += chunk.count(b"\n")
    _, err = process.communicate(timeout=300)
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {err.decode(errors='replace')}")
    return Run(elapsed, lines)


# Main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench replay", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--selections", type=int, default=100_000)
    parser.add_argument("--write-gateways", type=int, default=10_000)
    args = parser.parse_args(argv)
    count: int = args.events
    bench_write_load(args.write_gateways)
    bench_replay_selections(args.selections, args.rounds)

    with embedded_server() as (server, _data):
        bus = Bus(server.url)
        bus.start()
        try:
            print(f"building {count:,} events ...", flush=True)
            events = make_events(count)
            started = time.perf_counter()
            size = fill_stream(bus, events)
            fill_s = time.perf_counter() - started
            print(f"stored in {fill_s:.1f}s ({size / count:.0f} bytes/event on disk)", flush=True)

            samples: dict[str, list[float]] = {}
            gateway_lines = sum(
                1
                for e in events
                if (
                    isinstance(e, GatewaySelected)
                    and "g-0001" in {c.gateway_id for c in e.candidates} | set(e.excluded)
                )
                or getattr(e, "gateway_id", None) == "g-0001"
            )
            cases: list[tuple[str, tuple[str, ...], int]] = [
                ("empty", ("--json", "--type", "ha.alarm"), 0),
                ("json", ("--json",), count),
                ("json --gateway", ("--json", "--gateway", "g-0001"), gateway_lines),
                ("table", (), count + 1),
            ]
            for _ in range(args.rounds):
                samples.setdefault("bare", []).append(bare_read(bus, count))
                for name, audit_args, lines in cases:
                    run = run_audit(server.url, *audit_args)
                    if run.lines != lines:
                        raise RuntimeError(f"{name}: {run.lines} lines, expected {lines}")
                    samples.setdefault(name, []).append(run.seconds)
        finally:
            bus.stop()

    best = {name: min(values) for name, values in samples.items()}
    startup = best["empty"]
    bare_rate = count / best["bare"]
    rows = [
        ["bare ordered consumer", f"{best['bare']:.2f}", "-", fmt_rate(bare_rate), "1.00x", "-"]
    ]
    for name, label in (
        ("json", "gatefleet audit --json"),
        ("json --gateway", "gatefleet audit --json --gateway g-0001"),
        ("table", "gatefleet audit (table)"),
    ):
        seconds = best[name]
        net = seconds - startup
        rows.append(
            [
                label,
                f"{seconds:.2f}",
                f"{net:.2f}",
                fmt_rate(safe_div(count, net)),
                fmt_ratio(safe_div(count / net, bare_rate) if net > 0 else float("nan")),
                fmt_ratio(safe_div(count / seconds, bare_rate)),
            ]
        )
    print_table(
        f"Replay of {count:,} events ({size / 1e6:.0f} MB), best of {args.rounds} rounds; "
        f"empty replay (process start + connect) {startup:.2f}s "
        f"(median {statistics.median(samples['empty']):.2f}s)",
        ["reader", "total s", "net s", "net rate", "net / bare", "total / bare"],
        rows,
    )
    print(machine_line())
    ratio = (count / (best["json"] - startup)) / bare_rate
    verdict = "meets" if ratio >= 0.5 else "misses"
    print(f"audit --json net rate is {ratio:.2f}x the bare rate: {verdict} the aim of 0.5x")


if __name__ == "__main__":
    main()
