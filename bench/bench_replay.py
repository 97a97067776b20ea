"""Replay of the audit log: `gatefleet audit --json` next to a bare ordered-consumer read.

    python -m bench replay [--events 100000] [--rounds 3]

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

from bench.common import embedded_server, fmt_rate, fmt_ratio, machine_line, print_table, safe_div
from bus.jetstream import JetStream, stream_name
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.codec import encode
from schemas.events import (
    CandidateView,
    DistributionEvent,
    Event,
    GatewaySelected,
    GatewayStatusChanged,
)

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
    args = parser.parse_args(argv)
    count: int = args.events

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
