"""SupervisorActor: owns the fleet's membership and the orchestrator's status.

Owns: one GatewayActor per known gateway (spawned from the config file at start or on a
first valid heartbeat), the edge routes of gateway traffic (actors/routes.py: it attaches
and detaches each gateway's route), and the numbers of `P.api.status`.
Also runs failover (actors/failover.py): a gateway that goes down has its traffic
redirected to a replacement the load balancer picks (`P.redirect.<id>`), recovered
primaries fail back (at once, or on `P.api.failback` when `[ha] failback = "manual"`),
and a mass failure freezes all this. It restarts GatewayActors that die.
Receives: Discovered, GoodbyeReceived (from the routes), GatewayUpdated (status changes),
LoadBalancingInForce, DistributionCounts, ReplacementFound, ChildDied, the requests of
`status`, `failback` and `maintenance`, and from the watch of the `settings` bucket each
maintenance key the leader writes (`_MaintenanceStored`: a standby puts it in force as
the leader did).
Emits: gateway.registered, gateway.left, gateway.forgotten (down for
`health.forget_after_s`, unless configured), ha.failover, ha.failback, ha.alarm.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pykka

from actors.base import SafeActor, safe_tell, stop_all
from actors.coalescer import Coalescer
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
from actors.maintenance import KEY_PREFIX as MAINTENANCE_PREFIX
from actors.maintenance import MaintenanceStore, read_maintenance
from actors.messages import (
    Arrival,
    ChildDied,
    Discovered,
    DistributionCounts,
    FindReplacementFor,
    ForgetDue,
    GatewayRemoved,
    GatewayUpdated,
    GoodbyeReceived,
    HoldGateway,
    LoadBalancingInForce,
    ReleaseGateway,
    ReplacementFound,
    Request,
    SetMaintenance,
    SetThreshold,
)
from actors.routes import GatewayRoutes
from bus.edge import NOT_LEADING, RETRY_AFTER_MS, reply_error
from bus.fenced_kv import Fenced
from bus.kv_watch import KvWatch
from bus.runtime import SubscriptionHandle
from schemas import endpoints as api
from schemas.api import (
    FailbackReply,
    FailbackRequest,
    GatewaySnapshot,
    LoadBalancingConfig,
    MaintenanceReply,
    MaintenanceRequest,
    StatusReply,
)
from schemas.events import (
    Alarm,
    Failback,
    Failover,
    GatewayForgotten,
    GatewayLeft,
    GatewayRegistered,
)
from schemas.settings import GatewayEntry
from schemas.types import GatewayStatus
from schemas.wire import Redirect as RedirectNotice

log = logging.getLogger(__name__)

FIRST_LOGGED = 20  # registrations logged one by one


class SupervisorActor(SafeActor):
    def __init__(
        self,
        context: Context,
        *,
        load_balancer: pykka.ActorRef[Any],
        distributor: pykka.ActorRef[Any],
        routes: GatewayRoutes,
    ) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "supervisor"))
        self.ctx = context
        self.bus = context.bus
        self.load_balancer = load_balancer
        # Hears gateway status changes and removals (it started first, so it misses none).
        self.distributor = distributor
        self.routes = routes
        self.lb_config = LoadBalancingConfig(
            strategy=context.settings.orchestrator.load_balancing_strategy,
            health_threshold=context.settings.orchestrator.health_threshold_percent,
        )
        self.gateways: dict[str, pykka.ActorRef[Any]] = {}
        self.statuses: dict[str, GatewayStatus] = {}
        self.status_counts: Counter[str] = Counter()  # of `statuses`, kept as they change
        self.down_since: dict[str, float] = {}  # when each down gateway went down
        self.flapping: set[str] = set()
        # Maintenance as requested (gateway -> reason), and as the gateways report it
        # (a gateway turned off stays in maintenance until `rise` good heartbeats).
        self.maintenance: dict[str, str | None] = {}
        self.maintenance_store = MaintenanceStore(context)
        self.in_maintenance: set[str] = set()
        # [[gateways]]: known before they beat, never forgotten, their role kept.
        self.configured = {entry.id: entry for entry in context.settings.gateways}
        # Each gateway's heartbeats waiting for its actor (shared with its route).
        self.pending: dict[str, Coalescer[Arrival]] = {}
        self._subscriptions: list[SubscriptionHandle] = []
        self._maintenance_watch: KvWatch | None = None
        self._registered = 0
        self.distribution_counts = DistributionCounts(active=0, completed=0, failed=0)
        self.view = StatusView(0, {}, 0, 0, self.lb_config, self.distribution_counts)
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
        self.maintenance = self.maintenance_store.load()
        self._maintenance_watch = self._watch_maintenance()
        for entry in self.configured.values():
            self._spawn(entry, Coalescer(), source="config")
        self.routes.start(self.actor_ref)
        self._plan_forgetting()
        ctx = self.ctx
        peers = {
            "load_balancer": self.load_balancer,
            "distributor": self.distributor,
            "supervisor": self.actor_ref,
        }
        self._subscriptions = self.serve(
            "supervisor",
            ctx,
            direct={api.STATUS: lambda _body: status_reply(self.view, ctx, peers)},
        )

    def on_stop(self) -> None:
        if self._maintenance_watch is not None:
            self._maintenance_watch.stop()
        self.routes.stop()
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        stop_all(self.gateways.values(), timeout=5)

    # Messages ----------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case Discovered(heartbeat=heartbeat, pending=pending):
                gateway_id = heartbeat.gateway_id
                if gateway_id not in self.gateways:
                    # What [[gateways]] says of it (role, backup_for) outlives a goodbye.
                    configured = self.configured.get(gateway_id)
                    entry = GatewayEntry(
                        id=gateway_id,
                        region=heartbeat.region,
                        role=configured.role if configured else "primary",
                        backup_for=configured.backup_for if configured else None,
                    )
                    self._spawn(entry, pending, source="heartbeat")
            case ForgetDue():
                self._forget_long_down()
            case GoodbyeReceived(gateway_id=gateway_id):
                self._remove(gateway_id, "goodbye")
            case GatewayUpdated(snapshot=snapshot):
                self._on_gateway_update(snapshot)
            case ReplacementFound(gateway_id=gateway_id, to=to, reason=reason):
                # It may be back already (or out of maintenance).
                if self.statuses.get(gateway_id) == "down" or gateway_id in self.maintenance:
                    self._act(self.planner.on_replacement(gateway_id, to, reason))
            case Request(endpoint=api.FAILBACK, body=FailbackRequest() as request, reply=reply):
                self._failback(request.gateway_id, reply)
            case Request(
                endpoint=api.MAINTENANCE, body=MaintenanceRequest() as request, reply=reply
            ):
                self._set_maintenance(request, reply)
            case _MaintenanceStored(key=key, value=value):
                self._maintenance_stored(key, value)
            case ChildDied(kind="GatewayActor", key=gateway_id, error=error):
                self._restart(gateway_id, error)
            case LoadBalancingInForce(config=config):
                if config.health_threshold != self.lb_config.health_threshold:
                    for ref in self.gateways.values():
                        ref.tell(SetThreshold(threshold=config.health_threshold))
                self.lb_config = config
                self._publish_view()
            case DistributionCounts():
                self.distribution_counts = message
                self._publish_view()
            case _:
                return super().handle(message)
        return None

    def _on_gateway_update(self, snapshot: GatewaySnapshot) -> None:
        gateway_id = snapshot.gateway_id
        if gateway_id not in self.gateways:
            return  # a late update from a gateway that has left
        old = self.statuses.get(gateway_id, "unknown")
        was_flapping = gateway_id in self.flapping
        was_in_maintenance = gateway_id in self.in_maintenance
        _mark(self.flapping, gateway_id, snapshot.flapping)
        _mark(self.in_maintenance, gateway_id, snapshot.maintenance)
        self._set_status(gateway_id, snapshot.status)
        entry = self.entries.get(gateway_id)
        if entry is None or (entry.region, entry.role, entry.backup_for) != (
            snapshot.region,
            snapshot.role,
            snapshot.backup_for,
        ):
            self.entries[gateway_id] = GatewayEntry(
                id=gateway_id,
                region=snapshot.region,
                role=snapshot.role,
                backup_for=snapshot.backup_for,
            )
        if not self.ctx.settings.orchestrator.ha_enabled:
            return
        if old != snapshot.status:
            fleet, down = len(self.statuses), self.status_counts["down"]
            self._act(
                self.planner.on_change(
                    gateway_id,
                    old,
                    snapshot.status,
                    fleet=fleet,
                    down=down,
                    now=self.ctx.clock(),
                    flapping=snapshot.flapping,
                )
            )
        steady = snapshot.status == "healthy" and not snapshot.flapping
        if was_in_maintenance and not snapshot.maintenance:
            self._act(self.planner.end_maintenance(gateway_id, steady=steady))
        elif was_flapping and steady:
            self._act(self.planner.on_steady(gateway_id))

    def _set_status(self, gateway_id: str, status: GatewayStatus | None) -> None:
        """Keeps `statuses` and their counts (None: the gateway is gone)."""
        counts = self.status_counts
        old = self.statuses.pop(gateway_id, None)
        if old is not None:
            counts[old] -= 1
        if status is not None:
            self.statuses[gateway_id] = status
            counts[status] += 1
        if status != "down":
            self.down_since.pop(gateway_id, None)
        elif old != "down":
            self.down_since[gateway_id] = self.ctx.clock()
        self._publish_view()

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
        if not self.ctx.lease.still_leader():
            # Every replica plans the same failovers from the same heartbeats; only the
            # leader tells the clients (and records it), so they hear each one once.
            return
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
            reply_error(
                self.replies, reply, "not_found", f"no failback is pending for {gateway_id}"
            )
            return
        released = next((a.from_gateway for a in actions if isinstance(a, Redirect)), None)
        self._act(actions)
        self.replies.publish(reply, FailbackReply(gateway_id=gateway_id, released_from=released))

    def _set_maintenance(self, request: MaintenanceRequest, reply: str) -> None:
        gateway_id, enabled = request.gateway_id, request.enabled
        ref = self.gateways.get(gateway_id)
        if ref is None:
            reply_error(self.replies, reply, "not_found", f"unknown gateway {gateway_id}")
            return
        try:  # stored first: what the reply confirms outlives a restart
            if enabled:
                self.maintenance_store.save(gateway_id, request.reason)
            elif gateway_id in self.maintenance:
                self.maintenance_store.delete(gateway_id)
        except Fenced as fenced:  # another replica leads now: it stored the key since
            # Unless this replica leads in a newer tenure than the write's already.
            self.ctx.lease.step_down(why=str(fenced), epoch=self.maintenance_store.epoch)
            reply_error(self.replies, reply, "unavailable", NOT_LEADING, RETRY_AFTER_MS)
            return
        except Exception:
            log.exception("could not store maintenance of %s", gateway_id)
            reply_error(self.replies, reply, "unavailable", "could not store the change; retry")
            return
        self._maintain(gateway_id, enabled, request.reason)
        log.info(
            "maintenance %s for %s (%s)",
            "on" if enabled else "off",
            gateway_id,
            request.reason or "no reason given",
        )
        self.replies.publish(
            reply, MaintenanceReply(gateway_id=gateway_id, enabled=enabled, reason=request.reason)
        )

    def _maintain(self, gateway_id: str, enabled: bool, reason: str | None) -> None:
        """Puts maintenance in force here: the failover planner moves the traffic, the
        gateway's actor drains it (one not spawned yet is drained at its spawn)."""
        if enabled:
            self.maintenance[gateway_id] = reason
        else:
            self.maintenance.pop(gateway_id, None)
        ref = self.gateways.get(gateway_id)
        if ref is None:
            return
        if enabled:
            self._act(self.planner.start_maintenance(gateway_id))
        ref.tell(SetMaintenance(enabled=enabled, reason=reason))

    def _watch_maintenance(self) -> KvWatch:
        """Maintenance stored by the leader (to which `maintenance` requests are
        forwarded) comes into force on a standby as soon as the bucket tells."""
        ref = self.actor_ref

        def changed(key: str, value: bytes | None, _age_s: float) -> None:  # on the bus loop
            if key.startswith(MAINTENANCE_PREFIX):
                safe_tell(ref, _MaintenanceStored(key, value))

        watch = self.ctx.buckets["settings"].watch(changed)
        watch.start()
        return watch

    def _maintenance_stored(self, key: str, value: bytes | None) -> None:
        if self.ctx.lease.still_leader():
            return  # the leader's own writes came into force as it made them
        gateway_id = key.removeprefix(MAINTENANCE_PREFIX)
        if value is None:
            if gateway_id in self.maintenance:
                self._maintain(gateway_id, False, None)
            return
        record = read_maintenance(self.ctx, key, value)
        if record is None:
            return
        in_force = gateway_id in self.maintenance and self.maintenance[gateway_id] == record.reason
        if not in_force:  # the watch tells every key again after a reconnect
            self._maintain(gateway_id, True, record.reason)

    def _restart(self, gateway_id: str, error: str) -> None:
        """A GatewayActor died: a new one takes over, rebuilding health from heartbeats."""
        entry = self.entries.get(gateway_id)
        if entry is None or gateway_id not in self.gateways:
            return
        self.ctx.restarts.add("GatewayActor")
        log.warning("gateway actor %s died (%s); restarting it", gateway_id, error)
        self._start_gateway(entry)

    def _spawn(self, entry: GatewayEntry, pending: Coalescer[Arrival], *, source: str) -> None:
        self.entries[entry.id] = entry
        self._set_status(entry.id, "unknown")
        self.pending[entry.id] = pending
        # Registered first: the actor's first status change must come after it in the stream.
        self.ctx.emit(GatewayRegistered(gateway_id=entry.id, region=entry.region, source=source))
        self._start_gateway(entry)
        self._registered += 1
        # One line per gateway for the first few, then one per thousand: a fleet of 10,000
        # registering at once should not be 10,000 log lines (the events have each one).
        level = logging.INFO if self._registered <= FIRST_LOGGED else logging.DEBUG
        log.log(level, "gateway %s registered from %s (region %s)", entry.id, source, entry.region)
        if self._registered % 1000 == 0:
            log.info(
                "%d gateways registered so far (%d known now)", self._registered, len(self.gateways)
            )

    def _start_gateway(self, entry: GatewayEntry) -> None:
        pending = self.pending[entry.id]
        drained = None
        if entry.id in self.maintenance:  # restored, or across a goodbye or a restart
            drained = SetMaintenance(enabled=True, reason=self.maintenance[entry.id])
            self.planner.start_maintenance(entry.id, move=False)
        ref = GatewayActor.start(
            self.ctx,
            entry,
            threshold=self.lb_config.health_threshold,
            pending=pending,
            load_balancer=self.load_balancer,
            supervisor=self.actor_ref,
            distributor=self.distributor,
            maintenance=drained,
        )
        self.gateways[entry.id] = ref
        self._publish_view()
        self.routes.attach(entry.id, ref, pending)

    def _forget_long_down(self) -> None:
        """Gateways down for `health.forget_after_s` leave (unless configured); checked
        on a period of a tenth of that, at most a minute."""
        forget_after = self.ctx.settings.health.forget_after_s
        now = self.ctx.clock()
        for gateway_id, since in list(self.down_since.items()):
            if now - since >= forget_after and gateway_id not in self.configured:
                self._remove(gateway_id, f"down for {now - since:.0f}s", GatewayForgotten)
        self._plan_forgetting()

    def _plan_forgetting(self) -> None:
        forget_after = self.ctx.settings.health.forget_after_s
        if forget_after > 0:
            period = min(60.0, max(0.05, forget_after / 10))
            self.ctx.runtime.timers.schedule(period, safe_tell, self.actor_ref, ForgetDue())

    def _remove(self, gateway_id: str, reason: str, event: type[GatewayLeft] = GatewayLeft) -> None:
        ref = self.gateways.pop(gateway_id, None)
        if ref is None:
            return
        self.routes.detach(gateway_id)
        self.flapping.discard(gateway_id)
        self.in_maintenance.discard(gateway_id)
        self._set_status(gateway_id, None)
        self.entries.pop(gateway_id, None)
        self.pending.pop(gateway_id, None)
        self._act(self.planner.forget(gateway_id))
        # Stopped before the load balancer hears of it, so no late update re-adds the row.
        ref.stop(timeout=5)
        self.load_balancer.tell(GatewayRemoved(gateway_id=gateway_id))
        self.distributor.tell(GatewayRemoved(gateway_id=gateway_id))
        self.ctx.emit(event(gateway_id=gateway_id, reason=reason))
        verb = "was forgotten" if event is GatewayForgotten else "left"
        log.info("gateway %s %s (%s)", gateway_id, verb, reason)

    def _publish_view(self) -> None:
        """Replaces the view `status` is answered from (see StatusView)."""
        self.view = StatusView(
            gateways_managed=len(self.gateways),
            by_status={s: n for s, n in self.status_counts.items() if n},
            flapping=len(self.flapping),
            in_maintenance=len(self.in_maintenance),
            lb_config=self.lb_config,
            distributions=self.distribution_counts,
        )


@dataclass(frozen=True, slots=True)
class _MaintenanceStored:
    """A `maintenance.<gateway_id>` key of the `settings` bucket as its watch told it:
    the stored record, or None once deleted."""

    key: str
    value: bytes | None


def _mark(members: set[str], gateway_id: str, flag: bool) -> None:
    if flag:
        members.add(gateway_id)
    else:
        members.discard(gateway_id)


@dataclass(frozen=True, slots=True)
class StatusView:
    """What `P.api.status` reports of the supervisor's state, replaced whole (never
    changed) after each change: the status request is answered from the newest view on
    the API lane itself, so it never waits behind thousands of registrations or status
    changes in the supervisor's inbox (it reports the state as of the last message the
    supervisor handled)."""

    gateways_managed: int
    by_status: dict[str, int]
    flapping: int
    in_maintenance: int
    lb_config: LoadBalancingConfig
    distributions: DistributionCounts


def status_reply(
    view: StatusView, ctx: Context, peers: dict[str, pykka.ActorRef[Any]]
) -> StatusReply:
    """The status body from a view and the counters anyone may read (any thread)."""
    health = {
        "nats": "ok" if ctx.bus.nc.is_connected else "disconnected",
        "jetstream": ctx.runtime.jetstream.state,
    }
    health.update((name, "ok" if ref.is_alive() else "stopped") for name, ref in peers.items())
    awareness = ctx.runtime.awareness.status()
    shed, probes = ctx.shed.counts(), {}
    prober = ctx.runtime.prober
    if prober is not None:
        probes = prober.stats()._asdict()
        shed["probes"] = probes["shed"]
    counts = view.distributions
    leadership = ctx.lease.view
    return StatusReply(
        active_distributions=counts.active,
        successfully_completed_distributions=counts.completed,
        failed_distributions=counts.failed,
        gateways_managed=view.gateways_managed,
        gateways_healthy=view.by_status.get("healthy", 0),
        load_balancing_strategy=view.lb_config.strategy,
        health_check_threshold=view.lb_config.health_threshold,
        ha_enabled=ctx.settings.orchestrator.ha_enabled,
        malformed_messages=ctx.drops.counts(),
        selections=ctx.selections.counts(),
        actor_restarts=sum(ctx.restarts.counts().values()),
        gateways_by_status=dict(view.by_status),
        gateways_flapping=view.flapping,
        gateways_in_maintenance=view.in_maintenance,
        distributions_by_state=dict(counts.by_state),
        distribution_blockers=dict(counts.blockers),
        distribution_durations_s=counts.durations,
        selection_latency_s=ctx.selection_latency.snapshot(),
        orchestrator_lag_ms=round(awareness.orchestrator_lag_ms, 3),
        orchestrator_max_lag_ms=round(awareness.orchestrator_max_lag_ms, 3),
        detection_suspended=awareness.suspended,
        detection_suspended_s=round(awareness.suspended_s, 3),
        shed=shed,
        probes=probes,
        events_lost=ctx.events_lost(),
        health=health,
        permission_violations=ctx.violations.counts(),
        test_credentials=ctx.test_credentials(),
        replica_id=ctx.lease.replica_id,
        role=leadership.role,
        leader=leadership.leader,
        epoch=leadership.epoch,
    )
