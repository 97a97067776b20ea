"""GatewayActor: one per gateway; owns that gateway's health.

Owns: a HealthTracker (metrics, score, status with hysteresis), the subscription to
`P.gw.<id>.heartbeat`, the probe timer (`P.gw.<id>.ping`) and the staleness timer.
Receives: HeartbeatsPending, HeartbeatReceived (from discovery), Tick, ProbeDue,
ProbeAnswered, SetThreshold.
Emits: gateway.status_changed, gateway.down, gateway.recovered; tells the load balancer
GatewayUpdated after every batch of accepted heartbeats, and every listener on a change
of status or of the config versions the gateway reports (what reconciliation acts on).

Heartbeats are coalesced on the bus loop: the subscription handler decodes and checks
each one and puts it, with its arrival time, in the actor's `Coalescer`; it tells the
actor `HeartbeatsPending` only when no such message is already on its way. The actor
takes every heartbeat waiting when it runs and hands them to its tracker as one batch
(actors/health.py, "Batches"). At steady rates a batch holds one heartbeat; when the
actor falls behind, one wake-up, one health evaluation and one update to the load
balancer serve many heartbeats, so the cost of a thread wake-up is paid per batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pykka

from actors.base import Coalescer, SafeActor, safe_tell, tell_latest
from actors.context import Context
from actors.health import HealthTracker, Transition
from actors.messages import (
    HEARTBEATS_PENDING,
    GatewayUpdated,
    HeartbeatReceived,
    HeartbeatsPending,
    ProbeAnswered,
    ProbeDue,
    SetThreshold,
    Tick,
)
from bus.edge import decode_from_gateway
from bus.runtime import Inbound, Reply, RequestFailed, SubscriptionHandle
from schemas.codec import DecodeError, decode
from schemas.events import GatewayDown, GatewayRecovered, GatewayStatusChanged
from schemas.settings import GatewayEntry
from schemas.wire import Heartbeat, Ping, Pong

log = logging.getLogger(__name__)

PROBE = Ping()  # the body of every probe request: `{}`

# A heartbeat waiting for its actor, with its arrival time on the receiver's monotonic clock.
Arrival = tuple[Heartbeat, float]


def heartbeat_handler(
    gateway_id: str,
    ref: pykka.ActorRef[Any],
    context: Context,
    pending: Coalescer[Arrival],
) -> Callable[[Inbound], None]:
    """The loop-side handler of one gateway's heartbeat subject: decode, check, coalesce."""
    drops = context.drops
    clock = time.monotonic

    def handle(msg: Inbound) -> None:
        heartbeat = decode_from_gateway(msg, Heartbeat, gateway_id, drops)
        if heartbeat is None:
            return
        if pending.put((heartbeat, clock())):
            safe_tell(ref, HEARTBEATS_PENDING)

    return handle


class GatewayActor(SafeActor):
    def __init__(
        self,
        context: Context,
        entry: GatewayEntry,
        *,
        threshold: float,
        listeners: list[pykka.ActorRef[Any]],
        first: HeartbeatReceived | None = None,
        on_subscribed: Any = None,
        parent: pykka.ActorRef[Any] | None = None,
    ) -> None:
        super().__init__()
        self.parent = parent
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
        self.listeners = listeners
        self._first = first
        self._on_subscribed = on_subscribed
        self._subscription: SubscriptionHandle | None = None
        self._pending: Coalescer[Arrival] = Coalescer()
        self._tick_at: float | None = None
        self._tick_generation = 0
        self.heartbeats_accepted = 0
        self.heartbeat_batches = 0  # wake-ups that took heartbeats: <= heartbeats_accepted

    def on_start(self) -> None:
        subject = self.ctx.subjects.heartbeat(self.gateway_id)
        handler = heartbeat_handler(self.gateway_id, self.actor_ref, self.ctx, self._pending)
        self._subscription = self.bus.subscribe(subject, handler)
        if self._on_subscribed is not None:
            self._on_subscribed(self.gateway_id)
        if self._first is not None:
            first, self._first = self._first, None
            self._on_heartbeats(first)
        else:
            self._tell_listeners(self.tracker.status)
        if self.ctx.settings.health.probe_interval_ms:
            self._schedule_probe()

    def on_stop(self) -> None:
        if self._subscription is not None:
            self._subscription.unsubscribe()

    def handle(self, message: Any) -> Any:
        match message:
            case HeartbeatsPending():
                self._on_heartbeats()
            case HeartbeatReceived():  # from discovery, before our own subscription was live
                self._on_heartbeats(message)
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

    def _on_heartbeats(self, discovered: HeartbeatReceived | None = None) -> None:
        """Every heartbeat waiting in the Coalescer (and one from discovery), as one batch."""
        batch = self._pending.take()
        if discovered is not None:  # the older path: merged in arrival order
            batch.append((discovered.heartbeat, discovered.received_at))
            batch.sort(key=_arrival_time)
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
        update = GatewayUpdated(snapshot=self.tracker.snapshot(), old_status=old_status)
        # listeners[0] is the load balancer: every update, through its latest lane (it keeps
        # only the newest snapshot of each gateway). The others want every change, in order.
        listeners = self.listeners
        if listeners:
            tell_latest(listeners[0], self.gateway_id, update)
        if everyone:
            for ref in listeners[1:]:
                safe_tell(ref, update)

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


def _arrival_time(arrival: Arrival) -> float:
    return arrival[1]
