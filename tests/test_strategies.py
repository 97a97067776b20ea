"""The eligible pool and the five load-balancing strategies (pure, no server)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from actors.strategies import (
    RoundRobinState,
    Selection,
    SelectorState,
    connection_load,
    latency_based,
    least_connections,
    partition_pool,
    region_aware,
    round_robin,
    select,
    weighted_random,
)
from schemas.api import GatewaySnapshot
from schemas.settings import LoadBalancingSettings
from schemas.types import GatewayStatus, Role

# Critical values of the chi-square distribution at p = 0.001, by degrees of freedom.
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def gw(
    gateway_id: str,
    *,
    region: str = "us-west",
    status: GatewayStatus = "healthy",
    score: float = 90.0,
    active: int | None = 0,
    max_connections: int | None = None,
    latency: float | None = None,
    probe: float | None = None,
    role: Role = "primary",
    backup_for: str | None = None,
) -> GatewaySnapshot:
    return GatewaySnapshot(
        gateway_id=gateway_id,
        region=region,
        status=status,
        score=score,
        active_connections=active,
        max_connections=max_connections,
        reported_latency_ms=latency,
        probe_latency_ms=probe,
        role=role,
        backup_for=backup_for,
    )


def pick(
    strategy: str,
    gateways: Sequence[GatewaySnapshot],
    *,
    threshold: float = 70.0,
    region: str | None = None,
    state: SelectorState | None = None,
    rng: random.Random | None = None,
    settings: LoadBalancingSettings | None = None,
    regions: dict[str, list[str]] | None = None,
    sticky: str | None = None,
) -> Selection:
    return select(
        strategy,
        gateways,
        threshold,
        region=region,
        state=state if state is not None else SelectorState(),
        rng=rng if rng is not None else random.Random(1234),
        settings=settings if settings is not None else LoadBalancingSettings(),
        regions=regions if regions is not None else {},
        sticky_gateway=sticky,
    )


def ids(pool: Sequence[GatewaySnapshot]) -> list[str]:
    return [g.gateway_id for g in pool]


# --- The pool -------------------------------------------------------------------------


def test_threshold_boundary_is_inclusive() -> None:
    fleet = [gw("at", score=70.0), gw("above", score=70.0 + 1e-9), gw("below", score=69.999)]
    eligible, excluded = partition_pool(fleet, 70.0)
    assert ids(eligible) == ["above", "at"]
    assert excluded == {"below": "score 69.999 below threshold 70.0"}

    eligible, _ = partition_pool([gw("at", score=70.0)], 70.0 + 1e-9)
    assert eligible == []


def test_degraded_down_unknown_never_selected() -> None:
    fleet = [
        gw("a-degraded", status="degraded", score=100.0),
        gw("b-down", status="down", score=100.0),
        gw("c-unknown", status="unknown", score=100.0),
        gw("d-ok", score=71.0),
    ]
    _, excluded = partition_pool(fleet, 70.0)
    assert excluded == {
        "a-degraded": "status degraded",
        "b-down": "status down",
        "c-unknown": "status unknown",
    }
    for strategy in ("RoundRobin", "LeastConnections", "WeightedRandom", "LatencyBased"):
        state, rng = SelectorState(), random.Random(1)
        chosen = {pick(strategy, fleet, state=state, rng=rng).gateway_id for _ in range(50)}
        assert chosen == {"d-ok"}, strategy


def test_empty_pool_is_a_reason_not_an_exception() -> None:
    fleet = [gw("a", status="down"), gw("b", score=10.0)]
    result = pick("RoundRobin", fleet)
    assert result.gateway_id is None
    assert result.reason == "no eligible gateway: 2 gateways, all excluded"
    assert result.excluded == {"a": "status down", "b": "score 10.0 below threshold 70.0"}
    assert pick("RegionAware", [], region="eu").reason == "no eligible gateway: no gateway known"


def test_backup_waits_while_primary_eligible() -> None:
    primary, backup = gw("edge-1"), gw("edge-1b", role="backup", backup_for="edge-1")
    eligible, excluded = partition_pool([primary, backup], 70.0)
    assert ids(eligible) == ["edge-1"]
    assert excluded == {"edge-1b": "backup for edge-1, which is eligible"}
    assert {pick("RoundRobin", [primary, backup]).gateway_id} == {"edge-1"}


@pytest.mark.parametrize(
    "primary",
    [
        gw("edge-1", status="down"),
        gw("edge-1", status="degraded"),
        gw("edge-1", status="unknown"),
        gw("edge-1", score=50.0),
        None,
    ],
)
def test_backup_takes_over_when_primary_not_eligible(primary: GatewaySnapshot | None) -> None:
    backup = gw("edge-1b", role="backup", backup_for="edge-1")
    fleet = [backup] if primary is None else [primary, backup]
    eligible, _ = partition_pool(fleet, 70.0)
    assert ids(eligible) == ["edge-1b"]
    assert pick("LeastConnections", fleet).gateway_id == "edge-1b"


def test_backup_cycle_keeps_one_eligible() -> None:
    fleet = [gw("a", role="backup", backup_for="b"), gw("b", role="backup", backup_for="a")]
    eligible, excluded = partition_pool(fleet, 70.0)
    assert len(eligible) == 1
    assert len(excluded) == 1


# --- RoundRobin -----------------------------------------------------------------------


def test_round_robin_fair_over_10000() -> None:
    fleet = [gw(f"edge-{i}") for i in range(7)]
    state = SelectorState()
    counts = Counter(pick("RoundRobin", fleet, state=state).gateway_id for _ in range(10_000))
    assert set(counts) == set(ids(fleet))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_round_robin_stays_fair_as_gateways_join_and_leave() -> None:
    state = RoundRobinState()
    fleet = [gw("a"), gw("c"), gw("e")]
    first = Counter(round_robin(fleet, state) for _ in range(3_333))
    assert max(first.values()) - min(first.values()) <= 1

    fleet = [*fleet, gw("b")]  # joins mid-rotation, between existing ids
    joined = Counter(round_robin(fleet, state) for _ in range(3_333))
    assert set(joined) == {"a", "b", "c", "e"}
    assert max(joined.values()) - min(joined.values()) <= 1

    fleet = [g for g in fleet if g.gateway_id != "c"]  # leaves
    left = Counter(round_robin(fleet, state) for _ in range(3_334))
    assert set(left) == {"a", "b", "e"}
    assert max(left.values()) - min(left.values()) <= 1


def test_round_robin_cursor_survives_its_gateway_leaving() -> None:
    state = RoundRobinState(last="c")
    assert round_robin([gw("a"), gw("b"), gw("d")], state) == "d"
    assert round_robin([gw("a"), gw("b")], state) == "a"  # wraps around


def test_round_robin_reason() -> None:
    assert pick("RoundRobin", [gw("a"), gw("b"), gw("c")]).reason == (
        "RoundRobin over 3 eligible gateways"
    )


# --- LeastConnections -----------------------------------------------------------------


def test_least_connections_relative_to_max() -> None:
    # 300/1000 = 0.3 beats 50/100 = 0.5 although 300 > 50.
    fleet = [
        gw("big", active=300, max_connections=1000),
        gw("small", active=50, max_connections=100),
    ]
    assert least_connections(fleet, RoundRobinState()) == "big"


def test_least_connections_without_max_uses_reference() -> None:
    assert connection_load(gw("x", active=250)) == 0.25
    assert connection_load(gw("x", active=250), reference=500) == 0.5
    assert connection_load(gw("x", active=None)) == float("inf")
    fleet = [gw("ref", active=200), gw("rel", active=30, max_connections=100)]
    assert least_connections(fleet, RoundRobinState()) == "ref"  # 0.2 < 0.3
    assert least_connections(fleet, RoundRobinState(), reference=100) == "rel"  # 2.0 > 0.3


def test_least_connections_ties_rotate() -> None:
    fleet = [gw("a", active=5), gw("b", active=5), gw("c", active=9)]
    state = RoundRobinState()
    assert [least_connections(fleet, state) for _ in range(4)] == ["a", "b", "a", "b"]


def test_least_connections_unknown_count_is_last() -> None:
    fleet = [gw("a", active=None), gw("b", active=900)]
    assert pick("LeastConnections", fleet).gateway_id == "b"


# --- WeightedRandom -------------------------------------------------------------------


def test_weighted_random_chi_square_against_scores() -> None:
    fleet = [gw("a", score=100.0), gw("b", score=90.0), gw("c", score=80.0), gw("d", score=70.0)]
    rng, draws = random.Random(1234), 20_000
    counts = Counter(weighted_random(fleet, rng) for _ in range(draws))
    total = sum(g.score for g in fleet)
    chi2 = 0.0
    for g in fleet:
        expected = draws * g.score / total
        chi2 += (counts[g.gateway_id] - expected) ** 2 / expected
    assert chi2 < CHI2_CRITICAL_P001[len(fleet) - 1], (chi2, counts)


def test_weighted_random_is_seeded_and_handles_zero_scores() -> None:
    fleet = [gw("a", score=0.0), gw("b", score=0.0)]
    draws = [weighted_random(fleet, random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = random.Random(3)
    assert {weighted_random(fleet, rng) for _ in range(50)} == {"a", "b"}  # uniform
    assert pick("WeightedRandom", fleet, threshold=0.0).gateway_id in {"a", "b"}


# --- LatencyBased ---------------------------------------------------------------------


def test_latency_based_shares_within_margin_and_never_picks_far() -> None:
    fleet = [gw("near-1", latency=10.0), gw("near-2", latency=11.5), gw("far", latency=40.0)]
    state = SelectorState()
    counts = Counter(pick("LatencyBased", fleet, state=state).gateway_id for _ in range(1_000))
    assert counts == Counter({"near-1": 500, "near-2": 500})
    reason = pick("LatencyBased", fleet).reason
    assert (
        reason == "LatencyBased over 3 eligible gateways: 2 within 2 ms of the best 10 ms, rotating"
    )


def test_latency_margin_percent_and_probe_preferred() -> None:
    # best 100 ms, 10 % margin = 10 ms > 2 ms: 109 shares, 111 does not.
    fleet = [gw("a", latency=100.0), gw("b", latency=109.0), gw("c", latency=111.0)]
    state = RoundRobinState()
    assert {latency_based(fleet, state) for _ in range(10)} == {"a", "b"}
    # The probe overrides the gateway's own figure; no latency at all is the worst.
    fleet = [gw("a", latency=1.0, probe=50.0), gw("b", latency=30.0), gw("c")]
    assert {latency_based(fleet, RoundRobinState()) for _ in range(10)} == {"b"}


def test_latency_based_without_any_latency_rotates_all() -> None:
    fleet = [gw("a"), gw("b")]
    state = SelectorState()
    assert [pick("LatencyBased", fleet, state=state).gateway_id for _ in range(4)] == [
        "a",
        "b",
        "a",
        "b",
    ]


# --- RegionAware ----------------------------------------------------------------------

FLEET = [
    gw("us-1", region="us-west", active=10),
    gw("us-2", region="us-west", active=5),
    gw("eu-1", region="eu-west", active=50),
    gw("eu-2", region="eu-west", active=40),
    gw("ap-1", region="ap-south", active=0),
    gw("eu-c", region="eu-central", status="down"),
]
PROXIMITY = {"eu-central": ["eu-west", "us-west"], "eu-north": ["ap-east"]}


def test_region_aware_in_region_with_inner_least_connections() -> None:
    result = pick("RegionAware", FLEET, region="us-west", regions=PROXIMITY)
    assert result.gateway_id == "us-2"
    assert result.region == "us-west"
    assert result.candidates == ("us-1", "us-2")
    assert result.reason.startswith("region us-west; LeastConnections over 2 eligible")


def test_region_aware_falls_back_to_nearest_region() -> None:
    result = pick("RegionAware", FLEET, region="eu-central", regions=PROXIMITY)
    assert result.gateway_id == "eu-2"
    assert result.region == "eu-west"
    assert result.reason.startswith(
        "region eu-central has no eligible gateway; nearest region eu-west; LeastConnections"
    )
    assert result.excluded == {"eu-c": "status down"}


def test_region_aware_falls_back_to_any() -> None:
    for region in ("eu-north", "mars"):
        result = pick("RegionAware", FLEET, region=region, regions=PROXIMITY)
        assert result.gateway_id == "ap-1"  # least loaded anywhere
        assert result.region is None
        assert len(result.candidates) == 5
    assert pick("RegionAware", FLEET, region=None).reason.startswith("no region requested")


def test_region_aware_inner_strategy_is_configurable() -> None:
    settings = LoadBalancingSettings(region_inner_strategy="RoundRobin")
    state = SelectorState()
    picks = [
        pick("RegionAware", FLEET, region="eu-west", settings=settings, state=state).gateway_id
        for _ in range(4)
    ]
    assert picks == ["eu-1", "eu-2", "eu-1", "eu-2"]
    # Each region keeps its own rotation.
    assert (
        pick("RegionAware", FLEET, region="us-west", settings=settings, state=state).gateway_id
        == "us-1"
    )
    assert region_aware(FLEET, "us-west", {}, lambda pool: max(ids(pool))) == "us-2"


def test_other_strategies_ignore_region() -> None:
    fleet = [gw("a", region="eu-west"), gw("b", region="us-west")]
    assert pick("LeastConnections", fleet, region="us-west").gateway_id == "a"


# --- Sticky clients and errors --------------------------------------------------------


def test_sticky_client_kept_while_eligible() -> None:
    fleet = [gw("a", active=0), gw("b", active=900)]
    result = pick("LeastConnections", fleet, sticky="b")
    assert (result.gateway_id, result.reason) == ("b", "sticky client")
    assert pick("LeastConnections", [gw("a"), gw("b", status="down")], sticky="b").gateway_id == "a"
    assert pick("LeastConnections", fleet, sticky="gone").gateway_id == "a"


def test_sticky_in_region_aware_must_be_in_chosen_region() -> None:
    result = pick("RegionAware", FLEET, region="us-west", sticky="eu-1")
    assert result.gateway_id == "us-2"
    result = pick("RegionAware", FLEET, region="eu-west", sticky="eu-1")
    assert (result.gateway_id, result.reason) == ("eu-1", "sticky client")


def test_unknown_strategy_raises() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        pick("Fastest", FLEET)
    with pytest.raises(ValueError, match="region_inner_strategy"):
        pick(
            "RegionAware",
            FLEET,
            settings=LoadBalancingSettings(region_inner_strategy="RegionAware"),
        )


def test_held_primary_stays_out_and_its_backup_serves() -> None:
    fleet = [
        GatewaySnapshot(gateway_id="p", region="r", status="healthy", score=90.0),
        GatewaySnapshot(
            gateway_id="b", region="r", status="healthy", score=90.0, role="backup", backup_for="p"
        ),
    ]
    eligible, excluded = partition_pool(fleet, 70.0, held=frozenset({"p"}))
    assert [g.gateway_id for g in eligible] == ["b"]
    assert excluded == {"p": "held on its backup until an operator fails it back"}
