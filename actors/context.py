"""What every actor is given at start: the bus facade, subjects, settings and sinks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bus.edge import Drops, Tally
from bus.jetstream import KvStore
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.events import Event
from schemas.settings import Settings


@dataclass(frozen=True)
class Context:
    bus: Bus
    subjects: Subjects
    settings: Settings
    emit: Callable[[Event], None]
    drops: Drops
    buckets: dict[str, KvStore]
    # Selections made, per strategy (LoadBalancer writes, Supervisor reports).
    selections: Tally = field(default_factory=Tally)
    # Actors restarted after dying, per kind (parents write, Supervisor reports).
    restarts: Tally = field(default_factory=Tally)
    clock: Callable[[], float] = field(default=time.monotonic)
