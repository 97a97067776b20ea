"""GatewayActor: one per gateway; owns that gateway's health.

Owns: a HealthTracker (metrics, score, status with hysteresis), the probe timer
(`P.gw.<id>.ping`) and the staleness timer. Its heartbeats come through its route at the
bus edge (actors/routes.py), which is its subscription to `P.gw.<id>.heartbeat`: the edge
decodes and checks each one and puts it, with its arrival time, in the actor's
`Coalescer`, telling it `HeartbeatsPending` only when no such message is already on its
way. The actor takes every heartbeat waiting when it runs and hands them to its tracker
as one batch (actors/health.py, "Batches"). At steady rates a batch holds one heartbeat;
when the actor falls behind, one wake-up, one health evaluation and one update to the
load balancer serve many heartbeats, so the cost of a thread wake-up is paid per batch.
Receives: HeartbeatsPending, Tick, ProbeDue, ProbeAnswered, SetThreshold.
Emits: gateway.status_changed, gateway.down, gateway.recovered; tells the load balancer
GatewayUpdated after every batch of accepted heartbeats (through its latest lane: it keeps
only the newest snapshot of each gateway), and the supervisor and the distributor on a
change of status or of the config versions the gateway reports (what reconciliation acts
on).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import pykka

from actors.base import SafeActor, safe_tell, tell_latest
from actors.coalescer import Coalescer
from actors.context import Context
from actors.health import HealthTracker, Transition
from actors.messages import (
    Arrival,
    GatewayUpdated,
    HeartbeatsPending,
    ProbeAnswered,
    ProbeDue,
    SetThreshold,
    Tick,
)
from bus.runtime import Reply, RequestFailed
from schemas.codec import DecodeError, decode
from schemas.events import GatewayDown, GatewayRecovered, GatewayStatusChanged
from schemas.settings import GatewayEntry
from schemas.wire import Ping, Pong

log = logging.getLogger(__name__)

PROBE = Ping()  # the body of every probe request: `{}`


class GatewayActor(SafeActor):
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
    ) -> None:
        super().__init__()
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
        self.load_balancer = load_balancer
        self.supervisor = supervisor
        self.distributor = distributor
        self._pending = pending
        self._tick_at: float | None = None
        self._tick_generation = 0
        # Read through a proxy by tests (how much coalescing saved): heartbeats accepted,
        # and the wake-ups that took them (<= heartbeats_accepted).
        self.heartbeats_accepted = 0
        self.heartbeat_batches = 0

    def on_start(self) -> None:
        if len(self._pending):
            self._on_heartbeats()  # the first heartbeat, from discovery (or a restart's)
        if self.tracker.status == "unknown":
            self._tell_listeners(self.tracker.status)
        if self.ctx.settings.health.probe_interval_ms:
            self._schedule_probe()

    def handle(self, message: Any) -> Any:
        match message:
            case HeartbeatsPending():
                self._on_heartbeats()
            case Tick(generation=generation):
                if generation == self._tick_generation:
                    self._tick_at = None
                    if len(self._pending):  # heartbeats that beat the tick to the loop count
                        self._on_heartbeats()
                    self._apply(self.tracker.on_tick(self.ctx.clock()))
                    self._schedule_tick()
            case ProbeDue():
                self._probe()
            case ProbeAnswered(rtt_ms=rtt_ms, error=error):
                if rtt_ms is None:
                    log.debug("probe of %s failed: %s", self.gateway_id, error)
                    self._apply(self.tracker.on_probe_failed())
                else:
                    self._apply(self.tracker.on_probe_ok(rtt_ms))
                self._schedule_probe()
            case SetThreshold(threshold=threshold):
                self._apply(self.tracker.set_threshold(threshold))
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
            if rejection.duplicate:
                continue  # the same message seen twice around registration: not a replay
            subject = self.ctx.subjects.heartbeat(self.gateway_id)
            self.ctx.drops.drop(rejection.reason, subject, f"seq {rejection.seq}")
        if not outcome.accepted:
            return
        self.heartbeats_accepted += outcome.accepted
        self.heartbeat_batches += 1
        if outcome.transition is None:
            versions_changed = tracker.config_versions != previous_versions
            self._tell_listeners(tracker.status, everyone=versions_changed)
        else:
            self._apply(outcome.transition)
        self._schedule_tick()

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
        log.info(
            "gateway %s: %s -> %s (score %.1f, %s)",
            self.gateway_id,
            old,
            new,
            transition.score,
            transition.reason,
        )
        self._tell_listeners(old)

    def _tell_listeners(self, old_status: Any, *, everyone: bool = True) -> None:
        """The load balancer hears every update, through its latest lane (it keeps only the
        newest snapshot of each gateway); the supervisor and distributor, each change, in
        order, when `everyone`."""
        update = GatewayUpdated(snapshot=self.tracker.snapshot(), old_status=old_status)
        tell_latest(self.load_balancer, self.gateway_id, update)
        if everyone:
            safe_tell(self.supervisor, update)
            safe_tell(self.distributor, update)

    def _schedule_tick(self) -> None:
        now = self.ctx.clock()
        at = self.tracker.next_check_at(now)
        if at is None or (self._tick_at is not None and self._tick_at <= at):
            return  # nothing to watch, or an earlier tick will re-plan
        self._tick_at = at
        self._tick_generation += 1
        self.bus.call_later(
            max(0.0, at - now), safe_tell, self.actor_ref, Tick(generation=self._tick_generation)
        )

    def _schedule_probe(self) -> None:
        delay = self.ctx.settings.health.probe_interval_ms / 1000
        self.bus.call_later(delay, safe_tell, self.actor_ref, ProbeDue())

    def _probe(self) -> None:
        if self.tracker.status in ("unknown", "down"):
            self._schedule_probe()  # nothing to measure; heartbeats decide when it is back
            return
        ref, gateway_id = self.actor_ref, self.gateway_id
        started = time.monotonic()

        def on_result(result: Reply | RequestFailed) -> None:
            if isinstance(result, RequestFailed):
                safe_tell(ref, ProbeAnswered(rtt_ms=None, error=result.reason))
                return
            rtt_ms = (time.monotonic() - started) * 1000
            try:
                pong = decode(result.data, Pong)
            except DecodeError as exc:
                safe_tell(ref, ProbeAnswered(rtt_ms=None, error=f"bad pong: {exc}"))
                return
            if pong.gateway_id != gateway_id:
                safe_tell(ref, ProbeAnswered(rtt_ms=None, error=f"pong from {pong.gateway_id}"))
                return
            safe_tell(ref, ProbeAnswered(rtt_ms=rtt_ms))

        timeout = self.ctx.settings.health.probe_timeout_ms / 1000
        self.bus.request(self.ctx.subjects.ping(gateway_id), PROBE, timeout, on_result)
