"""SupervisorActor: owns the fleet's membership and the orchestrator's status.

Owns: one GatewayActor per known gateway (spawned from the config file at start or on a
first valid heartbeat), the wildcard subscriptions `P.gw.*.heartbeat|goodbye` that
discover new gateways and hear goodbyes, and `P.gw.*.*.>` that counts malformed subjects
(an id with a dot in it); never `P.gw.>`, which would answer for absent gateways' config
and ping requests and hide their "no responders", and the numbers of `P.api.status`.
Also runs failover (actors/failover.py): a gateway that goes down has its traffic
redirected to a replacement the load balancer picks (`P.redirect.<id>`), recovered
primaries fail back (at once, or on `P.api.failback` when `[ha] failback = "manual"`),
and a mass failure freezes all this. It restarts GatewayActors that die.
Receives: HeartbeatReceived (discovery), GoodbyeReceived, GatewayUpdated (status
changes), LoadBalancingInForce, DistributionCounts, ReplacementFound, ChildDied,
FailbackRequested, GetStatus.
Emits: gateway.registered, gateway.left, ha.failover, ha.failback, ha.alarm.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import pykka

from actors.base import SafeActor, safe_tell
from actors.context import Context
from actors.failover import (
    Action,
    FailoverPlanner,
    FindReplacement,
    GuardChange,
    Hold,
    MassFailureGuard,
    Redirect,
    Release,
)
from actors.gateway import GatewayActor
from actors.messages import (
    AddListener,
    ChildDied,
    DistributionCounts,
    FailbackRequested,
    FindReplacementFor,
    GatewayRemoved,
    GatewayUpdated,
    GetStatus,
    GoodbyeReceived,
    HeartbeatReceived,
    HoldGateway,
    LoadBalancingInForce,
    ReleaseGateway,
    ReplacementFound,
    SetThreshold,
)
from bus.edge import decode_from_gateway, reply_error, request_handler
from bus.runtime import Inbound, SubscriptionHandle
from schemas.api import (
    Empty,
    FailbackReply,
    FailbackRequest,
    GatewaySnapshot,
    LoadBalancingConfig,
    StatusReply,
)
from schemas.events import Alarm, Failback, Failover, GatewayLeft, GatewayRegistered
from schemas.settings import GatewayEntry
from schemas.types import GATEWAY_ID_RE, GatewayStatus
from schemas.wire import Goodbye, Heartbeat
from schemas.wire import Redirect as RedirectNotice

log = logging.getLogger(__name__)

API_QUEUE = "gatefleet-api"


class SupervisorActor(SafeActor):
    def __init__(
        self,
        context: Context,
        load_balancer: pykka.ActorRef[Any],
        distributor: pykka.ActorRef[Any],
    ) -> None:
        super().__init__()
        self.ctx = context
        self.bus = context.bus
        self.load_balancer = load_balancer
        # Hears gateway status changes and removals (it started first, so it misses none).
        self.distributor = distributor
        self.lb_config = LoadBalancingConfig(
            strategy=context.settings.orchestrator.load_balancing_strategy,
            health_threshold=context.settings.orchestrator.health_threshold_percent,
        )
        self.gateways: dict[str, pykka.ActorRef[Any]] = {}
        self.statuses: dict[str, GatewayStatus] = {}
        # Read by the loop-side handler: ids whose own subscription is live. Replaced, never
        # mutated, so the loop always sees a consistent set.
        self.subscribed: frozenset[str] = frozenset()
        self._subscribed_lock = threading.Lock()
        self._subscriptions: list[SubscriptionHandle] = []
        self.distribution_counts = DistributionCounts(active=0, completed=0, failed=0)
        self.entries: dict[str, GatewayEntry] = {}  # latest identity, to restart an actor
        settings = context.settings
        window_ms = settings.ha.detection_window_ms or (
            (settings.health.fall + 1) * settings.health.heartbeat_interval_ms
        )
        self.planner = FailoverPlanner(
            MassFailureGuard(settings.ha.max_failover_percent, window_ms / 1000),
            manual_failback=settings.ha.failback == "manual",
        )

    # Life cycle --------------------------------------------------------------------------

    def on_start(self) -> None:
        self.load_balancer.tell(AddListener(listener=self.actor_ref))
        for entry in self.ctx.settings.gateways:
            self._spawn(entry, first=None, source="config")
        subjects = self.ctx.subjects
        traffic = self._gateway_traffic_handler()
        for pattern in (subjects.all_heartbeats, subjects.all_goodbyes, subjects.malformed_gateway):
            self._subscriptions.append(self.bus.subscribe(pattern, traffic))
        me = self.actor_ref
        status = request_handler(
            self.bus, Empty, lambda _r, to: me.tell(GetStatus(reply=to)), self.ctx.drops
        )
        self._subscriptions.append(
            self.bus.subscribe(subjects.api("status"), status, queue=API_QUEUE)
        )
        failback = request_handler(
            self.bus,
            FailbackRequest,
            lambda r, to: me.tell(FailbackRequested(request=r, reply=to)),
            self.ctx.drops,
        )
        self._subscriptions.append(
            self.bus.subscribe(subjects.api("failback"), failback, queue=API_QUEUE)
        )

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        for ref in self.gateways.values():
            ref.stop(timeout=5)

    def _gateway_traffic_handler(self) -> Any:
        """Loop side of the gateway wildcards: discovery, goodbyes, malformed subjects."""
        prefix = self.ctx.subjects.prefix + ".gw."
        drops, me = self.ctx.drops, self.actor_ref

        def handle(msg: Inbound) -> None:
            gateway_id, _, verb = msg.subject[len(prefix) :].partition(".")
            if verb == "heartbeat" and gateway_id in self.subscribed:
                return  # its GatewayActor's own subscription has it (the common case: first)
            if not GATEWAY_ID_RE.fullmatch(gateway_id) or verb not in ("heartbeat", "goodbye"):
                drops.drop("bad_subject", msg.subject, "not P.gw.<id>.heartbeat|goodbye")
                return
            if verb == "heartbeat":
                heartbeat = decode_from_gateway(msg, Heartbeat, gateway_id, drops)
                if heartbeat is not None:
                    received = HeartbeatReceived(heartbeat=heartbeat, received_at=time.monotonic())
                    safe_tell(me, received)
            elif decode_from_gateway(msg, Goodbye, gateway_id, drops) is not None:
                safe_tell(me, GoodbyeReceived(gateway_id=gateway_id))

        return handle

    # Messages ----------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case HeartbeatReceived(heartbeat=heartbeat):
                ref = self.gateways.get(heartbeat.gateway_id)
                if ref is not None:
                    ref.tell(message)  # arrived before its actor's subscription was live
                else:
                    entry = GatewayEntry(id=heartbeat.gateway_id, region=heartbeat.region)
                    self._spawn(entry, first=message, source="heartbeat")
            case GoodbyeReceived(gateway_id=gateway_id):
                self._remove(gateway_id, "goodbye")
            case GatewayUpdated(snapshot=snapshot):
                self._on_gateway_update(snapshot)
            case ReplacementFound(gateway_id=gateway_id, to=to, reason=reason):
                if self.statuses.get(gateway_id) == "down":  # it may be back already
                    self._act(self.planner.on_replacement(gateway_id, to, reason))
            case FailbackRequested(request=request, reply=reply):
                self._failback(request.gateway_id, reply)
            case ChildDied(kind="GatewayActor", key=gateway_id, error=error):
                self._restart(gateway_id, error)
            case LoadBalancingInForce(config=config):
                if config.health_threshold != self.lb_config.health_threshold:
                    for ref in self.gateways.values():
                        ref.tell(SetThreshold(threshold=config.health_threshold))
                self.lb_config = config
            case DistributionCounts():
                self.distribution_counts = message
            case GetStatus(reply=reply):
                self.bus.publish(reply, self.status())
            case _:
                return super().handle(message)
        return None

    def _on_gateway_update(self, snapshot: GatewaySnapshot) -> None:
        gateway_id = snapshot.gateway_id
        if gateway_id not in self.gateways:
            return  # a late update from a gateway that has left
        old = self.statuses.get(gateway_id, "unknown")
        self.statuses[gateway_id] = snapshot.status
        self.entries[gateway_id] = GatewayEntry(
            id=gateway_id,
            region=snapshot.region,
            role=snapshot.role,
            backup_for=snapshot.backup_for,
        )
        if self.ctx.settings.orchestrator.ha_enabled and old != snapshot.status:
            statuses: dict[str, str] = dict(self.statuses)
            self._act(
                self.planner.on_change(gateway_id, old, snapshot.status, statuses, self.ctx.clock())
            )

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case FindReplacement(gateway_id=gateway_id):
                    self.load_balancer.tell(
                        FindReplacementFor(gateway_id=gateway_id, reply_to=self.actor_ref)
                    )
                case Redirect():
                    self._redirect(action)
                case Hold(gateway_id=gateway_id):
                    self.load_balancer.tell(HoldGateway(gateway_id=gateway_id))
                case Release(gateway_id=gateway_id):
                    self.load_balancer.tell(ReleaseGateway(gateway_id=gateway_id))
                case GuardChange(frozen=frozen, message=text):
                    log.warning("mass-failure guard: %s", text)
                    self.ctx.emit(Alarm(kind="mass_failure", message=text, active=frozen))

    def _redirect(self, redirect: Redirect) -> None:
        source, target, reason = redirect.from_gateway, redirect.to_gateway, redirect.reason
        notice = RedirectNotice(from_=source, to=target, reason=reason)
        self.bus.publish(self.ctx.subjects.redirect(redirect.subject_id), notice)
        if redirect.failback:
            assert target is not None  # a failback always names the primary
            self.ctx.emit(Failback(from_gateway=source, to_gateway=target, reason=reason))
        else:
            self.ctx.emit(Failover(from_gateway=source, to_gateway=target, reason=reason))
        log.info("redirect %s -> %s (%s)", source, target, reason)

    def _failback(self, gateway_id: str, reply: str) -> None:
        actions = self.planner.failback(gateway_id)
        if actions is None:
            reply_error(self.bus, reply, "not_found", f"no failback is pending for {gateway_id}")
            return
        released = next((a.from_gateway for a in actions if isinstance(a, Redirect)), None)
        self._act(actions)
        self.bus.publish(reply, FailbackReply(gateway_id=gateway_id, released_from=released))

    def _restart(self, gateway_id: str, error: str) -> None:
        """A GatewayActor died: a new one takes over, rebuilding health from heartbeats."""
        entry = self.entries.get(gateway_id)
        if entry is None or gateway_id not in self.gateways:
            return
        with self._subscribed_lock:
            self.subscribed = self.subscribed - {gateway_id}
        self.ctx.restarts.add("GatewayActor")
        log.warning("gateway actor %s died (%s); restarting it", gateway_id, error)
        self._start_gateway(entry, first=None)

    def _spawn(self, entry: GatewayEntry, *, first: HeartbeatReceived | None, source: str) -> None:
        self.entries[entry.id] = entry
        self.statuses[entry.id] = "unknown"
        # Registered first: the actor's first status change must come after it in the stream.
        self.ctx.emit(GatewayRegistered(gateway_id=entry.id, region=entry.region, source=source))
        self._start_gateway(entry, first=first)
        log.info("gateway %s registered from %s (region %s)", entry.id, source, entry.region)

    def _start_gateway(self, entry: GatewayEntry, *, first: HeartbeatReceived | None) -> None:
        self.gateways[entry.id] = GatewayActor.start(
            self.ctx,
            entry,
            threshold=self.lb_config.health_threshold,
            listeners=[self.load_balancer, self.actor_ref, self.distributor],
            first=first,
            on_subscribed=self._mark_subscribed,
            parent=self.actor_ref,
        )

    def _mark_subscribed(self, gateway_id: str) -> None:
        """Called from the GatewayActor's thread once its own subscription is live."""
        with self._subscribed_lock:
            self.subscribed = self.subscribed | {gateway_id}

    def _remove(self, gateway_id: str, reason: str) -> None:
        ref = self.gateways.pop(gateway_id, None)
        if ref is None:
            return
        with self._subscribed_lock:
            self.subscribed = self.subscribed - {gateway_id}
        self.statuses.pop(gateway_id, None)
        self.entries.pop(gateway_id, None)
        self._act(self.planner.forget(gateway_id))
        # Stopped before the load balancer hears of it, so no late update re-adds the row.
        ref.stop(timeout=5)
        self.load_balancer.tell(GatewayRemoved(gateway_id=gateway_id))
        self.distributor.tell(GatewayRemoved(gateway_id=gateway_id))
        self.ctx.emit(GatewayLeft(gateway_id=gateway_id, reason=reason))
        log.info("gateway %s left (%s)", gateway_id, reason)

    def status(self) -> StatusReply:
        settings = self.ctx.settings
        counts = self.distribution_counts
        return StatusReply(
            active_distributions=counts.active,
            successfully_completed_distributions=counts.completed,
            failed_distributions=counts.failed,
            gateways_managed=len(self.gateways),
            gateways_healthy=sum(1 for s in self.statuses.values() if s == "healthy"),
            load_balancing_strategy=self.lb_config.strategy,
            health_check_threshold=self.lb_config.health_threshold,
            ha_enabled=settings.orchestrator.ha_enabled,
            malformed_messages=self.ctx.drops.counts(),
            selections=self.ctx.selections.counts(),
            actor_restarts=sum(self.ctx.restarts.counts().values()),
            gateways_by_status=dict(Counter(self.statuses.values())),
            distributions_by_state=dict(counts.by_state),
        )
