"""TimerWheel: many coalesced timers on the bus loop, and a measure of the loop's lag.

`Bus.call_later` costs a `call_soon_threadsafe` (a write to the loop's self-pipe, a wake-up)
and an asyncio handle per timer. With ten thousand gateways each re-arming a staleness
timer every second that is ten thousand wake-ups a second for nothing: a timer that is
due in a second does not need to reach the loop *now*. The wheel instead:

- takes new timers from any thread by appending them to a deque (atomic under the GIL,
  no lock, no wake-up); its own periodic tick on the loop, every `resolution_s`
  (default 10 ms), moves them into a heap ordered by (deadline, sequence);
- on each tick runs, in deadline order, every timer whose deadline has passed on
  `time.monotonic()` (never the loop's clock: uvloop's is cached per iteration and in
  whole milliseconds). So a callback never runs early, and runs at most about one
  resolution late while the loop keeps up;
- cancels lazily: `TimerHandle.cancel()` sets a flag (from any thread); the tick skips
  cancelled timers, and rebuilds the heap when they make up most of it;
- measures the loop's lag for free: each tick is planned for an exact time, and how late
  it actually runs is how long the loop was busy or blocked. Lag listeners hear each
  measure on the loop *before* the tick runs any timer, so whatever a late timer triggers
  already sees the lag (bus/awareness.py relies on this).

Threading: `schedule`, `TimerHandle.cancel`, `lag_s`, `max_lag_s` from any thread; the
callbacks and lag listeners run on the loop and must not block (they typically `tell`).
`start`/`stop` from any thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_RESOLUTION_S = 0.010
LAG_WINDOW_S = 5.0  # `max_lag_s` is the largest lag seen in the last one to two windows
_COMPACT_MIN = 1024  # below this many timers in the heap, cancelled ones are never purged

LagListener = Callable[[float, float], None]  # (now, lag_s), on the loop


class TimerHandle:
    """One scheduled call. `cancel()` from any thread: the call will not start after it
    returns (a call already running on the loop at that moment finishes)."""

    __slots__ = ("args", "cancelled", "deadline", "fn", "seq", "wheel")

    def __init__(
        self,
        wheel: TimerWheel,
        deadline: float,
        seq: int,
        fn: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        self.wheel = wheel
        self.deadline = deadline
        self.seq = seq
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.wheel._cancelled += 1  # approximate under races: only steers compaction


class TimerWheel:
    """Timers coalesced onto one periodic tick of `loop` (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        resolution_s: float = DEFAULT_RESOLUTION_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if resolution_s <= 0:
            raise ValueError("resolution_s must be positive")
        self.loop = loop
        self.resolution_s = resolution_s
        self.clock = clock
        self._incoming: deque[TimerHandle] = deque()
        # (deadline, seq, timer): tuples compare in C, a handle's __lt__ would in Python.
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._lag_listeners: list[LagListener] = []
        self._running = False
        self._next_tick = 0.0  # when the planned tick should run (clock time)
        self._handle: asyncio.TimerHandle | None = None
        self._lag_s = 0.0
        self._window_start = 0.0
        self._window_max = 0.0
        self._previous_window_max = 0.0

    # Life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts ticking (from any thread; idempotent)."""
        self.loop.call_soon_threadsafe(self._start_on_loop)

    def _start_on_loop(self) -> None:
        if self._running:
            return
        self._running = True
        now = self.clock()
        self._window_start = now
        self._next_tick = now + self.resolution_s
        self._arm(now)

    def stop(self) -> None:
        """Stops ticking (from any thread). Pending timers are kept but never run."""
        try:
            self.loop.call_soon_threadsafe(self._stop_on_loop)
        except RuntimeError:  # the loop is closed: nothing ticks any more
            self._running = False

    def _stop_on_loop(self) -> None:
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def add_lag_listener(self, listener: LagListener) -> None:
        """`listener(now, lag_s)` on the loop at every tick, before that tick's timers
        (from any thread: the list is replaced, never changed under the tick)."""
        self._lag_listeners = [*self._lag_listeners, listener]

    # Any thread -------------------------------------------------------------------------

    def schedule(self, delay_s: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        """Calls `fn(*args)` on the loop once `delay_s` seconds have passed (from any thread,
        without waking the loop)."""
        handle = TimerHandle(self, self.clock() + max(0.0, delay_s), next(self._seq), fn, args)
        self._incoming.append(handle)
        return handle

    @property
    def lag_s(self) -> float:
        """How late the latest tick ran: the loop's current lag, in seconds."""
        return self._lag_s

    @property
    def max_lag_s(self) -> float:
        """The largest lag measured in the last `LAG_WINDOW_S` to 2 x `LAG_WINDOW_S`."""
        return max(self._window_max, self._previous_window_max)

    @property
    def pending(self) -> int:
        """Timers held (including cancelled ones not purged yet): for stats and tests."""
        return len(self._heap) + len(self._incoming)

    # On the loop ------------------------------------------------------------------------

    def _arm(self, now: float) -> None:
        self._handle = self.loop.call_later(max(0.0, self._next_tick - now), self._tick)

    def _tick(self) -> None:
        self._handle = None
        if not self._running:
            return
        now = self.clock()
        lag = max(0.0, now - self._next_tick)
        # The next tick is planned from this one's start, so the time this tick's own
        # callbacks take shows as lag at the next one; a late tick re-bases the plan
        # instead of catching up with a burst of ticks.
        self._next_tick = max(self._next_tick, now) + self.resolution_s
        self._note_lag(now, lag)
        heap = self._heap
        incoming = self._incoming
        while incoming:
            timer = incoming.popleft()
            if timer.cancelled:  # cancelled before it reached the heap
                self._cancelled -= 1
                continue
            heapq.heappush(heap, (timer.deadline, timer.seq, timer))
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(heap):
            self._compact()
            heap = self._heap
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer.cancelled = True  # fired: a later cancel() is a no-op and not counted
            try:
                timer.fn(*timer.args)
            except Exception:  # one bad callback must not stop every other timer
                log.exception("timer callback %r failed", timer.fn)
        if not self._running:
            return
        self._arm(self.clock())

    def _note_lag(self, now: float, lag: float) -> None:
        self._lag_s = lag
        if now - self._window_start >= LAG_WINDOW_S:
            self._previous_window_max = self._window_max
            self._window_max = 0.0
            self._window_start = now
        self._window_max = max(self._window_max, lag)
        for listener in self._lag_listeners:
            try:
                listener(now, lag)
            except Exception:
                log.exception("lag listener %r failed", listener)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[2].cancelled]
        heapq.heapify(self._heap)
        self._cancelled = 0
