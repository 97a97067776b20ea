"""Heartbeats per second sustained by gatefleet, next to a bare nats-py subscriber.

    python -m bench heartbeats [--gateways 1000 5000] [--window 5] [--warmup 1]

For each fleet size N, two cases run one after the other, each in a fresh process with its
own embedded nats-server:

- `bare`: one nats-py subscription on `P.gw.*.heartbeat` (on a `Bus` loop, uvloop like
  gatefleet's) whose callback only msgspec-decodes a Heartbeat and counts it;
- `gatefleet`: the whole Orchestrator (probing off, heartbeats never stale). A heartbeat
  counts once the load balancer's table shows it (bus -> GatewayActor -> LoadBalancer).

Both are fed by the same publisher *process* (so it does not share the measured GIL):
first one heartbeat per gateway (registration: RSS and start time per gateway are measured
across it), then heartbeats round-robin over the N subjects with increasing seq, flat out
but never more than `--backlog` ahead of what the consumer has processed (a sampler thread
reports progress through shared memory). So the rate measured over the window is what the
consumer sustains, and nothing is dropped for being a slow consumer; anything published
and never processed is reported as lost.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from bench.common import (
    PublisherControl,
    Usage,
    accepted_heartbeats,
    bench_settings,
    embedded_server,
    fmt_rate,
    fmt_ratio,
    machine_line,
    print_table,
    publisher_main,
    rss_bytes,
    run_case,
    running_orchestrator,
    safe_div,
    spawn,
    thread_count,
    wait_for,
)
from bus.runtime import SUBSCRIPTION_PENDING_BYTES, SUBSCRIPTION_PENDING_MSGS, Bus
from schemas.wire import Heartbeat

log = logging.getLogger("bench.heartbeats")

KINDS = ("bare", "gatefleet")
SAMPLE_EVERY_S = 0.02
DRAIN_TIMEOUT_S = 20.0
FILL_TIMEOUT_S = 10.0  # a consumer faster than the publisher never fills the backlog


class _SlowConsumers(logging.Handler):
    """Counts nats-py slow-consumer errors (logged by bus.connection's error callback)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "slow consumer" in record.getMessage().lower():
            self.count += 1


@dataclass(frozen=True)
class Consumer:
    """How the measuring side sees its consumer: progress, registration, edge drops."""

    processed: Callable[[], int]
    registered: Callable[[], bool]
    drops: Callable[[], dict[str, int]]
    msgs_in: Callable[[], int]  # messages its NATS connection has received


@dataclass(frozen=True)
class Load:
    url: str
    prefix: str
    count: int
    window_s: float
    warmup_s: float
    backlog: int


def heartbeat_case(
    kind: str, count: int, window_s: float, warmup_s: float, backlog: int
) -> dict[str, Any]:
    """One measurement, in its own process: see the module docstring."""
    slow = _SlowConsumers()
    logging.getLogger().addHandler(slow)
    prefix = f"hb{kind[0]}{count}"
    with embedded_server() as (server, tmp):
        load = Load(server.url, prefix, count, window_s, warmup_s, backlog)
        if kind == "bare":
            bus = Bus(server.url, name="bench-bare")
            bus.start()
            try:
                return _measure(kind, load, _bare_consumer(bus, prefix), slow)
            finally:
                bus.stop()
        settings = bench_settings(server.url, prefix, tmp, audit={"record_selections": False})
        with running_orchestrator(settings) as orchestrator:

            def registered() -> bool:
                rows, total = accepted_heartbeats(orchestrator)
                return rows >= count and total >= count

            consumer = Consumer(
                processed=lambda: accepted_heartbeats(orchestrator)[1],
                registered=registered,
                drops=orchestrator.drops.counts,
                msgs_in=lambda: _in_msgs(orchestrator.bus),
            )
            return _measure(kind, load, consumer, slow)


def _bare_consumer(bus: Bus, prefix: str) -> Consumer:
    """One wildcard subscription whose callback only decodes and counts."""
    decoder = msgspec.json.Decoder(Heartbeat)
    seen = [0]

    async def on_heartbeat(msg: Any) -> None:
        decoder.decode(msg.data)
        seen[0] += 1

    async def subscribe() -> None:
        await bus.nc.subscribe(
            f"{prefix}.gw.*.heartbeat",
            cb=on_heartbeat,
            pending_msgs_limit=SUBSCRIPTION_PENDING_MSGS,
            pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
        )
        await bus.nc.flush()

    bus.run(subscribe())
    return Consumer(
        processed=lambda: seen[0],
        registered=lambda: True,
        drops=dict,
        msgs_in=lambda: _in_msgs(bus),
    )


def _in_msgs(bus: Bus | None) -> int:
    return int(bus.nc.stats["in_msgs"]) if bus is not None else 0


def _measure(kind: str, load: Load, consumer: Consumer, slow: _SlowConsumers) -> dict[str, Any]:
    processed, count = consumer.processed, load.count
    ctx = spawn()
    ctl = PublisherControl.create(ctx)
    publisher = ctx.Process(
        target=publisher_main,
        args=(load.url, load.prefix, count, load.backlog, ctl),
        name="bench-publisher",
    )
    publisher.start()
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(SAMPLE_EVERY_S):
            ctl.processed.value = processed()

    sampler = threading.Thread(target=sample, name="bench-sampler", daemon=True)
    try:
        if not ctl.ready.wait(30):
            raise TimeoutError("the publisher did not connect")
        sampler.start()
        rss_before, threads_before = rss_bytes(), thread_count()

        # Registration: one heartbeat per gateway.
        started = time.perf_counter()
        ctl.go_register.set()
        wait_for(
            lambda: processed() >= count and consumer.registered(),
            300,
            f"{count} gateways registered",
        )
        register_s = time.perf_counter() - started
        rss_registered, threads_registered = rss_bytes(), thread_count()

        # Flat out, within the backlog credit. Measure only in the steady state: once the
        # backlog is full (when the consumer is the bottleneck), plus a warm-up.
        ctl.go_flat.set()

        def backlog() -> int:
            return int(ctl.published.value) - processed()

        filled = _wait_quietly(lambda: backlog() >= 0.9 * load.backlog, FILL_TIMEOUT_S)
        time.sleep(load.warmup_s)
        backlog_start = backlog()
        c0, m0, u0, t0 = processed(), consumer.msgs_in(), Usage.now(), time.perf_counter()
        slices = _slice_rates(processed, load.window_s)
        c1, m1, u1, t1 = processed(), consumer.msgs_in(), Usage.now(), time.perf_counter()
        rss_loaded = rss_bytes()
        backlog_end = backlog()
        ctl.stop.set()
        publisher.join(30)
        published = int(ctl.published.value)
        final = _drain(processed, published)
    finally:
        ctl.stop.set()
        ctl.go_register.set()
        ctl.go_flat.set()
        stop_sampling.set()
        publisher.join(10)
        if publisher.is_alive():
            publisher.terminate()
            publisher.join(5)
    done, used = c1 - c0, u1 - u0
    return {
        "kind": kind,
        "gateways": count,
        "rate": done / (t1 - t0),
        "slowest_s": min(slices),
        "fastest_s": max(slices),
        "cpu_us_per_hb": 1e6 * safe_div(used.cpu_s, done),
        "cores_busy": used.cpu_s / (t1 - t0),
        "sys_share": safe_div(used.sys_s, used.cpu_s),
        "switches_per_hb": safe_div(used.switches, done),
        "msgs_in_per_hb": safe_div(m1 - m0, done),
        "register_s": register_s,
        "rss_before": rss_before,
        "rss_registered": rss_registered,
        "rss_loaded": rss_loaded,
        "rss_per_gateway": (rss_registered - rss_before) / count,
        "threads_added": threads_registered - threads_before,
        "published": published,
        "processed": final,
        "lost": published - final,
        "backlog_filled": filled,
        "backlog_start": backlog_start,
        "backlog_end": backlog_end,
        "slow_consumer_errors": slow.count,
        "drops": consumer.drops(),
    }


def _wait_quietly(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _slice_rates(processed: Callable[[], int], window_s: float) -> list[float]:
    """Sleeps through the window; the rate of each whole second of it (its spread)."""
    rates = []
    end = time.perf_counter() + window_s
    last, at = processed(), time.perf_counter()
    while (left := end - time.perf_counter()) > 0:
        time.sleep(min(1.0, left))
        now, now_at = processed(), time.perf_counter()
        rates.append((now - last) / (now_at - at))
        last, at = now, now_at
    return rates


def _drain(processed: Callable[[], int], published: int) -> int:
    """Waits until everything published was processed (or the timeout); the final count."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    done = processed()
    while done < published and time.monotonic() < deadline:
        time.sleep(0.05)
        done = processed()
    return done


def report(results: Sequence[dict[str, Any]]) -> None:
    bare = {r["gateways"]: r for r in results if r["kind"] == "bare"}
    rows = []
    for r in results:
        base = bare.get(r["gateways"])
        is_bare = r["kind"] == "bare"
        ratio = safe_div(r["rate"], base["rate"]) if base else float("nan")
        cpu_ratio = safe_div(r["cpu_us_per_hb"], base["cpu_us_per_hb"]) if base else float("nan")
        rows.append(
            [
                f"{r['gateways']:,} {r['kind']}",
                fmt_rate(r["rate"]),
                f"{r['slowest_s'] / 1000:,.1f}-{r['fastest_s'] / 1000:,.1f}k",
                "1.00x" if is_bare else fmt_ratio(ratio),
                f"{r['cpu_us_per_hb']:.1f}",
                "1.00x" if is_bare else fmt_ratio(cpu_ratio),
                f"{r['cores_busy']:.2f}",
                f"{100 * r['sys_share']:.0f}%",
                f"{r['switches_per_hb']:.2f}",
                f"{r['msgs_in_per_hb']:.2f}",
                f"{r['rss_per_gateway'] / 1024:.1f}",
                f"{(r['rss_loaded']) / 2**20:.0f}",
                "-" if is_bare else f"{1000 * r['register_s'] / r['gateways']:.2f}",
                "-" if is_bare else str(r["threads_added"]),
                f"{r['lost']:,}",
                str(r["slow_consumer_errors"]),
            ]
        )
    print_table(
        f"Heartbeats sustained ({machine_line()})",
        [
            "gateways / consumer",
            "accepted",
            "per-second",
            "vs bare",
            "CPU us/hb",
            "vs bare",
            "cores",
            "sys",
            "ctx-sw/hb",
            "msgs/hb",
            "RSS KB/gw",
            "RSS MB",
            "start ms/gw",
            "+threads",
            "lost",
            "slow-cons",
        ],
        rows,
    )
    for r in results:
        drops = {k: v for k, v in r["drops"].items() if v}
        if drops:
            print(f"  {r['gateways']:,} {r['kind']}: dropped at the edge: {drops}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench heartbeats", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--gateways", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    parser.add_argument(
        "--backlog", type=int, default=20_000, help="most heartbeats the publisher runs ahead"
    )
    args = parser.parse_args(argv)
    results = []
    for count in args.gateways:
        for kind in KINDS:
            started = time.perf_counter()
            result = run_case(
                heartbeat_case, kind, count, args.window, args.warmup, args.backlog, timeout=300
            )
            print(
                f"  {count:,} {kind}: {result['rate']:,.0f} heartbeats/s; backlog "
                f"{result['backlog_start']:,} -> {result['backlog_end']:,}"
                f"{'' if result['backlog_filled'] else ' (never filled: publisher-bound)'} "
                f"({time.perf_counter() - started:.1f}s)",
                flush=True,
            )
            results.append(result)
    report(results)


if __name__ == "__main__":
    main()
