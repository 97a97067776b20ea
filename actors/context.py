"""What every actor is given at start: the bus facade, subjects, settings and sinks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.histogram import SELECTION_BOUNDS_S, PerStrategy
from actors.runtime import Runtime
from bus.edge import Drops, Tally
from bus.jetstream import KvStore
from bus.leadership import Lease
from bus.log_throttle import LogThrottle
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.events import Alarm, Event
from schemas.settings import Settings

log = logging.getLogger(__name__)

PER_GATEWAY_LOG_S = 10.0


@dataclass(frozen=True)
class Context:
    bus: Bus
    runtime: Runtime
    subjects: Subjects
    settings: Settings
    emit: Callable[[Event], None]
    # `emit` without the leader's filter: for the events of a distribution step whose
    # record was stored while its replica was losing the lease. The next leader resumes
    # after that step, so no other replica tells them.
    emit_stored: Callable[[Event], None]
    events_lost: Callable[[], int]  # events the stream could not store, since start
    drops: Drops
    buckets: dict[str, KvStore]
    # Which replica leads (issue 16). Only the leader probes, fails over, distributes,
    # reconciles and records gateway.*, ha.* and distribution.* events.
    lease: Lease
    # Selections made, per strategy (LoadBalancer writes, Supervisor reports), and how long
    # each took from the request's arrival to its reply.
    selections: Tally = field(default_factory=Tally)
    selection_latency: PerStrategy = field(default_factory=lambda: PerStrategy(SELECTION_BOUNDS_S))
    # Actors restarted after dying, per kind (parents write, Supervisor reports).
    restarts: Tally = field(default_factory=Tally)
    # Work shed under overload, per kind: "requests" answered unavailable at once,
    # "heartbeats" coalesced away (newest wins).
    shed: Tally = field(default_factory=Tally)
    # Permission violations per user, read from the embedded server's log (issue 14).
    violations: Tally = field(default_factory=Tally)
    # The test credentials (simulator) issued and not revoked, for `status`.
    test_credentials: Callable[[], list[str]] = field(default=list)
    clock: Callable[[], float] = field(default=time.monotonic)
    # Lines a gateway can cause (a gateway starts flapping, ...): at most one per kind in
    # this many seconds, across the fleet (its events keep every one).
    per_gateway_log: LogThrottle = field(default_factory=lambda: LogThrottle(PER_GATEWAY_LOG_S))

    def unreadable(self, what: str, error: Exception, instead: str) -> None:
        """No stored value stops start-up: one that does not read back is logged, alarmed
        (`ha.alarm` kind `bad_stored_value`), and `instead` stands in for it."""
        message = f"stored {what} unreadable ({error}); {instead}"
        log.error("%s", message)
        self.emit(Alarm(kind="bad_stored_value", message=message, active=True))
