"""The load balancer's state and decisions, without the actor: pure logic, no threads.

`Balancer` owns the selection `Pool`, the strategy and threshold in force, the rotation
cursors, a seeded random generator, the sticky clients (actors/sticky.py), slow start,
and (when the audit records selections) the `SelectionLog`, which it tells every change
and every selection in the order they happen. The LoadBalancerActor feeds it its
messages; tests and benchmarks drive it directly.

A selection is two calls, so that the client gets its answer before anything is
recorded: `choose(request)` decides (a `Choice`: the selection and its id), `commit`
records it, counts the pick (LeastConnections' picks since the last heartbeat) and, when
the client's assignment changed, shares it (`share`: the other replicas hear of it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import msgspec

from actors.failover import Replacement, choose_replacement
from actors.pool import Pool
from actors.selection_log import RecordingDraws, SelectionLog
from actors.slow_start import SlowStart
from actors.sticky import StickyClients
from actors.strategies import Selection, SelectorState, select
from schemas.api import GatewaySnapshot, LoadBalancingConfig, SelectRequest
from schemas.events import SelectionRules
from schemas.settings import Settings

# Tells the other replicas a client's gateway (None: it has none).
Share = Callable[[str, str | None], None]


def selection_rules(settings: Settings) -> SelectionRules:
    lb = settings.load_balancing
    return SelectionRules(
        region_inner_strategy=lb.region_inner_strategy,
        latency_margin_percent=lb.latency_margin_percent,
        latency_margin_ms=lb.latency_margin_ms,
        connection_reference=settings.health.connection_reference,
        regions=settings.regions,
    )


class Choice(msgspec.Struct, frozen=True, gc=False):
    request: SelectRequest
    selection: Selection
    selection_id: str | None  # None: selections are not recorded
    sticky: str | None  # the client's remembered gateway it was judged with
    draws: list[float]
    share: bool = False  # the client's assignment is to be shared (changed, or refreshed)


class Balancer:
    def __init__(
        self,
        settings: Settings,
        config: LoadBalancingConfig,
        *,
        log: SelectionLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        share: Share | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.pool = Pool(config.health_threshold, reference=settings.health.connection_reference)
        self.state = SelectorState()
        self.rng = RecordingDraws(random.Random(settings.load_balancing.random_seed))
        self.slow_start = SlowStart(settings.load_balancing.slow_start_s)
        self.sticky = StickyClients(settings.load_balancing.sticky_ttl_s)
        self.log = log
        self.clock = clock
        self.share = share

    # Changes -------------------------------------------------------------------------------

    def update(self, snapshot: GatewaySnapshot) -> None:
        self.slow_start.on_update(
            self.pool.gateways.get(snapshot.gateway_id), snapshot, self.clock()
        )
        self.pool.update(snapshot)
        if self.log is not None:
            self.log.changed(snapshot)

    def remove(self, gateway_id: str) -> None:
        self.pool.remove(gateway_id)
        self.slow_start.forget(gateway_id)
        if self.log is not None:
            self.log.removed(gateway_id)

    def hold(self, gateway_id: str) -> None:
        self.pool.hold(gateway_id)
        if self.log is not None:
            self.log.held(self.pool.held)

    def release(self, gateway_id: str) -> None:
        self.pool.release(gateway_id)
        if self.log is not None:
            self.log.held(self.pool.held)

    def set_config(self, config: LoadBalancingConfig) -> None:
        self.config = config
        self.pool.set_threshold(config.health_threshold)
        if self.log is not None:
            self.log.settings(config)

    # Decisions -----------------------------------------------------------------------------

    def choose(self, request: SelectRequest) -> Choice:
        client_id = request.client_id
        now = self.clock() if client_id else 0.0
        sticky = self.sticky.gateway(client_id, now) if client_id else None
        draws = self.rng.draws
        draws.clear()
        selection = select(
            self.config.strategy,
            self.pool,
            region=request.region,
            state=self.state,
            rng=self.rng,
            settings=self.settings.load_balancing,
            regions=self.settings.regions,
            sticky_gateway=sticky,
            ramp=self._ramp(),
        )
        share = self.sticky.remember(client_id, selection.gateway_id, now) if client_id else False
        selection_id = None if self.log is None else self.log.reserve()
        return Choice(request, selection, selection_id, sticky, draws.copy(), share)

    def commit(self, choice: Choice) -> None:
        """Records `choice` (the last one chosen), counts its pick, and shares the client's
        assignment if it changed."""
        if self.log is not None:
            self.log.selected(
                self.pool, choice.request, choice.selection, choice.sticky, choice.draws
            )
        gateway_id = choice.selection.gateway_id
        if gateway_id is not None:  # after the record: the load as judged
            self.pool.picked(gateway_id)
        if choice.share and self.share is not None and choice.request.client_id:
            self.share(choice.request.client_id, gateway_id)

    def replacement(self, failed: GatewaySnapshot) -> Replacement:
        """Where a failed gateway's traffic goes (actors/failover.py). It moves the
        strategy's rotation, which the next selection records as its cursor."""
        return choose_replacement(
            failed,
            self.pool,
            strategy=self.config.strategy,
            state=self.state,
            rng=self.rng.source,
            settings=self.settings.load_balancing,
        )

    def _ramp(self) -> Callable[[str], float] | None:
        """Each gateway's slow start factor now; None (the common case) when none ramps."""
        slow_start = self.slow_start
        if not slow_start.ramping:
            return None
        now = self.clock()
        return lambda gateway_id: slow_start.factor(gateway_id, now)
