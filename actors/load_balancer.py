"""LoadBalancerActor: answers "which gateway should this client use?".

Owns: the selection `Pool` (every gateway's latest snapshot, fed by GatewayActors' tells,
never asked at selection time, and the eligible ones, kept up to date one change at a
time), the strategy and threshold in force (persisted in the `settings` bucket),
round-robin cursors and sticky-client assignments.
Receives: GatewayUpdated, GatewayRemoved, the requests below, ReportTo (from app.py:
whom to tell LoadBalancingInForce); from the supervisor FindReplacementFor (answered with
ReplacementFound) and Hold/ReleaseGateway (failed-over primaries kept out of the pool
until a manual failback).
Emits: `lb.selected` per decision (when audit.record_selections; built after the reply
is published, and compact: the chosen candidate and the best AUDIT_CANDIDATES others by
the strategy's measure, the first AUDIT_EXCLUDED excluded, with both counts), `lb.changed`;
tells the supervisor LoadBalancingInForce.
Serves: `P.api.select-gateway`, `P.api.load-balancing.get|set`, `P.api.gateways`.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.base import SafeActor, safe_tell
from actors.context import Context
from actors.failover import choose_replacement
from actors.messages import (
    FindReplacementFor,
    GatewayRemoved,
    GatewayUpdated,
    HoldGateway,
    LoadBalancingInForce,
    ReleaseGateway,
    ReplacementFound,
    ReportTo,
    Request,
    TableStats,
)
from actors.paging import BadCursor, gateways_page
from actors.pool import Pool
from actors.slow_start import SlowStart
from actors.strategies import Selection, SelectorState, select, shortlist
from bus.edge import reply_error
from schemas import endpoints as api
from schemas.api import (
    GatewaysRequest,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    SelectReply,
    SelectRequest,
)
from schemas.codec import DecodeError
from schemas.events import (
    Alarm,
    CandidateView,
    GatewaySelected,
    LoadBalancingChanged,
    OrchestratorStarted,
    new_event_id,
)

log = logging.getLogger(__name__)

SETTINGS_KEY = "load_balancing"
MAX_STICKY_CLIENTS = 100_000
# What one lb.selected event records (about 12 KiB at most, whatever the fleet's size).
AUDIT_CANDIDATES = 50  # besides the chosen one
AUDIT_EXCLUDED = 50


def selection_event(
    event_id: str,
    request: SelectRequest,
    selection: Selection,
    pool: Pool,
    config: LoadBalancingConfig,
) -> GatewaySelected:
    """The audit record of a selection, bounded whatever the fleet's size. Build it before
    the pool next changes: the selection's members are a view of the pool."""
    candidates = [
        CandidateView(
            gateway_id=g.gateway_id,
            region=g.region,
            role=g.role,
            score=g.score,
            measure=measure,
            active_connections=g.active_connections,
            max_connections=g.max_connections,
            latency_ms=g.latency_ms,
            cpu_percent=g.cpu_percent,
            memory_percent=g.memory_percent,
        )
        for g, measure in shortlist(selection, AUDIT_CANDIDATES)
    ]
    return GatewaySelected(
        id=event_id,
        region=request.region,
        client_id=request.client_id,
        strategy=config.strategy,
        threshold=config.health_threshold,
        gateway_id=selection.gateway_id,
        reason=selection.reason,
        candidates=candidates,
        candidate_count=len(selection.members),
        excluded=pool.excluded(AUDIT_EXCLUDED),
        excluded_count=pool.excluded_count,
        slow_start=selection.slow_start,
    )


class LoadBalancerActor(SafeActor):
    # On the API lane's loop: requests arrive there and replies leave from there, so a
    # selection costs no thread hop. It must never block: its blocking start-up runs in
    # __init__ (the starting thread), its settings are stored without waiting.
    dispatch = "api"

    def __init__(self, context: Context) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "load-balancer"))
        self.ctx = context
        self.bus = context.bus
        orchestrator = context.settings.orchestrator
        self.config = LoadBalancingConfig(
            strategy=orchestrator.load_balancing_strategy,
            health_threshold=orchestrator.health_threshold_percent,
        )
        self.pool = Pool(
            self.config.health_threshold,
            reference=context.settings.health.connection_reference,
        )
        self.state = SelectorState()
        self.rng = random.Random(context.settings.load_balancing.random_seed)
        self.slow_start = SlowStart(context.settings.load_balancing.slow_start_s)
        self.sticky: OrderedDict[str, str] = OrderedDict()
        self.supervisor: pykka.ActorRef[Any] | None = None
        # The settings asked for last (in force, or being stored), and how many are.
        self._requested = self.config
        self._storing = 0
        self._load_settings()
        # First of this run's events (the load balancer starts first): what is in force now.
        self.ctx.emit(
            OrchestratorStarted(
                strategy=self.config.strategy,
                threshold=self.config.health_threshold,
                ha_enabled=self.ctx.settings.orchestrator.ha_enabled,
            )
        )
        # Requests wait in the inbox until the actor has started.
        self._subscriptions = self.serve("load_balancer", self.ctx)

    def _load_settings(self) -> None:
        try:
            stored = self.ctx.buckets["settings"].get(SETTINGS_KEY, LoadBalancingConfig)
        except DecodeError as exc:
            # No stored value may stop start-up: the configured settings stand instead.
            message = (
                f"stored load-balancing settings unreadable ({exc}); using the configured ones"
            )
            log.error("%s", message)  # noqa: TRY400 - one line, no traceback: expected input
            self.ctx.emit(Alarm(kind="bad_stored_value", message=message, active=True))
            stored = None
        if stored is not None:
            self.config = self._requested = stored
            self.pool.set_threshold(stored.health_threshold)
            log.info(
                "load balancing from store: %s, threshold %.1f",
                stored.strategy,
                stored.health_threshold,
            )

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()

    def handle(self, message: Any) -> Any:
        match message:
            case Request(endpoint=api.SELECT_GATEWAY, body=SelectRequest() as request, reply=reply):
                self._select(request, reply)
            case GatewayUpdated(snapshot=snapshot):
                self.slow_start.on_update(
                    self.pool.gateways.get(snapshot.gateway_id), snapshot, self.ctx.clock()
                )
                self.pool.update(snapshot)
            case GatewayRemoved(gateway_id=gateway_id):
                self.pool.remove(gateway_id)
                self.slow_start.forget(gateway_id)
            case Request(endpoint=api.LOAD_BALANCING_GET, reply=reply):
                self.replies.publish(reply, self.config)
            case Request(
                endpoint=api.LOAD_BALANCING_SET, body=LoadBalancingUpdate() as update, reply=reply
            ):
                self._set(update, reply)
            case _SettingsStored():
                self._stored(message)
            case Request(endpoint=api.GATEWAYS, body=GatewaysRequest() as request, reply=reply):
                try:
                    page = gateways_page(self.pool.gateways.values(), request)
                except BadCursor as exc:
                    reply_error(self.replies, reply, "bad_request", str(exc))
                else:
                    self.replies.publish(reply, page)
            case TableStats():
                table = self.pool.gateways
                healthy = sum(1 for row in table.values() if row.status == "healthy")
                return len(table), sum(row.heartbeats for row in table.values()), healthy
            case ReportTo(supervisor=supervisor):
                self.supervisor = supervisor
                supervisor.tell(LoadBalancingInForce(config=self.config))
            case FindReplacementFor(gateway_id=gateway_id, reply_to=reply_to):
                reply_to.tell(self._replacement(gateway_id))
            case HoldGateway(gateway_id=gateway_id):
                self.pool.hold(gateway_id)
            case ReleaseGateway(gateway_id=gateway_id):
                self.pool.release(gateway_id)
            case _:
                return super().handle(message)
        return None

    def _select(self, request: SelectRequest, reply: str) -> None:
        settings = self.ctx.settings
        client_id = request.client_id
        strategy = self.config.strategy
        selection = select(
            strategy,
            self.pool,
            region=request.region,
            state=self.state,
            rng=self.rng,
            settings=settings.load_balancing,
            regions=settings.regions,
            sticky_gateway=self.sticky.get(client_id) if client_id else None,
            ramp=self._ramp(),
        )
        self.ctx.selections.add(strategy)
        if client_id:
            self._remember(client_id, selection.gateway_id)
        record = settings.audit.record_selections
        event_id = new_event_id() if record else None
        self.replies.publish(
            reply,
            SelectReply(
                gateway_id=selection.gateway_id,
                strategy=strategy,
                reason=selection.reason,
                selection_id=event_id,
            ),
        )
        if event_id is not None:  # the client has its answer: now the audit record
            self.ctx.emit(selection_event(event_id, request, selection, self.pool, self.config))
        if selection.gateway_id is not None:  # after the record: it shows the load as judged
            self.pool.picked(selection.gateway_id)

    def _ramp(self) -> Callable[[str], float] | None:
        """Each gateway's slow start factor now; None (the common case) when none ramps."""
        slow_start = self.slow_start
        if not slow_start.ramping:
            return None
        now = self.ctx.clock()
        return lambda gateway_id: slow_start.factor(gateway_id, now)

    def _replacement(self, gateway_id: str) -> ReplacementFound:
        failed = self.pool.gateways.get(gateway_id)
        if failed is None:
            return ReplacementFound(gateway_id=gateway_id, to=None, reason="unknown gateway")
        choice = choose_replacement(
            failed,
            self.pool,
            strategy=self.config.strategy,
            state=self.state,
            rng=self.rng,
            settings=self.ctx.settings.load_balancing,
        )
        return ReplacementFound(gateway_id=gateway_id, to=choice.gateway_id, reason=choice.reason)

    def _remember(self, client_id: str, gateway_id: str | None) -> None:
        if gateway_id is None:
            self.sticky.pop(client_id, None)
            return
        self.sticky[client_id] = gateway_id
        self.sticky.move_to_end(client_id)
        if len(self.sticky) > MAX_STICKY_CLIENTS:
            self.sticky.popitem(last=False)  # forget the least recently seen client

    def _set(self, update: LoadBalancingUpdate, reply: str) -> None:
        """Stores the new settings without waiting; they are in force (and the reply
        sent) once stored (`_stored`). Settings asked for meanwhile build on these."""
        old = self._requested
        new = LoadBalancingConfig(
            strategy=update.strategy or old.strategy,
            health_threshold=(
                old.health_threshold if update.health_threshold is None else update.health_threshold
            ),
        )
        if new == old and not self._storing:
            self.replies.publish(reply, new)
            return
        self._requested = new
        self._storing += 1
        ref = self.actor_ref
        written = self.ctx.buckets["settings"].put_soon(SETTINGS_KEY, new)
        written.add_done_callback(
            lambda done: safe_tell(ref, _SettingsStored(new, reply, done.exception()))
        )

    def _stored(self, stored: _SettingsStored) -> None:
        self._storing -= 1
        if stored.error is not None:
            error_id = f"err-{uuid.uuid4().hex[:12]}"
            log.error(
                "load-balancing settings not stored (error id %s): %r", error_id, stored.error
            )
            if not self._storing:
                self._requested = self.config
            reply_error(self.replies, stored.reply, "internal", f"internal error, id {error_id}")
            return
        old, new = self.config, stored.config
        if new != old:
            self.config = new
            self.pool.set_threshold(new.health_threshold)
            self.ctx.emit(
                LoadBalancingChanged(
                    old_strategy=old.strategy,
                    new_strategy=new.strategy,
                    old_threshold=old.health_threshold,
                    new_threshold=new.health_threshold,
                )
            )
            if self.supervisor is not None:
                self.supervisor.tell(LoadBalancingInForce(config=new))
        self.replies.publish(stored.reply, new)


@dataclass(frozen=True, slots=True)
class _SettingsStored:
    """A settings write ended (told by the write's own callback): `error` None if stored."""

    config: LoadBalancingConfig
    reply: str
    error: BaseException | None
