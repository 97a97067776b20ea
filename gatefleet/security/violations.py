"""Permission violations made visible: counted per user, and `security.violation` events.

NATS tells only the offending client and its own log, so for the embedded server
gatefleet reads them from the server's log (bus.server.Violation). Counts are for
`status` and `/metrics`; events are rate-limited per user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from bus.edge import Tally
from bus.log_throttle import LogThrottle
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
        self._throttle = LogThrottle(EVENT_EVERY_S, clock)
        self._names: dict[str, str] = {}

    def __call__(self, violation: Violation) -> None:
        user = self._name(violation.user)
        self.counts.add(user)
        held = self._throttle.admit(user)
        if held is None:
            return
        count = held + 1  # this one and those not reported since the last report
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
