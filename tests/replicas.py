"""Lease holders on a test cluster, each on a connection of its own, and a watch that
would catch two of them acting as leader at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from bus.leadership import Lease, LeaseTerms, LeaseView
from bus.lease import LeaseKeeper, lease_bucket
from bus.runtime import Bus

PREFIX = "gf"


class Holder:
    """One replica's lease, kept on its own connection to the cluster."""

    def __init__(
        self,
        url: str,
        replica_id: str,
        lease_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        replicas: int = 3,
    ) -> None:
        self.bus = Bus(url, name=replica_id, use_uvloop=False)
        self.lease = Lease(replica_id, LeaseTerms(lease_s), clock=clock)
        # (time.monotonic(), view) of each change: one clock for every holder of a test.
        self.changes: list[tuple[float, LeaseView]] = []
        self.lease.on_change(lambda view: self.changes.append((time.monotonic(), view)))
        self.bus.start()
        self.keeper = LeaseKeeper(self.bus, lease_bucket(self.bus, PREFIX, replicas), self.lease)
        self.keeper.start()

    def became(self, role: str) -> float | None:
        """When it last took `role`, if it did."""
        return next((at for at, view in reversed(self.changes) if view.role == role), None)

    def stepped_down(self) -> float | None:
        """When it first stopped leading, if it did."""
        led = False
        for at, view in self.changes:
            if led and view.role == "standby":
                return at
            led = led or view.role == "leader"
        return None

    def close(self) -> None:
        self.keeper.stop()
        self.bus.stop()


class LeaderWatch:
    """Samples every holder's still_leader() every millisecond or so, in a thread:
    remembers any moment when more than one said yes."""

    def __init__(self, holders: Iterable[Holder]) -> None:
        self.holders = list(holders)
        self.overlaps: list[tuple[float, list[str]]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-watch", daemon=True)
        self._thread.start()

    def add(self, holder: Holder) -> None:
        self.holders = [*self.holders, holder]

    def leaders(self) -> list[str]:
        return [h.lease.replica_id for h in self.holders if h.lease.still_leader()]

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            leaders = self.leaders()
            self.samples += 1
            if len(leaders) > 1:
                self.overlaps.append((time.monotonic(), leaders))

    def stop(self) -> None:
        # A test can be over in a few dozen samples on a loaded machine: the watch goes
        # on until it has taken 100, so that one that hardly ran is told from a short test.
        deadline = time.monotonic() + 5.0
        while self.samples <= 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(5)
        assert self.samples > 100, "the watch hardly ran"
        assert self.overlaps == [], f"two leaders at once: {self.overlaps[:5]}"
