"""A thread-safe tally: counts per key, written by one actor and read by another."""

from __future__ import annotations

import threading


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
