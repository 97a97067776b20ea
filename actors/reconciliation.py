"""Configuration consistency: which gateway to push its desired configuration again. Pure.

No threads, no I/O, no clock of its own (callers pass `now`, a monotonic time). The
DistributorActor owns one `Reconciler` (through its ReconcileDriver), tells it what it learns (desired versions as
distributions start, gateways' snapshots, every gateway's outcome in every distribution)
and asks `check(gateway, config_type)` whenever something that decides it may have
changed: the check is level-triggered, so it holds no memory of earlier checks beyond
what is listed below.

Desired: a gateway's desired version of a type is the higher of the fleet's (`<type>` in
the `desired` bucket) and its own (`<type>.<gateway_id>`); schemas/stored.py.

Running: the version a gateway runs is what its last heartbeat reported, unless a
distribution's ack reached the distributor after that heartbeat was received: heartbeats
lag behind acks. A heartbeat received after the ack was sent after it (one gateway
connection is ordered), so it wins again; that is how a gateway restarted on an older
configuration shows.

`check(gateway, type)`, in this order:

| condition                                              | result                        |
|--------------------------------------------------------|-------------------------------|
| no desired version of that type for the gateway        | Skip                          |
| gateway not active (healthy or degraded)               | Skip                          |
| gateway in maintenance (until it is back in service)   | Skip                          |
| it runs the desired version or a newer one             | Skip (in sync)                |
| `busy`: the distributor's reason not to push now       | Skip (rechecked when it ends) |
| it nacked exactly the desired version                  | Resync(push=False) once per   |
|                                                        | version, then Skip            |
| its last push timed out and its cooldown is not over   | Skip                          |
| otherwise                                              | Resync(push=True)             |

`force` (an operator's request) passes the nack and cooldown rows. A nack is forgotten
once the gateway acks that same version (pushed on request); a newer desired version makes
it irrelevant. A gateway whose push timed out (every attempt of a distribution) waits
`cooldown_s`, doubled per further timeout up to `max_cooldown_s`, before it is pushed
again; an ack, or coming back from down (or unknown), clears that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from schemas.api import GatewaySnapshot

ACTIVE_GATEWAY_STATUSES = frozenset({"healthy", "degraded"})
MAX_COOLDOWN_S = 300.0


@dataclass(frozen=True, slots=True)
class Desired:
    version: int
    distribution_id: str  # the distribution that set it: its stored spec holds the content


@dataclass(frozen=True, slots=True)
class Resync:
    """A gateway off its desired version: `push` it that version again (a targeted
    distribution of that version's content), or, when it rejected that very version,
    only report it out of sync (once per version)."""

    gateway_id: str
    config_type: str
    desired: Desired
    reported: int | None
    reason: str
    push: bool


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str


Decision = Resync | Skip
Outcome = Literal["acked", "nacked", "timed_out"]


@dataclass(slots=True)
class _Gateway:
    status: str = "unknown"
    versions: dict[str, int] = field(default_factory=dict)
    last_seen: datetime | None = None
    # Acks learnt after the last heartbeat was received: config type -> (version, when).
    acked: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    timeouts: int = 0
    cooling_until: float = 0.0
    maintenance: bool = False


class Reconciler:
    def __init__(self, *, cooldown_s: float, max_cooldown_s: float = MAX_COOLDOWN_S) -> None:
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(max_cooldown_s, cooldown_s)
        # Every known gateway -> whether it is active (what distribution targets resolve on).
        self.active: dict[str, bool] = {}
        self._gateways: dict[str, _Gateway] = {}
        self._fleet: dict[str, Desired] = {}
        self._own: dict[str, dict[str, Desired]] = {}  # gateway -> type -> desired
        self._nacked: dict[tuple[str, str], int] = {}  # (gateway, type) -> version
        # (gateway, type) -> the rejected version it was last reported out of sync for.
        self._reported: dict[tuple[str, str], int] = {}

    # What it learns ---------------------------------------------------------------------

    def set_desired(self, config_type: str, gateway_id: str | None, desired: Desired) -> None:
        """The fleet's desired version of a type (`gateway_id` None), or one gateway's."""
        if gateway_id is None:
            self._fleet[config_type] = desired
        else:
            self._own.setdefault(gateway_id, {})[config_type] = desired

    def on_gateway(self, snapshot: GatewaySnapshot) -> None:
        """A gateway's status or reported versions changed."""
        gw = self._gateways.setdefault(snapshot.gateway_id, _Gateway())
        active = snapshot.status in ACTIVE_GATEWAY_STATUSES
        if active and gw.status not in ACTIVE_GATEWAY_STATUSES:
            gw.timeouts, gw.cooling_until = 0, 0.0  # back from a failure: try it at once
        gw.status = snapshot.status
        gw.maintenance = snapshot.maintenance
        gw.versions = dict(snapshot.config_versions)
        gw.last_seen = snapshot.last_seen
        if snapshot.last_seen is not None:
            seen = snapshot.last_seen
            gw.acked = {t: ack for t, ack in gw.acked.items() if ack[1] >= seen}
        self.active[snapshot.gateway_id] = active

    def forget_gateway(self, gateway_id: str) -> None:
        """It left: its live view goes (what it rejected stays, as it would across a restart)."""
        self._gateways.pop(gateway_id, None)
        self.active.pop(gateway_id, None)

    def on_outcome(
        self,
        gateway_id: str,
        config_type: str,
        version: int,
        outcome: Outcome,
        *,
        at: datetime,
        now: float,
    ) -> float | None:
        """A gateway's final state in a distribution; for a timeout, the cooldown it starts."""
        gw = self._gateways.get(gateway_id)
        key = (gateway_id, config_type)
        if outcome == "nacked":
            self._nacked[key] = version
            return None
        if outcome == "acked":
            if self._nacked.get(key) == version:
                del self._nacked[key]
            if gw is not None:
                gw.acked[config_type] = (version, at)
                gw.timeouts, gw.cooling_until = 0, 0.0
            return None
        if gw is None:
            return None
        delay = min(self.cooldown_s * (1 << min(gw.timeouts, 20)), self.max_cooldown_s)
        gw.timeouts += 1
        gw.cooling_until = now + delay
        return delay

    # What it tells ---------------------------------------------------------------------

    @property
    def gateways(self) -> Iterable[str]:
        return self._gateways.keys()

    def fleet_desired(self, config_type: str) -> Desired | None:
        """The fleet's desired version of a type (`<type>` in the desired bucket)."""
        return self._fleet.get(config_type)

    def desired(self, gateway_id: str, config_type: str) -> Desired | None:
        fleet = self._fleet.get(config_type)
        own = self._own.get(gateway_id, {}).get(config_type)
        if fleet is None or own is None:
            return fleet or own
        return own if own.version > fleet.version else fleet

    def desired_versions(self) -> set[tuple[str, int]]:
        """Every (type, version) some gateway should run (its content is needed)."""
        found = {(config_type, d.version) for config_type, d in self._fleet.items()}
        for own in self._own.values():
            for config_type, d in own.items():
                fleet = self._fleet.get(config_type)
                if fleet is None or d.version > fleet.version:
                    found.add((config_type, d.version))
        return found

    def config_types(self, gateway_id: str) -> list[str]:
        """The types with a desired version for this gateway."""
        return sorted(self._fleet.keys() | self._own.get(gateway_id, {}).keys())

    def status(self, gateway_id: str) -> str | None:
        gw = self._gateways.get(gateway_id)
        return None if gw is None else gw.status

    def running(self, gateway_id: str, config_type: str) -> int | None:
        gw = self._gateways.get(gateway_id)
        if gw is None:
            return None
        ack = gw.acked.get(config_type)
        return ack[0] if ack is not None else gw.versions.get(config_type)

    def check(
        self,
        gateway_id: str,
        config_type: str,
        *,
        busy: str | None,
        now: float,
        force: bool = False,
    ) -> Decision:
        desired = self.desired(gateway_id, config_type)
        if desired is None:
            return Skip(f"no desired version of {config_type}")
        gw = self._gateways.get(gateway_id)
        if gw is None or gw.status not in ACTIVE_GATEWAY_STATUSES:
            return Skip(f"gateway is {gw.status if gw else 'not known'}")
        if gw.maintenance:
            return Skip("gateway in maintenance")
        running = self.running(gateway_id, config_type)
        if running is not None and running >= desired.version:
            return Skip(f"in sync: runs version {running}, desired {desired.version}")
        if busy is not None:
            return Skip(busy)
        if not force and self._nacked.get((gateway_id, config_type)) == desired.version:
            reason = f"out of sync: rejected version {desired.version}"
            key = (gateway_id, config_type)
            if self._reported.get(key) == desired.version:
                return Skip(reason)
            self._reported[key] = desired.version
            return Resync(gateway_id, config_type, desired, running, reason, push=False)
        if not force and now < gw.cooling_until:
            return Skip(f"cooling down after {gw.timeouts} timed-out pushes")
        shown = "nothing" if running is None else str(running)
        reason = f"reported {shown}, desired {desired.version}"
        return Resync(gateway_id, config_type, desired, running, reason, push=True)
