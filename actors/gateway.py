"""GatewayActor: one per gateway; owns that gateway's health.

Owns: a HealthTracker (metrics, score, status with hysteresis), its enrolment with the
prober (bus/probes.py sends `P.gw.<id>.ping` for every gateway over one reply inbox; it
is paused while the gateway is down) and its staleness timer (on the runtime's timer
wheel; replaced by every batch of heartbeats, so it fires only for a silent gateway, and
a missed heartbeat counts only if gatefleet could have seen it: bus/awareness.py).

Its heartbeats come through its route at the bus edge (actors/routes.py), which is its
subscription to `P.gw.<id>.heartbeat`: the edge
decodes and checks each one and puts it, with its arrival time, in the actor's
`Coalescer`, telling it `HeartbeatsPending` only when no such message is already on its
way. The actor takes every heartbeat waiting when it runs and hands them to its tracker
as one batch (actors/health.py, "Batches"). At steady rates a batch holds one heartbeat;
when the actor falls behind, one wake-up, one health evaluation and one update to the
load balancer serve many heartbeats, so the cost of a thread wake-up is paid per batch.
Receives: HeartbeatsPending, Tick, ProbeAnswered, SetThreshold.
Emits: gateway.status_changed, gateway.down, gateway.recovered; tells the load balancer
GatewayUpdated after every batch of accepted heartbeats (through its latest lane: it keeps
only the newest snapshot of each gateway), and the supervisor and the distributor on a
change of status or of the config versions the gateway reports (what reconciliation acts
on).
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

import pykka

from actors.base import SafeActor, safe_tell, tell_latest
from actors.coalescer import Coalescer
from actors.context import Context
from actors.health import CHECK_SLACK_S, HealthTracker, Transition
from actors.messages import (
    Arrival,
    FlapCheck,
    GatewayUpdated,
    HeartbeatsPending,
    ProbeAnswered,
    SetMaintenance,
    SetThreshold,
    Tick,
)
from bus.awareness import LocalAwareness
from bus.log_throttle import held_back
from bus.timers import TimerHandle
from schemas.events import (
    GatewayDown,
    GatewayFlapping,
    GatewayMaintenance,
    GatewayRecovered,
    GatewayStatusChanged,
)
from schemas.settings import GatewayEntry

log = logging.getLogger(__name__)


class GatewayActor(SafeActor):
    dispatch = "gateways"  # one pool of worker threads runs them all

    def __init__(
        self,
        context: Context,
        entry: GatewayEntry,
        *,
        threshold: float,
        pending: Coalescer[Arrival],
        load_balancer: pykka.ActorRef[Any],
        supervisor: pykka.ActorRef[Any],
        distributor: pykka.ActorRef[Any],
        maintenance: SetMaintenance | None = None,
    ) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "gateway"))
        self.parent = supervisor
        self.supervision_key = entry.id
        self.ctx = context
        self.bus = context.bus
        self.gateway_id = entry.id
        self.tracker = HealthTracker(
            entry.id,
            region=entry.region,
            role=entry.role,
            backup_for=entry.backup_for,
            settings=context.settings.health,
            threshold=threshold,
        )
        if maintenance is not None:  # from its first snapshot on (a restart's, or a restored one)
            self.tracker.set_maintenance(maintenance.enabled, maintenance.reason)
        self.load_balancer = load_balancer
        self.supervisor = supervisor
        self.distributor = distributor
        self._pending = pending
        self._tick: TimerHandle | None = None
        self._tick_at: float | None = None
        self._tick_generation = 0
        self._flap_check: TimerHandle | None = None
        # Read through a proxy by tests (how much coalescing saved): heartbeats accepted,
        # and the wake-ups that took them (<= heartbeats_accepted).
        self.heartbeats_accepted = 0
        self.heartbeat_batches = 0

    def on_start(self) -> None:
        prober = self.ctx.runtime.prober
        if prober is not None:
            ref = self.actor_ref

            def on_probe(rtt_ms: float | None, reason: str | None) -> None:
                safe_tell(ref, ProbeAnswered(rtt_ms=rtt_ms, error=reason))

            prober.enroll(self.gateway_id, on_probe)
            prober.pause(self.gateway_id)  # until it is up: heartbeats say when
        if len(self._pending):
            self._on_heartbeats()  # the first heartbeat, from discovery (or a restart's)
        if self.tracker.status == "unknown":
            self._tell_listeners(self.tracker.status)

    def on_stop(self) -> None:
        for timer in (self._tick, self._flap_check):
            if timer is not None:
                timer.cancel()
        if self.ctx.runtime.prober is not None:
            self.ctx.runtime.prober.withdraw(self.gateway_id)

    def handle(self, message: Any) -> Any:
        match message:
            case HeartbeatsPending():
                self._on_heartbeats()
            case Tick(generation=generation, seen_at=seen_at):
                if generation == self._tick_generation:
                    self._tick = self._tick_at = None
                    try:
                        if len(self._pending):  # heartbeats that beat the tick count
                            self._on_heartbeats()
                        self._check(seen_at)
                    finally:  # whatever happened, detection goes on (or is parked)
                        if self._tick_at is None:
                            self._schedule_tick()
            case ProbeAnswered(rtt_ms=rtt_ms, error=error):
                if rtt_ms is None:
                    log.debug("probe of %s failed: %s", self.gateway_id, error)
                    self._apply(self.tracker.on_probe_failed())
                else:
                    self._apply(self.tracker.on_probe_ok(rtt_ms))
            case SetThreshold(threshold=threshold):
                self._apply(self.tracker.set_threshold(threshold))
            case SetMaintenance(enabled=enabled, reason=reason):
                if self.tracker.set_maintenance(enabled, reason):
                    self._maintenance_changed()
                    self._tell_listeners(self.tracker.status)
            case FlapCheck():
                self._flap_check = None
                if self.tracker.flaps.on_check(self.ctx.clock()):
                    self._flapping_changed()
                    self._tell_listeners(self.tracker.status)
                else:
                    self._plan_flap_check()  # the timer fired early
            case _:
                return super().handle(message)
        return None

    def _on_heartbeats(self) -> None:
        """Every heartbeat waiting in the Coalescer, as one batch."""
        batch = self._pending.take()
        if not batch:
            return
        tracker = self.tracker
        previous_versions = tracker.config_versions
        outcome = tracker.on_heartbeats(batch, self.ctx.clock(), datetime.now(UTC))
        for rejection in outcome.rejected:
            subject = self.ctx.subjects.heartbeat(self.gateway_id)
            self.ctx.drops.drop(rejection.reason, subject, f"seq {rejection.seq}")
        if not outcome.accepted:
            return
        self.heartbeats_accepted += outcome.accepted
        self.heartbeat_batches += 1
        if outcome.back_in_service:
            self._maintenance_changed()
        if outcome.transition is None:
            versions_changed = tracker.config_versions != previous_versions
            everyone = versions_changed or outcome.back_in_service
            self._tell_listeners(tracker.status, everyone=everyone)
        else:
            self._apply(outcome.transition)
        self._schedule_tick(rearm=True)

    def _apply(self, transition: Transition | None) -> None:
        """Publishes a status change and tells the load balancer and supervisor."""
        if transition is None:
            return
        old, new = transition.old_status, transition.new_status
        emit = self.ctx.emit
        emit(
            GatewayStatusChanged(
                gateway_id=self.gateway_id,
                old_status=old,
                new_status=new,
                score=transition.score,
                reason=transition.reason,
            )
        )
        if new == "down":
            emit(
                GatewayDown(
                    gateway_id=self.gateway_id,
                    missed_heartbeats=self.tracker.missed_heartbeats,
                    reason=transition.reason,
                )
            )
        elif old == "down" and new == "healthy":
            emit(GatewayRecovered(gateway_id=self.gateway_id, score=transition.score))
        if self.tracker.flaps.on_change(old, new, self.ctx.clock()):
            self._flapping_changed()
        self._plan_flap_check()
        # Down and back are news at any fleet size; healthy <-> degraded is routine at
        # thousands of gateways (the events record every one of them).
        level = logging.INFO if "down" in (old, new) else logging.DEBUG
        log.log(
            level,
            "gateway %s: %s -> %s (score %.1f, %s)",
            self.gateway_id,
            old,
            new,
            transition.score,
            transition.reason,
        )
        self._tell_listeners(old)
        prober = self.ctx.runtime.prober
        if prober is not None and (new in ("unknown", "down")) != (old in ("unknown", "down")):
            # Nothing to measure while it is down: heartbeats say when it is back.
            if new in ("unknown", "down"):
                prober.pause(self.gateway_id)
            else:
                prober.resume(self.gateway_id)

    def _maintenance_changed(self) -> None:
        tracker = self.tracker
        log.info(
            "gateway %s %s",
            self.gateway_id,
            f"in maintenance ({tracker.maintenance_reason or 'no reason given'})"
            if tracker.maintenance
            else "back in service after maintenance",
        )
        self.ctx.emit(
            GatewayMaintenance(
                gateway_id=self.gateway_id,
                enabled=tracker.maintenance,
                reason=tracker.maintenance_reason,
            )
        )

    def _flapping_changed(self) -> None:
        flaps = self.tracker.flaps
        verb = "is flapping" if flaps.flapping else "stopped flapping"
        held = self.ctx.per_gateway_log.admit(verb)
        if held is not None:
            log.warning("gateway %s %s%s", self.gateway_id, verb, held_back(held))
        self.ctx.emit(
            GatewayFlapping(
                gateway_id=self.gateway_id,
                flapping=flaps.flapping,
                changes=flaps.threshold,
                window_s=flaps.window_s,
            )
        )

    def _plan_flap_check(self) -> None:
        """A flapping gateway that is healthy is checked when its hold would end."""
        if self._flap_check is not None:
            self._flap_check.cancel()
            self._flap_check = None
        end = self.tracker.flaps.ends_at()
        if end is not None:
            delay = max(0.0, end - self.ctx.clock()) + CHECK_SLACK_S
            self._flap_check = self.ctx.runtime.timers.schedule(
                delay, safe_tell, self.actor_ref, FlapCheck()
            )

    def _tell_listeners(self, old_status: Any, *, everyone: bool = True) -> None:
        """The load balancer hears every update, through its latest lane (it keeps only the
        newest snapshot of each gateway); the supervisor and distributor, each change, in
        order, when `everyone`."""
        update = GatewayUpdated(snapshot=self.tracker.snapshot(), old_status=old_status)
        tell_latest(self.load_balancer, self.gateway_id, update)
        if everyone:
            safe_tell(self.supervisor, update)
            safe_tell(self.distributor, update)

    def _check(self, seen_at: float | None) -> None:
        """A tick: count missed heartbeats at `seen_at`, when it fell due, unless gatefleet
        could not see then (local health awareness: disconnected or lagging; the date is
        the loop's, however late this runs); then check again later."""
        awareness = self.ctx.runtime.awareness
        if seen_at is None:
            # Parked until gatefleet sees again (a fleet's timers polling through a long
            # suspension would add to the very overload that caused it).
            generation = self._replace_tick(math.inf)
            if not awareness.park(_tell_tick, self.actor_ref, generation, awareness):
                self._arm(self.ctx.clock())  # it sees again already
            return
        since = awareness.snapshot.detection_floor
        self._apply(self.tracker.on_tick(seen_at, since=since))
        self._schedule_tick()

    def _schedule_tick(self, *, rearm: bool = False) -> None:
        """Plans the next staleness check. After heartbeats (`rearm`) the pending check is
        replaced by a later one, so a gateway that keeps beating is never ticked at all."""
        since = self.ctx.runtime.awareness.snapshot.detection_floor
        at = self.tracker.next_check_at(self.ctx.clock(), since=since)
        if at is None:
            return
        if self._tick_at is not None and self._tick_at <= at and not rearm:
            return  # an earlier check will re-plan
        self._arm(at)

    def _arm(self, at: float) -> None:
        generation = self._replace_tick(at)
        delay = max(0.0, at - self.ctx.clock())
        runtime = self.ctx.runtime
        self._tick = runtime.timers.schedule(
            delay, _tell_tick, self.actor_ref, generation, runtime.awareness
        )

    def _replace_tick(self, at: float) -> int:
        """Cancels the planned check; the generation of the one due `at` (Ticks of older
        ones are ignored)."""
        if self._tick is not None:
            self._tick.cancel()
        self._tick = None
        self._tick_at = at
        self._tick_generation += 1
        return self._tick_generation


def _tell_tick(ref: pykka.ActorRef[Any], generation: int, awareness: LocalAwareness) -> None:
    """On the loop, when a check falls due (or, parked, when gatefleet sees again): its
    Tick, dated now if gatefleet sees now."""
    safe_tell(ref, Tick(generation=generation, seen_at=awareness.now_if_seeing()))
