"""A latency histogram kept by one actor and read by any thread (`P.api.status`)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence

from schemas.api import Histogram

# Seconds. Selections take a millisecond, distributions seconds to hours.
SELECTION_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5)
DISTRIBUTION_BOUNDS_S = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class HistogramRecorder:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket, the last one above every bound
        self._sum = 0.0
        self._lock = threading.Lock()  # a read never sees a count without its sum

    def observe(self, seconds: float) -> None:
        i = bisect_left(self._bounds, seconds)  # the first bound >= seconds (le buckets)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> Histogram:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for n in counts[:-1]:
            running += n
            cumulative.append(running)
        return Histogram(
            bounds=list(self._bounds), counts=cumulative, count=running + counts[-1], sum=total
        )


class PerStrategy:
    """One histogram per strategy, made on first use (LoadBalancer writes, status reads)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self._by_strategy: dict[str, HistogramRecorder] = {}

    def observe(self, strategy: str, seconds: float) -> None:
        recorder = self._by_strategy.get(strategy)
        if recorder is None:
            recorder = self._by_strategy.setdefault(strategy, HistogramRecorder(self._bounds))
        recorder.observe(seconds)

    def snapshot(self) -> dict[str, Histogram]:
        return {name: r.snapshot() for name, r in list(self._by_strategy.items())}
