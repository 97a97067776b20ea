"""Delivery cost of PooledActor dispatchers next to one pykka ThreadingActor per actor.

    python -m bench.bench_dispatch [--messages 60000]
    python -m bench dispatch

Each case runs in a fresh spawned process: N actors are started on a dispatcher, then a
feeder thread tells 1 message per actor per round until about `--messages` are sent; the
case ends when the last message was handled. Reported: messages/s (wall), CPU us/message
(whole process, feeder included), worker wake-ups in all (Pool: notifies; OnLoop:
`call_soon(_threadsafe)` calls; ThreadingActor: one per message), context switches per message, RSS per idle actor (after
start, before any message) and threads in the process. `Pool(2) notify-all` is Pool(2)
with the idle-worker count bypassed (lock + notify on every schedule), for comparison.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

import pykka

from actors.dispatch import Dispatcher, OnLoop, Pool, PooledActor
from bench.common import Usage, machine_line, print_table, rss_bytes, run_case

_done = threading.Event()
_count = itertools.count(1)
_target = 0


def _handled() -> None:
    if next(_count) == _target:  # itertools.count: atomic under the GIL, no lock
        _done.set()


class PooledSink(PooledActor):
    def on_receive(self, message: Any) -> None:
        _handled()


class ThreadSink(pykka.ThreadingActor):
    def on_receive(self, message: Any) -> None:
        _handled()


class NotifyAllPool(Pool):
    """Pool that takes the lock and notifies on every schedule (the naive wake-up)."""

    def _wake(self) -> None:
        with self._cond:
            if self._idle:
                self._idle -= 1
            self.wakeups += 1
            self._cond.notify()


def _dispatcher(kind: str) -> tuple[Dispatcher | None, asyncio.AbstractEventLoop | None]:
    if kind == "pykka ThreadingActor":
        return None, None
    if kind == "OnLoop":
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="loop", daemon=True).start()
        return OnLoop(loop), loop
    workers = int(kind[5])
    pool = NotifyAllPool if "notify-all" in kind else Pool
    return pool(kind, workers=workers), None


def case(kind: str, actors: int, messages: int) -> dict[str, Any]:
    global _target  # noqa: PLW0603
    gc.collect()
    dispatcher, loop = _dispatcher(kind)
    if dispatcher is not None:
        dispatcher.start()
    rss0 = rss_bytes()
    refs: list[pykka.ActorRef[Any]]
    if dispatcher is None:
        refs = [ThreadSink.start() for _ in range(actors)]
    else:
        refs = [PooledSink.start(dispatcher=dispatcher) for _ in range(actors)]
    gc.collect()
    rss_per_actor = (rss_bytes() - rss0) / actors
    threads = threading.active_count()
    rounds = max(1, messages // actors)
    _target = rounds * actors
    wake0 = dispatcher.wakeups if dispatcher else 0

    def feed() -> None:
        for _ in range(rounds):
            for ref in refs:
                ref.tell(None)

    usage0, cpu0, t0 = Usage.now(), time.process_time(), time.perf_counter()
    feeder = threading.Thread(target=feed, name="feeder")
    feeder.start()
    if not _done.wait(300):
        raise RuntimeError(f"{kind}: not all messages were handled")
    wall, cpu, usage1 = time.perf_counter() - t0, time.process_time() - cpu0, Usage.now()
    feeder.join()
    wakeups = (dispatcher.wakeups if dispatcher else _target) - wake0
    t_stop = time.perf_counter()
    pykka.ActorRegistry.stop_all(block=True, timeout=30)
    stop_all_s = time.perf_counter() - t_stop
    if dispatcher is not None:
        dispatcher.stop(timeout=10)
    if loop is not None:
        loop.call_soon_threadsafe(loop.stop)
    return {
        "rate": _target / wall,
        "cpu_us": cpu / _target * 1e6,
        "wakeups": wakeups,
        "messages": _target,
        "switches": (usage1.switches - usage0.switches) / _target,
        "rss": rss_per_actor,
        "threads": threads,
        "stop_all_s": stop_all_s,
    }


def pool_stop_case(actors: int) -> dict[str, Any]:
    """How long Pool(2).stop() takes with `actors` live actors (marked dead by it)."""
    pool = Pool("stop", workers=2)
    pool.start()
    before = threading.active_count()
    for _ in range(actors):
        PooledSink.start(dispatcher=pool)
    t0 = time.perf_counter()
    pool.stop(timeout=10)
    took = time.perf_counter() - t0
    return {"stop_s": took, "threads_before": before, "threads_after": threading.active_count()}


KINDS = ("Pool(1)", "Pool(2)", "Pool(2) notify-all", "OnLoop", "pykka ThreadingActor")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    args = parser.parse_args(argv)
    rows = []
    for actors in (1_000, 10_000):
        for kind in KINDS:
            if kind == "pykka ThreadingActor" and actors > 1_000:
                continue
            r = run_case(case, kind, actors, args.messages, timeout=600)
            rows.append(
                [
                    kind,
                    f"{actors:,}",
                    f"{r['rate']:,.0f}",
                    f"{r['cpu_us']:.1f}",
                    f"{r['messages']:,}",
                    f"{r['wakeups']:,}",
                    f"{r['switches']:.3f}",
                    f"{r['rss']:,.0f}",
                    str(r["threads"]),
                    f"{r['stop_all_s']:.2f}",
                ]
            )
    print_table(
        f"1 message per actor per round from a feeder thread, ~{args.messages:,} messages "
        f"per case ({machine_line()})",
        [
            "dispatcher",
            "actors",
            "msg/s",
            "CPU us/msg",
            "messages",
            "wake-ups",
            "ctx sw/msg",
            "RSS B/actor",
            "threads",
            "stop_all s",
        ],
        rows,
    )
    stop = run_case(pool_stop_case, 10_000, timeout=300)
    print(
        f"Pool(2).stop() with 10,000 live actors: {stop['stop_s'] * 1000:.0f} ms, threads "
        f"{stop['threads_before']} -> {stop['threads_after']}"
    )


if __name__ == "__main__":
    main()
