"""Slow start: the ramp on a controlled clock, the share it gives under every strategy,
and end to end with a real server."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest

from actors.pool import Pool
from actors.slow_start import SlowStart
from actors.strategies import SelectorState, select
from gatefleet.app import Orchestrator
from schemas.api import GatewaySnapshot, SelectReply, SelectRequest
from schemas.events import GatewayStatusChanged
from schemas.settings import LoadBalancingSettings, Settings
from schemas.types import STRATEGIES, GatewayStatus
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet
from tests.selections import recorded


def row(gateway_id: str, status: GatewayStatus = "healthy", active: int = 10) -> GatewaySnapshot:
    return GatewaySnapshot(
        gateway_id=gateway_id,
        region="us-west",
        status=status,
        score=90.0,
        active_connections=active,
        max_connections=100,
        probe_latency_ms=5.0,
    )


def test_the_ramp_is_linear_from_registration_or_recovery() -> None:
    ramp = SlowStart(window_s=10.0)
    ramp.on_update(None, row("new"), now=100.0)  # registered healthy
    ramp.on_update(row("back", "down"), row("back"), now=104.0)  # recovered
    ramp.on_update(row("steady"), row("steady", active=20), now=100.0)  # a routine update
    ramp.on_update(row("dip", "degraded"), row("dip"), now=100.0)  # degraded is not down
    assert ramp.factor("new", 102.5) == pytest.approx(0.25)
    assert ramp.factor("back", 109.0) == pytest.approx(0.5)
    assert ramp.factor("steady", 101.0) == 1.0
    assert ramp.factor("dip", 101.0) == 1.0
    assert ramp.factor("new", 110.0) == 1.0
    assert ramp.ramping  # "back" still is
    assert ramp.factor("back", 114.0) == 1.0
    assert not ramp.ramping


def test_a_zero_window_is_off() -> None:
    ramp = SlowStart(window_s=0.0)
    ramp.on_update(None, row("new"), now=0.0)
    assert not ramp.ramping
    assert ramp.factor("new", 0.0) == 1.0


def share(strategy: str, factor: float, selections: int = 4000) -> float:
    """The share of `a` (the least loaded of four) with ramp `factor`."""
    fleet = [row("a", active=1), row("b"), row("c"), row("d")]
    pool, state, rng = Pool.of(fleet, 70.0), SelectorState(), random.Random(7)
    settings = LoadBalancingSettings()
    picks: Counter[str | None] = Counter()
    ramp: Callable[[str], float] = lambda gw: factor if gw == "a" else 1.0  # noqa: E731
    for _ in range(selections):
        chosen = select(
            strategy,
            pool,
            region=None,
            state=state,
            rng=rng,
            settings=settings,
            regions={},
            ramp=ramp,
        )
        picks[chosen.gateway_id] += 1
    return picks["a"] / selections


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_share_follows_the_ramp_under_every_strategy(strategy: str) -> None:
    full = share(strategy, 1.0)
    assert full > 0.2  # a is picked at full share (all of it under LeastConnections)
    assert share(strategy, 0.0) == 0.0
    quarter, half = share(strategy, 0.25), share(strategy, 0.5)
    # About factor x full share: exactly so for a gateway with a small share of the fleet's
    # selections; one with a quarter of them gets a little more (actors/slow_start.py).
    assert full * 0.2 < quarter < full * 0.35
    assert full * 0.45 < half < full * 0.62


def test_the_selection_says_who_ramps() -> None:
    pool, rng = Pool.of([row("a", active=1), row("b")], 70.0), random.Random(3)
    seen = [
        select(
            "LeastConnections",
            pool,
            region=None,
            state=SelectorState(),
            rng=rng,
            settings=LoadBalancingSettings(),
            regions={},
            ramp=lambda gw: 0.3 if gw == "a" else 1.0,
        )
        for _ in range(50)
    ]
    passed = [s for s in seen if s.gateway_id == "b"]
    chosen = [s for s in seen if s.gateway_id == "a"]
    assert passed
    assert chosen
    assert passed[0].slow_start == {"a": 0.3}
    assert "passed over a (ramp 30%)" in passed[0].reason
    assert chosen[0].slow_start == {"a": 0.3}
    assert "a in slow start (ramp 30%)" in chosen[0].reason


# End to end ------------------------------------------------------------------------------

WINDOW_S = 3.0


@pytest.fixture
def orchestrator(
    make_settings: SettingsFactory, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Orchestrator:
    return start_orchestrator(
        make_settings(
            health={"heartbeat_interval_ms": 100},
            orchestrator={"load_balancing_strategy": "RoundRobin"},
            load_balancing={"slow_start_s": WINDOW_S},
        )
    )


def test_a_new_gateway_ramps_up_and_selections_record_it(
    orchestrator: Orchestrator, fleet: Fleet, event_log: EventLog
) -> None:
    for gateway_id in ("a", "b"):
        fleet.add(gateway_id)
    for gateway_id in ("a", "b"):
        event_log.wait_for(
            lambda e, g=gateway_id: isinstance(e, GatewayStatusChanged) and e.gateway_id == g  # type: ignore[misc]
        )
    # Both just registered: each ramps. The selections say so, and the audit records it.
    reply = fleet.call("select-gateway", SelectRequest(), SelectReply)
    assert "slow start" in reply.reason
    assert reply.selection_id is not None
    _, record = recorded(event_log, reply.selection_id)
    assert record.slow_start
    assert all(0.0 <= f < 1.0 for f in record.slow_start.values())

    # After the window, no more ramp: plain round robin, half each.
    def ramped() -> bool:
        return "slow start" not in fleet.call("select-gateway", SelectRequest(), SelectReply).reason

    wait_until(ramped, timeout=WINDOW_S + 5, what="the ramp to end")
    picks = Counter(
        fleet.call("select-gateway", SelectRequest(), SelectReply).gateway_id for _ in range(10)
    )
    assert picks == {"a": 5, "b": 5}
