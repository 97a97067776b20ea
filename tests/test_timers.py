"""TimerWheel on a real bus loop: order, never early, cancel, any thread, lag."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from bus.runtime import Bus
from bus.timers import TimerHandle, TimerWheel
from tests.conftest import wait_until

RESOLUTION = 0.010


@pytest.fixture
def wheel(bus: Bus) -> Iterator[TimerWheel]:
    wheel = TimerWheel(bus.loop, resolution_s=RESOLUTION)
    wheel.start()
    yield wheel
    wheel.stop()


class Fired:
    """What ran, when, on which thread; `done` once `expected` calls happened."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.calls: list[tuple[object, float, threading.Thread]] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, key: object) -> None:
        with self._lock:
            self.calls.append((key, time.monotonic(), threading.current_thread()))
            if len(self.calls) >= self.expected:
                self.done.set()

    def wait(self, timeout: float = 5.0) -> None:
        assert self.done.wait(timeout), f"only {len(self.calls)} of {self.expected} fired"


def test_timers_run_in_deadline_order_never_early(wheel: TimerWheel) -> None:
    rng = random.Random(7)
    fired = Fired(40)
    handles: dict[int, TimerHandle] = {}
    for i in range(40):
        handles[i] = wheel.schedule(rng.uniform(0.0, 0.3), fired, i)
    fired.wait()

    keys = [key for key, _, _ in fired.calls]
    assert keys == sorted(handles, key=lambda i: (handles[i].deadline, handles[i].seq))
    lateness = []
    for key, at, thread in fired.calls:
        assert isinstance(key, int)
        assert at >= handles[key].deadline, "a timer ran early"
        assert thread.name == "gatefleet-bus"  # on the loop
        lateness.append(at - handles[key].deadline)
    # About one resolution late on an idle loop (generous bounds: the machine is shared).
    assert statistics.median(lateness) <= 3 * RESOLUTION, lateness
    assert max(lateness) < 0.25, lateness


def test_equal_deadlines_run_in_scheduling_order(wheel: TimerWheel) -> None:
    fired = Fired(100)
    clock_frozen_at = time.monotonic()
    # The same deadline for all: a clock that does not move while they are scheduled.
    frozen = TimerWheel(wheel.loop, resolution_s=RESOLUTION, clock=lambda: clock_frozen_at)
    handles = [frozen.schedule(0.0, fired, i) for i in range(100)]
    assert len({h.deadline for h in handles}) == 1
    frozen.start()
    try:
        fired.wait()
    finally:
        frozen.stop()
    assert [key for key, _, _ in fired.calls] == list(range(100))


def test_cancel_from_any_thread(wheel: TimerWheel) -> None:
    fired = Fired(2)
    keep_early = wheel.schedule(0.05, fired, "early")
    # Far enough apart that a slow thread start on a busy machine still cancels in time.
    dropped = wheel.schedule(0.5, fired, "dropped")
    keep_late = wheel.schedule(0.6, fired, "late")
    canceller = threading.Thread(target=dropped.cancel)
    canceller.start()
    canceller.join()
    fired.wait()  # "dropped" was due before "late", which has run
    assert [key for key, _, _ in fired.calls] == ["early", "late"]
    assert dropped.cancelled
    keep_early.cancel()  # after it ran: a harmless no-op
    keep_late.cancel()


def test_many_cancelled_timers_are_purged(wheel: TimerWheel) -> None:
    handles = [wheel.schedule(3600.0, print, i) for i in range(5000)]
    for handle in handles[:4000]:
        handle.cancel()
    wait_until(
        lambda: wheel.pending <= 1000, what="cancelled timers purged", show=lambda: wheel.pending
    )
    for handle in handles[4000:]:
        handle.cancel()


def test_scheduling_from_many_threads(wheel: TimerWheel) -> None:
    threads_n, per_thread = 8, 250
    fired = Fired(threads_n * per_thread)
    rng = random.Random(11)
    delays = [[rng.uniform(0.0, 0.2) for _ in range(per_thread)] for _ in range(threads_n)]
    start = threading.Barrier(threads_n)

    def schedule_all(t: int) -> None:
        start.wait()
        for i, delay in enumerate(delays[t]):
            wheel.schedule(delay, fired, (t, i))

    workers = [threading.Thread(target=schedule_all, args=(t,)) for t in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    fired.wait()
    assert len({key for key, _, _ in fired.calls}) == threads_n * per_thread
    times = [at for _, at, _ in fired.calls]
    assert times == sorted(times)


def test_lag_is_measured_when_the_loop_is_blocked(wheel: TimerWheel) -> None:
    heard: list[float] = []
    big_lag = threading.Event()

    def listener(now: float, lag: float) -> None:
        heard.append(lag)
        if lag >= 0.25:
            big_lag.set()

    wheel.loop.call_soon_threadsafe(wheel.add_lag_listener, listener)
    wait_until(lambda: len(heard) >= 3, what="the lag listener is called at each tick")
    assert wheel.max_lag_s < 0.25

    fired = Fired(1)
    wheel.schedule(0.0, time.sleep, 0.3)  # blocks the loop for 300 ms
    wheel.schedule(0.0, fired, "after")  # same tick, after the sleep
    assert big_lag.wait(5.0), f"no lag >= 250 ms measured: {max(heard)}"
    fired.wait()
    assert wheel.max_lag_s >= 0.25
    # The tick after the one that slept is on time again: the current lag drops.
    wait_until(lambda: wheel.lag_s < 0.1, what="lag back to normal", show=lambda: wheel.lag_s)
    assert wheel.max_lag_s >= 0.25  # still remembered as the recent max
