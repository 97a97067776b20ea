"""ReconcileDriver: drives reconciliation for the DistributorActor, which owns it.

The rules are pure (actors/reconciliation.py, `Reconciler`); this class feeds them what
the distributor learns and carries out their decisions. Reconciliation is level-triggered:
a gateway is checked (`Reconciler.check`, whose table says when it is pushed) for every
type with a desired version when its status or reported versions change, when a
distribution that targeted it ends, when its cooldown after timed-out pushes ends, and
every gateway is checked for a type when a distribution of that type starts (desired
state changed).

A push is a targeted distribution (origin "reconcile") of the desired version with that
version's stored content: no new version, desired state untouched. It goes through its
type's FIFO like any distribution (the `Desk`, the distributor's queue side), so it never
races one; and none is created for a gateway that a distribution of that type targets
(running or queued), while a distribution of that type waits to start (its start changes
desired state and brings a recheck), or while another reconciliation for that gateway is
in flight (one per gateway). A reconciliation still waiting in its queue takes in the next
gateways needing the same version, so a mass rejoin makes few distributions. While the
head of a type's queue holds it (a rollout scheduled or paused), the reconciliations
right behind it run alongside it, so gateways it does not target keep getting their
desired version. Nor is a gateway pushed a desired version whose distribution was
aborted (unless an operator asks: `P.api.reconcile`).

`[orchestrator] ha_enabled = false` turns automatic reconciliation off; `P.api.reconcile`
(an operator's request, which also re-pushes a version the gateway rejected and skips the
cooldown) works either way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import pykka

from actors.base import safe_tell
from actors.messages import ReconcileDue
from actors.reconciliation import Desired, Outcome, Reconciler, Resync
from bus.jetstream import KvError
from bus.runtime import Bus
from schemas.api import Distribution, GatewaySnapshot, ReconcileReply
from schemas.events import Event, Reconciliation, utc_now

log = logging.getLogger(__name__)


class Desk(Protocol):
    """What the driver needs of the distributor's queue side."""

    def queued(self, config_type: str) -> Sequence[Distribution]:
        """The distributions of a type in queue order; the first one may be running."""
        ...

    def record(self, dist_id: str) -> Distribution | None:
        """A distribution's record (None: not kept, or no such one)."""
        ...

    def reconcile_with(self, resync: Resync, joining: Distribution | None) -> str | None:
        """Pushes `resync`: joins `joining` (a reconciliation waiting for that version, if
        it has not started) or creates one; its id, or None when that version's content is lost. Raises KvError
        when the store cannot take it (nothing is pushed then)."""
        ...


class ReconcileDriver:
    def __init__(
        self,
        desk: Desk,
        *,
        bus: Bus,
        me: pykka.ActorRef[Any],
        emit: Callable[[Event], None],
        clock: Callable[[], float],
        auto: bool,
        cooldown_s: float,
    ) -> None:
        self.desk = desk
        self.bus = bus
        self.me = me
        self.emit = emit
        self.clock = clock
        self.auto = auto
        self.reconciler = Reconciler(cooldown_s=cooldown_s)
        self.in_flight: dict[str, set[str]] = {}  # gateway -> reconciliations in flight

    @property
    def active(self) -> dict[str, bool]:
        """Every known gateway -> whether it is active (what targets resolve on)."""
        return self.reconciler.active

    # What the distributor learns ----------------------------------------------------------

    def set_desired(self, config_type: str, gateway_id: str | None, desired: Desired) -> None:
        self.reconciler.set_desired(config_type, gateway_id, desired)

    def desired_versions(self) -> set[tuple[str, int]]:
        return self.reconciler.desired_versions()

    def on_gateway(self, snapshot: GatewaySnapshot) -> None:
        self.reconciler.on_gateway(snapshot)
        self.check([snapshot.gateway_id])

    def forget(self, gateway_id: str) -> None:
        self.reconciler.forget_gateway(gateway_id)

    def started(self, record: Distribution) -> None:
        """A reconciliation found unfinished at start: it is in flight for its gateways."""
        if record.origin == "reconcile":
            for gw in record.target_gateways:
                self.in_flight.setdefault(gw, set()).add(record.id)

    def learn(self, record: Distribution, gateways: Iterable[str]) -> None:
        """Tells the reconciler the final state in `record` of each of these gateways (an
        acked one runs its version, also if its health gate failed it afterwards)."""
        reconciler, now, at = self.reconciler, self.clock(), utc_now()
        for gw in gateways:
            delivery = record.gateways[gw]
            outcome: Outcome
            if delivery.state == "acked":
                outcome = "acked"
            elif delivery.state == "nacked":
                outcome = "nacked"
            elif delivery.state == "failed" and delivery.attempts:
                outcome = "timed_out"
            else:
                continue  # not final, unhealthy (learnt as acked), skipped, an unknown id
            delay = reconciler.on_outcome(
                gw, record.config_type, record.version, outcome, at=at, now=now
            )
            if delay is not None and self.auto:
                self.bus.call_later(delay, safe_tell, self.me, ReconcileDue(gateway_id=gw))

    def status(self, gateway_id: str) -> str | None:
        """A gateway's status as last reported (None: not known)."""
        return self.reconciler.status(gateway_id)

    def finished(self, record: Distribution) -> None:
        """A distribution ended: its gateways are checked again."""
        if record.origin == "reconcile":
            for gw in record.target_gateways:
                flying = self.in_flight.get(gw, set())
                flying.discard(record.id)
                if not flying:
                    self.in_flight.pop(gw, None)
        self.check(record.target_gateways)

    # Decisions ---------------------------------------------------------------------------

    def check(self, gateways: Iterable[str] | None, config_types: list[str] | None = None) -> None:
        """Automatic reconciliation of these gateways (None: all) for these types (None:
        every type with a desired version)."""
        if not self.auto:
            return
        reconciler, now = self.reconciler, self.clock()
        for gw in sorted(reconciler.gateways if gateways is None else gateways):
            for config_type in config_types or reconciler.config_types(gw):
                busy = self._busy(gw, config_type)
                decision = reconciler.check(gw, config_type, busy=busy, now=now)
                if isinstance(decision, Resync):
                    if decision.push:
                        try:
                            self._push(decision)
                        except KvError as exc:
                            # Checked again at the gateway's next change.
                            log.warning("cannot reconcile %s %s now: %s", gw, config_type, exc)
                    else:
                        log.warning("gateway %s: %s of %s", gw, decision.reason, config_type)
                        self._report(decision, None)

    def request(self, gw: str, config_type: str | None) -> ReconcileReply | str:
        """`P.api.reconcile`: push now, even a version the gateway rejected. The reply, or
        why there is nothing to reconcile (not found)."""
        if gw not in self.reconciler.active:
            return f"no gateway {gw}"
        if config_type is None:
            config_types = self.reconciler.config_types(gw)
        elif self.reconciler.desired(gw, config_type) is None:
            return f"no desired version of {config_type} for {gw}"
        else:
            config_types = [config_type]
        created: list[str] = []
        skipped: dict[str, str] = {}
        now = self.clock()
        for name in config_types:
            busy = self._busy(gw, name, forced=True)
            decision = self.reconciler.check(gw, name, busy=busy, now=now, force=True)
            dist_id, why = None, decision.reason
            if isinstance(decision, Resync) and decision.push:
                reason = f"operator request: {decision.reason}"
                try:
                    dist_id = self._push(dataclasses.replace(decision, reason=reason))
                except KvError as exc:
                    why = f"cannot store it: {exc}"
            if dist_id is None:
                skipped[name] = why
            else:
                created.append(dist_id)
        return ReconcileReply(distributions=created, skipped=skipped)

    def _busy(self, gw: str, config_type: str, *, forced: bool = False) -> str | None:
        """Why the gateway must not be pushed `config_type` now, if it must not."""
        flying = self.in_flight.get(gw)
        if flying and not forced:
            return f"reconciliation {min(flying)} in flight"
        desired = self.reconciler.desired(gw, config_type)
        setter = self.desk.record(desired.distribution_id) if desired else None
        if setter is not None and setter.status == "aborted" and not forced:
            return f"the distribution of its desired version, {setter.id}, was aborted"
        for position, record in enumerate(self.desk.queued(config_type)):
            if gw in record.gateways:
                return f"distribution {record.id} targets it"
            if position and record.origin == "distribute":
                return f"distribution {record.id} of {config_type} waits to start"
        return None

    def _push(self, resync: Resync) -> str | None:
        """Joins the reconciliation waiting in the queue for the same version, or creates one."""
        queue = self.desk.queued(resync.config_type)
        waiting = queue[-1] if len(queue) > 1 else None
        joining = None
        if waiting and waiting.origin == "reconcile" and waiting.version == resync.desired.version:
            joining = waiting
        dist_id = self.desk.reconcile_with(resync, joining)
        if dist_id is None:
            log.error(
                "cannot reconcile %s: the content of %s version %d (%s) is lost",
                resync.gateway_id,
                resync.config_type,
                resync.desired.version,
                resync.desired.distribution_id,
            )
            return None
        self.in_flight.setdefault(resync.gateway_id, set()).add(dist_id)
        log.info(
            "reconciling %s %s with %s: %s",
            resync.gateway_id,
            resync.config_type,
            dist_id,
            resync.reason,
        )
        self._report(resync, dist_id)
        return dist_id

    def _report(self, resync: Resync, dist_id: str | None) -> None:
        self.emit(
            Reconciliation(
                gateway_id=resync.gateway_id,
                config_type=resync.config_type,
                desired_version=resync.desired.version,
                reported_version=resync.reported,
                distribution_id=dist_id,
                reason=resync.reason,
            )
        )
