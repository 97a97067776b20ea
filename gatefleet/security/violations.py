"""Permission violations made visible: counted per user, and `security.violation` events.

NATS tells only the offending client and its own log, so for the embedded server
gatefleet reads them from the server's log (bus.server.Violation). Counts are for
`status` and `/metrics`; events are rate-limited per user.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bus.edge import Tally
from bus.server import Violation
from gatefleet.security.authority import Authority
from schemas.events import Event, SecurityViolation

log = logging.getLogger(__name__)

EVENT_EVERY_S = 10.0  # at most one event (and one log line) per user this often


class ViolationWatch:
    """Called with each violation on the server's log reader thread."""

    def __init__(
        self,
        authority: Authority,
        emit: Callable[[Event], None],
        counts: Tally,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.authority = authority
        self.emit = emit
        self.counts = counts
        self.clock = clock
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}
        self._last_event: dict[str, float] = {}
        self._unreported: dict[str, int] = {}

    def __call__(self, violation: Violation) -> None:
        user = self._name(violation.user)
        self.counts.add(user)
        now = self.clock()
        with self._lock:
            count = self._unreported[user] = self._unreported.get(user, 0) + 1
            if now - self._last_event.get(user, -EVENT_EVERY_S) < EVENT_EVERY_S:
                return
            self._last_event[user] = now
            self._unreported[user] = 0
        kind, _, name = user.partition(":")
        log.warning(
            "permission violation by %s: %s %s (%d since the last report)",
            user,
            violation.operation,
            violation.subject,
            count,
        )
        self.emit(
            SecurityViolation(
                user=user,
                operation=violation.operation,
                subject=violation.subject,
                count=count,
                gateway_id=name if kind == "gateway" else None,
            )
        )

    def _name(self, public_key: str) -> str:
        name = self._names.get(public_key)
        if name is None:
            name = self._names[public_key] = self.authority.user_named(public_key)
        return name
