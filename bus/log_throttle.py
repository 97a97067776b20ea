"""Log lines that can come once per gateway, at most once per interval per kind: at
2,000 gateways a line per gateway is a flood that hides everything else. Whatever they
report is also counted or recorded as events elsewhere; the log only has to show that it
happens, and how often."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LogThrottle:
    """Says, per kind of line, whether a line may be written now, and how many of that kind
    were held back since the last one written. Called from any thread."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, kind: str) -> int | None:
        """None: hold this line back. Else: write it, and say how many lines of this kind
        were held back before it."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return None
            self._last[kind] = now
            return self._held.pop(kind, 0)


def held_back(count: int) -> str:
    """The suffix of a line written after others like it were held back."""
    return f" ({count} more like it since the last one, not logged)" if count else ""
