"""Flap detection for one gateway: pure logic, no I/O; times are monotonic seconds.

A gateway whose status changed (any change among healthy, degraded and down; its first
status is not a change) at least `threshold` times within `window_s` is flapping. It stops
flapping once it has stayed healthy for `hold_s`: every change while it flaps starts the
hold over. A flapping gateway is not selected and not failed back to (a gateway that comes
back for a second at a time would pull its clients back and forth with it).
"""

from __future__ import annotations

from collections import deque

from schemas.settings import HealthSettings
from schemas.types import GatewayStatus


class FlapDetector:
    __slots__ = ("_changes", "_healthy_since", "flapping", "hold_s", "threshold", "window_s")

    def __init__(self, settings: HealthSettings) -> None:
        self.threshold = settings.flap_threshold
        self.window_s = settings.flap_window_s
        self.hold_s = settings.flap_hold_s
        # The times of the last `threshold` changes: all a window check needs.
        self._changes: deque[float] = deque(maxlen=max(1, self.threshold))
        self._healthy_since: float | None = None
        self.flapping = False

    def on_change(self, old: GatewayStatus, new: GatewayStatus, now: float) -> bool:
        """Records a status change; True when it makes the gateway flapping."""
        self._healthy_since = now if new == "healthy" else None
        if old == "unknown" or new == "unknown" or self.threshold == 0:
            return False
        self._changes.append(now)
        if self.flapping or len(self._changes) < self.threshold:
            return False
        self.flapping = now - self._changes[0] <= self.window_s
        return self.flapping

    def ends_at(self) -> float | None:
        """When it stops flapping if it stays healthy until then; None: not on its way."""
        if not self.flapping or self._healthy_since is None:
            return None
        return self._healthy_since + self.hold_s

    def on_check(self, now: float) -> bool:
        """True when it stops flapping now (healthy for `hold_s`)."""
        end = self.ends_at()
        if end is None or now < end:
            return False
        self.flapping = False
        self._changes.clear()  # the changes that made it flap are judged
        return True
