"""Storing events: gatefleet's acked event outbox next to the old fire-and-forget publish
and bare nats-py JetStream publishing, in the same run.

    python -m bench events [--events 50000] [--rounds 3] [--rate 2000]

One embedded nats-server; each case gets a fresh `GATEFLEET_EVENTS` stream and publishes
the same `--events` events (the mix of `bench replay`: selections, status changes,
distribution steps), encoded in the case:

- `bare js.publish`: nats-py awaiting each ack before the next publish (one event per
  round trip; a tenth of the events, it is slow);
- `bare js.publish_async`: nats-py's own pipelined publish (up to 4,000 acks awaited at
  once), on the bus loop: the baseline;
- `fire-and-forget`: what gatefleet did before, `Bus.publish` from a thread, no ack (the
  time is until the stream holds them all);
- `outbox`: gatefleet now, `EventOutbox.emit` from a thread (an actor's), until every
  event is acked.

`emit us` is the time the emitting thread spends per event (what an actor pays), `CPU
us` the whole process's CPU per event. The figures are the best of the rounds.

Then `paced`: the outbox at `--rate` events/s for 5 s, each event stamped when emitted;
from the stream's storage times, how long events waited to be stored (what a kill could
lose), as percentiles and the maximum.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec
import nats.js.errors

from bench.bench_replay import make_events
from bench.common import (
    embedded_server,
    fmt_rate,
    fmt_ratio,
    machine_line,
    percentile,
    print_table,
    safe_div,
    wait_for,
)
from bus.jetstream import JetStream, stream_name
from bus.outbox import EventOutbox
from bus.replay import Replay
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.codec import encode
from schemas.events import Event, decode_event, new_event_id, utc_now

PREFIX = "gatefleet"
RETRY_FOR_S = 30.0
PACED_S = 5.0


class Case:
    """The stream the cases store into. A case returns (seconds until every event is
    stored, seconds the emitting thread spent emitting them)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subjects = Subjects(PREFIX)
        self.jetstream = JetStream(bus, self.subjects)
        self.cleanups: list[Callable[[], None]] = []  # run once the case's figures are taken

    def fresh_stream(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # not there yet
            self.bus.run(self.bus.js.delete_stream(stream_name(PREFIX)))
        self.jetstream.setup(max_age_s=0, max_bytes=-1)

    def stored(self) -> int:
        return int(self.bus.run(self.bus.js.stream_info(stream_name(PREFIX))).state.messages)

    def message(self, event: Event) -> tuple[str, bytes, dict[str, str]]:
        return self.subjects.event(event.type), encode(event), {"Nats-Msg-Id": event.id}


def bare_sequential(case: Case, events: list[Event]) -> tuple[float, float]:
    async def publish() -> None:
        for event in events:
            subject, data, headers = case.message(event)
            await case.bus.js.publish(subject, data, headers=headers)

    started = time.perf_counter()
    case.bus.run(publish(), timeout=600)
    return time.perf_counter() - started, math.nan  # on the loop: no emitting thread


def bare_async(case: Case, events: list[Event]) -> tuple[float, float]:
    async def publish() -> None:
        js = case.bus.js
        for event in events:
            subject, data, headers = case.message(event)
            await js.publish_async(subject, data, headers=headers)
        await js.publish_async_completed()

    started = time.perf_counter()
    case.bus.run(publish(), timeout=600)
    return time.perf_counter() - started, math.nan  # on the loop: no emitting thread


def fire_and_forget(case: Case, events: list[Event]) -> tuple[float, float]:
    started = time.perf_counter()
    for event in events:
        case.bus.publish(*case.message(event))
    emitted = time.perf_counter() - started
    wait_for(lambda: case.stored() >= len(events), 120, "fire-and-forget stored", poll=0.005)
    return time.perf_counter() - started, emitted


def outbox(case: Case, events: list[Event]) -> tuple[float, float]:
    box = EventOutbox(case.bus, case.subjects, retry_for_s=RETRY_FOR_S)
    box.start()
    started = time.perf_counter()
    for event in events:
        box.emit(event)
    emitted = time.perf_counter() - started
    wait_for(lambda: box.acked >= len(events), 120, "outbox acked", poll=0.001)
    elapsed = time.perf_counter() - started
    if box.lost or box.failed:
        raise RuntimeError(f"outbox: {box.lost} lost, {box.failed} sends failed")
    case.cleanups.append(box.close)  # it stores orchestrator.stopped
    return elapsed, emitted


def in_a_thread(
    run: Callable[[Case, list[Event]], tuple[float, float]],
) -> Callable[..., tuple[float, float]]:
    """Emitting from a thread of its own, as an actor does (never the bus loop)."""

    def threaded(case: Case, events: list[Event]) -> tuple[float, float]:
        result: list[tuple[float, float]] = []
        thread = threading.Thread(target=lambda: result.append(run(case, events)))
        thread.start()
        thread.join()
        return result[0]

    return threaded


CASES: list[tuple[str, Callable[[Case, list[Event]], tuple[float, float]], int]] = [
    ("bare js.publish (sequential)", bare_sequential, 10),
    ("bare js.publish_async", bare_async, 1),
    ("fire-and-forget (before)", in_a_thread(fire_and_forget), 1),
    ("outbox (now)", in_a_thread(outbox), 1),
]


def paced(case: Case, rate: float) -> list[float]:
    """The outbox at `rate` events/s for PACED_S; each event's ms from emit to stored."""
    case.fresh_stream()
    box = EventOutbox(case.bus, case.subjects, retry_for_s=RETRY_FOR_S)
    box.start()
    templates = make_events(1000)
    total = int(rate * PACED_S)
    started = time.perf_counter()
    for n in range(total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        box.emit(msgspec.structs.replace(templates[n % 1000], id=new_event_id(), ts=utc_now()))
    wait_for(lambda: box.acked >= total, 60, "paced events acked", poll=0.005)
    box.close()
    latencies = []
    with Replay(case.bus, stream_name(PREFIX), [case.subjects.all_events]) as replay:
        for batch in replay:
            for _, stored_ns, data in batch:
                event = decode_event(data)
                if event.type != "orchestrator.stopped":
                    stored = datetime.fromtimestamp(stored_ns / 1e9, UTC)
                    latencies.append((stored - event.ts).total_seconds() * 1000)
    return latencies


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench events", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2000.0)
    args = parser.parse_args(argv)
    count: int = args.events
    events = make_events(count)

    best: dict[str, tuple[float, float, float, int]] = {}
    with embedded_server() as (server, _data):
        bus = Bus(server.url)
        bus.start()
        try:
            case = Case(bus)
            for _ in range(args.rounds):
                for name, run, share in CASES:
                    chosen = events[: count // share]
                    case.fresh_stream()
                    cpu = time.process_time()
                    seconds, emit_s = run(case, chosen)
                    cpu = time.process_time() - cpu
                    stored = case.stored()
                    if stored != len(chosen):
                        raise RuntimeError(f"{name}: {stored} of {len(chosen)} events stored")
                    while case.cleanups:
                        case.cleanups.pop()()
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, emit_s, cpu, len(chosen))
                    print(f"  {name}: {len(chosen) / seconds:,.0f} events/s", flush=True)
            latencies = paced(case, args.rate)
        finally:
            bus.stop()

    baseline = best["bare js.publish_async"]
    rows = []
    for name, (seconds, emit_s, cpu, n) in best.items():
        rate = n / seconds
        rows.append(
            [
                name,
                f"{n:,}",
                fmt_rate(rate),
                fmt_ratio(safe_div(rate, baseline[3] / baseline[0])),
                "-" if math.isnan(emit_s) else f"{emit_s / n * 1e6:.1f}",
                f"{cpu / n * 1e6:.1f}",
            ]
        )
    print_table(
        f"Events stored, best of {args.rounds} rounds",
        ["case", "events", "stored/s", "vs publish_async", "emit us", "CPU us"],
        rows,
    )
    print_table(
        f"Outbox at {args.rate:,.0f} events/s for {PACED_S:g}s: ms from emit to stored",
        ["events", "p50", "p99", "p99.9", "max"],
        [
            [
                f"{len(latencies):,}",
                *(f"{percentile(latencies, q):.2f}" for q in (50, 99, 99.9)),
                f"{max(latencies):.2f}",
            ]
        ],
    )
    print(machine_line())
    outbox_rate = best["outbox (now)"][3] / best["outbox (now)"][0]
    ratio = safe_div(outbox_rate, baseline[3] / baseline[0])
    print(f"the outbox stores {ratio:.2f}x the rate of bare js.publish_async")
    verdict = "meets" if max(latencies) <= 100 else "misses"
    print(f"slowest event stored {max(latencies):.1f} ms after emit: {verdict} the 100 ms bound")


if __name__ == "__main__":
    main()
