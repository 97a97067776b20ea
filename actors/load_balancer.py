"""LoadBalancerActor: answers "which gateway should this client use?".

Owns: the table of every gateway's latest snapshot (fed by GatewayActors' tells, never
asked at selection time), the strategy and threshold in force (persisted in the
`settings` bucket), round-robin cursors and sticky-client assignments.
Receives: GatewayUpdated, GatewayRemoved, SelectGateway, Get/SetLoadBalancing,
ListGateways, AddListener; from the supervisor FindReplacementFor (answered with
ReplacementFound) and Hold/ReleaseGateway (failed-over primaries kept out of the pool
until a manual failback).
Emits: `lb.selected` per decision (when audit.record_selections), `lb.changed`;
tells listeners LoadBalancingInForce.
Serves: `P.api.select-gateway`, `P.api.load-balancing.get|set`, `P.api.gateways`.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

import pykka

from actors.base import SafeActor
from actors.context import Context
from actors.failover import choose_replacement
from actors.messages import (
    AddListener,
    FindReplacementFor,
    GatewayRemoved,
    GatewayUpdated,
    GetLoadBalancing,
    HoldGateway,
    ListGateways,
    LoadBalancingInForce,
    ReleaseGateway,
    ReplacementFound,
    SelectGateway,
    SetLoadBalancing,
)
from actors.strategies import Selection, SelectorState, select
from bus.edge import request_handler
from bus.runtime import SubscriptionHandle
from schemas.api import (
    Empty,
    GatewaySnapshot,
    GatewaysReply,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    SelectReply,
    SelectRequest,
)
from schemas.events import GatewaySelected, LoadBalancingChanged

log = logging.getLogger(__name__)

SETTINGS_KEY = "load_balancing"
API_QUEUE = "gatefleet-api"
MAX_STICKY_CLIENTS = 100_000


class LoadBalancerActor(SafeActor):
    def __init__(self, context: Context) -> None:
        super().__init__()
        self.ctx = context
        self.bus = context.bus
        orchestrator = context.settings.orchestrator
        self.config = LoadBalancingConfig(
            strategy=orchestrator.load_balancing_strategy,
            health_threshold=orchestrator.health_threshold_percent,
        )
        self.table: dict[str, GatewaySnapshot] = {}
        self.state = SelectorState()
        self.rng = random.Random(context.settings.load_balancing.random_seed)
        self.sticky: OrderedDict[str, str] = OrderedDict()
        self.listeners: list[pykka.ActorRef[Any]] = []
        self.held: frozenset[str] = frozenset()
        self._subscriptions: list[SubscriptionHandle] = []

    def on_start(self) -> None:
        stored = self.ctx.buckets["settings"].get(SETTINGS_KEY, LoadBalancingConfig)
        if stored is not None:
            self.config = stored
            log.info(
                "load balancing from store: %s, threshold %.1f",
                stored.strategy,
                stored.health_threshold,
            )
        me, api, drops = self.actor_ref, self.ctx.subjects.api, self.ctx.drops
        routes: list[tuple[str, Any, Any]] = [
            (
                "select-gateway",
                SelectRequest,
                lambda r, to: me.tell(SelectGateway(request=r, reply=to)),
            ),
            ("load-balancing.get", Empty, lambda _r, to: me.tell(GetLoadBalancing(reply=to))),
            (
                "load-balancing.set",
                LoadBalancingUpdate,
                lambda r, to: me.tell(SetLoadBalancing(update=r, reply=to)),
            ),
            ("gateways", Empty, lambda _r, to: me.tell(ListGateways(reply=to))),
        ]
        for name, kind, on_request in routes:
            handler = request_handler(self.bus, kind, on_request, drops)
            self._subscriptions.append(self.bus.subscribe(api(name), handler, queue=API_QUEUE))

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()

    def handle(self, message: Any) -> Any:
        match message:
            case GatewayUpdated(snapshot=snapshot):
                self.table[snapshot.gateway_id] = snapshot
            case GatewayRemoved(gateway_id=gateway_id):
                self.table.pop(gateway_id, None)
            case SelectGateway(request=request, reply=reply):
                self._select(request, reply)
            case GetLoadBalancing(reply=reply):
                self.bus.publish(reply, self.config)
            case SetLoadBalancing(update=update, reply=reply):
                self._set(update, reply)
            case ListGateways(reply=reply):
                rows = sorted(self.table.values(), key=lambda s: s.gateway_id)
                self.bus.publish(reply, GatewaysReply(gateways=rows))
            case AddListener(listener=listener):
                self.listeners.append(listener)
                listener.tell(LoadBalancingInForce(config=self.config))
            case FindReplacementFor(gateway_id=gateway_id, reply_to=reply_to):
                reply_to.tell(self._replacement(gateway_id))
            case HoldGateway(gateway_id=gateway_id):
                self.held |= {gateway_id}
            case ReleaseGateway(gateway_id=gateway_id):
                self.held -= {gateway_id}
            case _:
                return super().handle(message)
        return None

    def _select(self, request: SelectRequest, reply: str) -> None:
        settings = self.ctx.settings
        client_id = request.client_id
        selection = select(
            self.config.strategy,
            list(self.table.values()),
            self.config.health_threshold,
            region=request.region,
            state=self.state,
            rng=self.rng,
            settings=settings.load_balancing,
            regions=settings.regions,
            sticky_gateway=self.sticky.get(client_id) if client_id else None,
            connection_reference=settings.health.connection_reference,
            held=self.held,
        )
        self.ctx.selections.add(self.config.strategy)
        event = self._selection_event(request, selection)
        if client_id:
            self._remember(client_id, selection.gateway_id)
        self.bus.publish(
            reply,
            SelectReply(
                gateway_id=selection.gateway_id,
                strategy=self.config.strategy,
                reason=selection.reason,
                selection_id=event.id if event else None,
            ),
        )
        if event:
            self.ctx.emit(event)

    def _selection_event(
        self, request: SelectRequest, selection: Selection
    ) -> GatewaySelected | None:
        if not self.ctx.settings.audit.record_selections:
            return None
        return GatewaySelected(
            region=request.region,
            client_id=request.client_id,
            strategy=self.config.strategy,
            threshold=self.config.health_threshold,
            gateway_id=selection.gateway_id,
            reason=selection.reason,
            candidates=[self.table[g] for g in selection.candidates if g in self.table],
            excluded=selection.excluded,
        )

    def _replacement(self, gateway_id: str) -> ReplacementFound:
        failed = self.table.get(gateway_id)
        if failed is None:
            return ReplacementFound(gateway_id=gateway_id, to=None, reason="unknown gateway")
        choice = choose_replacement(
            failed,
            list(self.table.values()),
            self.config.health_threshold,
            strategy=self.config.strategy,
            state=self.state,
            rng=self.rng,
            settings=self.ctx.settings.load_balancing,
            held=self.held,
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
        old = self.config
        new = LoadBalancingConfig(
            strategy=update.strategy or old.strategy,
            health_threshold=(
                old.health_threshold if update.health_threshold is None else update.health_threshold
            ),
        )
        if new != old:
            self.ctx.buckets["settings"].put(SETTINGS_KEY, new)
            self.config = new
            self.ctx.emit(
                LoadBalancingChanged(
                    old_strategy=old.strategy,
                    new_strategy=new.strategy,
                    old_threshold=old.health_threshold,
                    new_threshold=new.health_threshold,
                )
            )
            for listener in self.listeners:
                listener.tell(LoadBalancingInForce(config=new))
        self.bus.publish(reply, new)
