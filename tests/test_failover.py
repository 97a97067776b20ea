"""Failover rules without threads or a server."""

from __future__ import annotations

import random

from actors.failover import MassFailureGuard, choose_replacement
from actors.pool import Pool
from actors.strategies import SelectorState
from schemas.api import GatewaySnapshot
from schemas.settings import LoadBalancingSettings
from schemas.types import GatewayStatus, Role


def gw(
    gateway_id: str,
    region: str = "us-west",
    status: GatewayStatus = "healthy",
    score: float = 90.0,
    role: Role = "primary",
    backup_for: str | None = None,
    connections: int = 10,
) -> GatewaySnapshot:
    return GatewaySnapshot(
        gateway_id=gateway_id,
        region=region,
        status=status,
        score=score,
        role=role,
        backup_for=backup_for,
        active_connections=connections,
        max_connections=100,
    )


def replace(
    failed: GatewaySnapshot, fleet: list[GatewaySnapshot], strategy: str = "LeastConnections"
) -> tuple[str | None, str]:
    choice = choose_replacement(
        failed,
        Pool.of(fleet, 70.0),
        strategy=strategy,
        state=SelectorState(),
        rng=random.Random(1),
        settings=LoadBalancingSettings(),
    )
    return choice.gateway_id, choice.reason


def test_backup_is_preferred() -> None:
    primary = gw("p", status="down", score=0)
    fleet = [
        primary,
        gw("b", role="backup", backup_for="p", connections=90),
        gw("other", connections=1),
    ]
    assert replace(primary, fleet) == ("b", "backup of p")


def test_ineligible_backup_falls_back_to_the_region() -> None:
    primary = gw("p", status="down", score=0)
    fleet = [
        primary,
        gw("b", role="backup", backup_for="p", status="degraded"),
        gw("near", connections=50),
        gw("nearer", connections=5),
        gw("far", "eu-west", connections=0),
    ]
    assert replace(primary, fleet) == ("nearer", "LeastConnections in region us-west")


def test_nobody_in_the_region() -> None:
    primary = gw("p", status="down", score=0)
    assert replace(primary, [primary, gw("far", "eu-west")]) == (
        None,
        "no eligible gateway in region us-west",
    )


def test_replacement_is_judged_as_if_the_failed_gateway_were_gone() -> None:
    """The load balancer's live pool may still hold the failed gateway as healthy (its
    update not yet applied): its backup is chosen all the same, and the pool is left as
    it was."""
    primary = gw("p")
    pool = Pool.of([primary, gw("b", role="backup", backup_for="p"), gw("other")], 70.0)
    before = (list(pool.everyone.ids), pool.excluded())
    choice = choose_replacement(
        primary,
        pool,
        strategy="RoundRobin",
        state=SelectorState(),
        rng=random.Random(1),
        settings=LoadBalancingSettings(),
    )
    assert (choice.gateway_id, choice.reason) == ("b", "backup of p")
    assert (
        (list(pool.everyone.ids), pool.excluded())
        == before
        == (
            ["other", "p"],
            {"b": "backup for p, which is eligible"},
        )
    )


def test_region_choice_shares_the_strategys_rotation() -> None:
    failed = gw("p", status="down", score=0)
    pool = Pool.of([failed, gw("a"), gw("c"), gw("far", "eu-west")], 70.0)
    state = SelectorState()
    picks = [
        choose_replacement(
            failed,
            pool,
            strategy="RoundRobin",
            state=state,
            rng=random.Random(1),
            settings=LoadBalancingSettings(),
        ).gateway_id
        for _ in range(3)
    ]
    assert picks == ["a", "c", "a"]
    assert state.cursor("RoundRobin").last == "a"


def test_guard_freezes_above_the_limit_and_resumes() -> None:
    guard = MassFailureGuard(max_percent=50, window_s=1.0)
    assert guard.on_down("a", 0.0, fleet_size=4) is None
    assert guard.on_down("b", 0.1, fleet_size=4) is None  # 2 of 4 is not more than 50%
    change = guard.on_down("c", 0.2, fleet_size=4)
    assert change is not None
    assert change.frozen
    assert guard.frozen
    assert guard.on_fleet_seen(down_now=3, fleet_size=4) is None
    resumed = guard.on_fleet_seen(down_now=2, fleet_size=4)
    assert resumed is not None
    assert not resumed.frozen


def test_guard_ignores_failures_spread_over_time() -> None:
    guard = MassFailureGuard(max_percent=50, window_s=1.0)
    for n, gateway in enumerate("abcd"):
        assert guard.on_down(gateway, n * 2.0, fleet_size=4) is None
    assert not guard.frozen
