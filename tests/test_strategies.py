"""The eligible pool and the five load-balancing strategies (pure, no server)."""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence

import msgspec
import pytest

from actors.members import Members, Weights, connection_load, weight_of
from actors.pool import Pool
from actors.selection_log import AUDIT_CANDIDATES, AUDIT_EXCLUDED, selection_event
from actors.strategies import (
    RoundRobinState,
    Selection,
    SelectorState,
    least_connections,
    round_robin,
    select,
    shortlist,
    weighted_random,
)
from schemas.api import GatewaySnapshot, LoadBalancingConfig, SelectRequest
from schemas.codec import encode
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


def partition_pool(
    gateways: Sequence[GatewaySnapshot], threshold: float, held: frozenset[str] = frozenset()
) -> tuple[list[GatewaySnapshot], dict[str, str]]:
    """The eligible pool (sorted by id) and the excluded (id -> why) of a one-off Pool."""
    pool = Pool.of(gateways, threshold, held)
    return list(pool.everyone.gateways), pool.excluded()


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
        Pool.of(gateways, threshold),
        region=region,
        state=state if state is not None else SelectorState(),
        rng=rng if rng is not None else random.Random(1234),
        settings=settings if settings is not None else LoadBalancingSettings(),
        regions=regions if regions is not None else {},
        sticky_gateway=sticky,
    )


def ids(pool: Sequence[GatewaySnapshot]) -> list[str]:
    return [g.gateway_id for g in pool]


def m(fleet: Sequence[GatewaySnapshot], reference: int = 1000) -> Members:
    """The strategies' input: gateways sorted by id, with their figures alongside."""
    return Members.of(fleet, reference)


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
    assert Pool.of(fleet, 70.0).excluded() == {
        "a": "status down",
        "b": "score 10.0 below threshold 70.0",
    }
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
    first = Counter(round_robin(m(fleet), state) for _ in range(3_333))
    assert max(first.values()) - min(first.values()) <= 1

    fleet = [*fleet, gw("b")]  # joins mid-rotation, between existing ids
    joined = Counter(round_robin(m(fleet), state) for _ in range(3_333))
    assert set(joined) == {"a", "b", "c", "e"}
    assert max(joined.values()) - min(joined.values()) <= 1

    fleet = [g for g in fleet if g.gateway_id != "c"]  # leaves
    left = Counter(round_robin(m(fleet), state) for _ in range(3_334))
    assert set(left) == {"a", "b", "e"}
    assert max(left.values()) - min(left.values()) <= 1


def test_round_robin_cursor_survives_its_gateway_leaving() -> None:
    state = RoundRobinState(last="c")
    assert round_robin(m([gw("a"), gw("b"), gw("d")]), state) == "d"
    assert round_robin(m([gw("a"), gw("b")]), state) == "a"  # wraps around


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
    assert least_connections(m(fleet), RoundRobinState()) == "big"


def test_least_connections_without_max_uses_reference() -> None:
    assert connection_load(gw("x", active=250)) == 0.25
    assert connection_load(gw("x", active=250), reference=500) == 0.5
    assert connection_load(gw("x", active=None)) == float("inf")
    fleet = [gw("ref", active=200), gw("rel", active=30, max_connections=100)]
    assert least_connections(m(fleet), RoundRobinState()) == "ref"  # 0.2 < 0.3
    assert least_connections(m(fleet, reference=100), RoundRobinState()) == "rel"  # 2.0 > 0.3


def test_least_connections_ties_rotate() -> None:
    fleet = [gw("a", active=5), gw("b", active=5), gw("c", active=9)]
    state = RoundRobinState()
    assert [least_connections(m(fleet), state) for _ in range(4)] == ["a", "b", "a", "b"]


def test_least_connections_counts_selections_since_the_last_heartbeat() -> None:
    """Between two heartbeats the least loaded gateway does not take every request: each
    selection counts as one more connection until its next heartbeat reports."""
    fleet = [
        GatewaySnapshot(
            gateway_id=f"gw-{i}",
            region="us-west",
            status="healthy",
            score=90.0,
            active_connections=100 + 5 * i,
            max_connections=1000,
            last_seq=1,
        )
        for i in range(10)
    ]
    pool, state, rng = Pool.of(fleet, 70.0), SelectorState(), random.Random(1)
    picks: Counter[str | None] = Counter()
    for _ in range(1000):
        chosen = select(
            "LeastConnections",
            pool,
            region=None,
            state=state,
            rng=rng,
            settings=LoadBalancingSettings(),
            regions={},
        ).gateway_id
        picks[chosen] += 1
        assert chosen is not None
        pool.picked(chosen)
    connections = [100 + 5 * i + picks[f"gw-{i}"] for i in range(10)]
    assert max(connections) - min(connections) <= 1  # levelled, not herded
    assert max(picks.values()) < 150
    # The gateway's next heartbeat replaces the estimate with its own count.
    beat = msgspec.structs.replace(fleet[0], active_connections=100, last_seq=2)
    pool.update(beat)
    i = pool.everyone.find("gw-0")
    assert i is not None
    assert pool.everyone.loads[i] == 0.1


def test_picks_made_before_least_connections_is_first_used_count_when_it_is() -> None:
    """Under another strategy a pick updates only the counts (nothing reads the loads);
    the ranking LeastConnections builds on first use has them, as if kept all along."""
    lazy = Members.of([gw("a", active=10, max_connections=100), gw("b", active=12)])
    eager = Members.of([gw("a", active=10, max_connections=100), gw("b", active=12)])
    eager.by_load  # noqa: B018 - built first: every pick moves it
    for gateway_id in ("a", "a", "a", "b"):
        lazy.picked(gateway_id)
        eager.picked(gateway_id)
    assert lazy.by_load.keys == eager.by_load.keys
    assert [gateway_id for _, gateway_id in lazy.by_load.keys] == ["b", "a"]  # 0.013, 0.13
    lazy.picked("b", 200)
    eager.picked("b", 200)
    assert lazy.by_load.keys == eager.by_load.keys
    assert lazy.by_load.best() == 0.13


def test_least_connections_unknown_count_is_last() -> None:
    fleet = [gw("a", active=None), gw("b", active=900)]
    assert pick("LeastConnections", fleet).gateway_id == "b"


# --- WeightedRandom -------------------------------------------------------------------


def test_weighted_random_chi_square_against_scores() -> None:
    fleet = [gw("a", score=100.0), gw("b", score=90.0), gw("c", score=80.0), gw("d", score=70.0)]
    rng, draws = random.Random(1234), 20_000
    counts = Counter(weighted_random(m(fleet), rng) for _ in range(draws))
    total = sum(g.score for g in fleet)
    chi2 = 0.0
    for g in fleet:
        expected = draws * g.score / total
        chi2 += (counts[g.gateway_id] - expected) ** 2 / expected
    assert chi2 < CHI2_CRITICAL_P001[len(fleet) - 1], (chi2, counts)


def test_weighted_random_is_seeded_and_handles_zero_scores() -> None:
    fleet = [gw("a", score=0.0), gw("b", score=0.0)]
    draws = [weighted_random(m(fleet), random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = random.Random(3)
    assert {weighted_random(m(fleet), rng) for _ in range(50)} == {"a", "b"}  # uniform
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
    state = SelectorState()
    assert {pick("LatencyBased", fleet, state=state).gateway_id for _ in range(10)} == {"a", "b"}
    # The probe overrides the gateway's own figure; no latency at all is the worst.
    fleet = [gw("a", latency=1.0, probe=50.0), gw("b", latency=30.0), gw("c")]
    state = SelectorState()
    assert {pick("LatencyBased", fleet, state=state).gateway_id for _ in range(10)} == {"b"}


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
    assert Pool.of(FLEET, 70.0).excluded() == {"eu-c": "status down"}


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
    settings = LoadBalancingSettings(region_inner_strategy="LatencyBased")
    picked = pick("RegionAware", FLEET, region="eu-west", settings=settings)
    assert (picked.rule, picked.candidates) == ("LatencyBased", ("eu-1", "eu-2"))


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


# --- The pool, kept incrementally -----------------------------------------------------


def reference_partition(
    gateways: Sequence[GatewaySnapshot], threshold: float, held: frozenset[str]
) -> tuple[list[str], dict[str, str]]:
    """The pool rules as a whole-fleet pass (what the pool computed per request before it
    was kept incrementally): eligible ids by id, and excluded id -> why."""
    by_id = {g.gateway_id: g for g in gateways}
    verdicts: dict[str, str | None] = {}

    def exclusion(gw_id: str, visiting: frozenset[str]) -> str | None:
        if gw_id in verdicts:
            return verdicts[gw_id]
        g = by_id[gw_id]
        reason: str | None = None
        if g.status != "healthy":
            reason = f"status {g.status}"
        elif g.score < threshold:
            reason = f"score {float(g.score)} below threshold {float(threshold)}"
        elif gw_id in held:
            reason = "held on its backup until an operator fails it back"
        elif g.role == "backup" and g.backup_for is not None:
            primary = g.backup_for
            if (
                primary in by_id
                and primary not in visiting
                and exclusion(primary, visiting | {gw_id}) is None
            ):
                reason = f"backup for {primary}, which is eligible"
        verdicts[gw_id] = reason
        return reason

    eligible, excluded = [], {}
    for gw_id in sorted(by_id):
        why = exclusion(gw_id, frozenset({gw_id}))
        if why is None:
            eligible.append(gw_id)
        else:
            excluded[gw_id] = why
    return eligible, excluded


def random_gateway(rng: random.Random, names: Sequence[str]) -> GatewaySnapshot:
    backup = rng.random() < 0.4
    return gw(
        rng.choice(names),
        region=rng.choice(["eu", "us", "ap"]),
        status=rng.choice(["healthy", "healthy", "healthy", "degraded", "down"]),
        score=rng.choice([50.0, 69.0, 70.0, 80.0, 95.0]),
        active=rng.choice([None, 0, 10, 500]),
        max_connections=rng.choice([None, 100, 1000]),
        latency=rng.choice([None, 1.0, 5.0, 30.0]),
        role="backup" if backup else "primary",
        backup_for=rng.choice(names) if backup else None,
    )


def assert_pool_matches_rules(pool: Pool) -> None:
    eligible, excluded = reference_partition(
        list(pool.gateways.values()), pool.threshold, pool.held
    )
    assert pool.everyone.ids == eligible
    assert pool.excluded() == excluded
    assert pool.excluded_count == len(excluded)
    # Each scope's rows are the latest snapshots, with their figures alongside.
    scopes = [pool.everyone, *pool.regions.values()]
    for members in scopes:
        assert members.ids == sorted(members.ids)
        assert members.gateways == [pool.gateways[i] for i in members.ids]
        assert members.loads == [connection_load(g) for g in members.gateways]
        assert members.scores == [g.score for g in members.gateways]
        # The indexes (built on first use, then kept up to date) agree with the rows.
        assert members.by_load.keys == sorted(zip(members.loads, members.ids, strict=True))
        latencies = [math.inf if g.latency_ms is None else g.latency_ms for g in members.gateways]
        assert members.by_latency.keys == sorted(zip(latencies, members.ids, strict=True))
        assert members.by_score.keys == sorted((-g.score, g.gateway_id) for g in members.gateways)
        assert members.weights.values == [weight_of(s) for s in members.scores]
        assert members.weights.total == sum(members.weights.values)
    by_region: dict[str, list[str]] = {}
    for gw_id in eligible:
        by_region.setdefault(pool.gateways[gw_id].region, []).append(gw_id)
    assert {r: members.ids for r, members in pool.regions.items()} == by_region


@pytest.mark.parametrize("seed", range(20))
def test_incremental_pool_always_matches_the_whole_fleet_rules(seed: int) -> None:
    """Updates, removals, threshold and hold changes in any order, with backup chains and
    cycles (few names, so links are frequent): the pool equals a whole-fleet pass."""
    rng = random.Random(seed)
    names = [f"g{i}" for i in range(12)]
    pool = Pool(70.0)
    for _ in range(400):
        roll = rng.random()
        if roll < 0.7:
            pool.update(random_gateway(rng, names))
        elif roll < 0.8:
            pool.remove(rng.choice(names))
        elif roll < 0.9:
            pool.set_threshold(rng.choice([0.0, 69.5, 70.0, 85.0]))
        elif roll < 0.95:
            pool.hold(rng.choice(names))
        else:
            pool.release(rng.choice(names))
        assert_pool_matches_rules(pool)


def test_a_heartbeat_that_changes_only_metrics_updates_the_row_in_place() -> None:
    pool = Pool.of([gw("a", region="eu", active=5), gw("b", region="eu", active=9)], 70.0)
    busier = gw("a", region="eu", active=50, latency=3.0)
    pool.update(busier)
    assert pool.everyone.gateways[0] is busier
    assert pool.regions["eu"].gateways[0] is busier
    assert pool.everyone.loads == [0.05, 0.009]
    assert pool.everyone.latencies == [3.0, float("inf")]
    assert least_connections(pool.everyone, RoundRobinState()) == "b"


def test_backup_chain_follows_its_primaries() -> None:
    fleet = [
        gw("a"),
        gw("b", role="backup", backup_for="a"),
        gw("c", role="backup", backup_for="b"),
    ]
    pool = Pool.of(fleet, 70.0)
    assert pool.everyone.ids == ["a", "c"]  # b waits for a; c's primary b is not eligible
    pool.update(gw("a", status="down"))
    assert pool.everyone.ids == ["b"]  # b takes over, so c waits again
    assert pool.exclusion("c") == "backup for b, which is eligible"
    pool.remove("a")
    assert pool.everyone.ids == ["b"]
    pool.update(gw("a"))
    assert pool.everyone.ids == ["a", "c"]


def test_excluded_are_listed_lazily_and_can_be_capped() -> None:
    fleet = [gw(f"down-{i:02}", status="down") for i in range(30)] + [gw("up")]
    pool = Pool.of(fleet, 70.0)
    assert pool.excluded_count == 30
    first = pool.excluded(limit=5)
    assert first == {f"down-{i:02}": "status down" for i in range(5)}
    assert pool.exclusion("up") is None


def test_without_judges_as_if_gone_and_restores() -> None:
    fleet = [gw("p"), gw("b", role="backup", backup_for="p"), gw("x", region="eu")]
    pool = Pool.of(fleet, 70.0)
    before = (list(pool.everyone.ids), pool.excluded(), set(pool.regions))
    with pool.without("p"):
        assert pool.everyone.ids == ["b", "x"]
        assert pool.backups_of("p") == ["b"]
    assert (list(pool.everyone.ids), pool.excluded(), set(pool.regions)) == before
    assert pool.backups_of("p") == []  # b waits while p is eligible


def test_strategies_over_a_large_pool_match_their_definitions() -> None:
    """The C-speed scans (min, index, compress, accumulate) pick what the plain
    definitions say, over 1,000 gateways with ties and unknowns."""
    rng = random.Random(5)
    fleet = [
        gw(
            f"g{i:04}",
            score=rng.choice([70.0, 80.0, 90.0]),
            active=rng.choice([None, 1, 2, 3, 50]),
            max_connections=rng.choice([None, 100]),
            latency=rng.choice([None, 10.0, 10.5, 11.0, 40.0]),
        )
        for i in range(1000)
    ]
    members = m(fleet)
    state = RoundRobinState()
    loads = {g.gateway_id: connection_load(g) for g in fleet}
    best = min(loads.values())
    tied = sorted(i for i, load in loads.items() if load == best)
    assert [least_connections(members, state) for _ in range(len(tied) + 1)] == [
        *tied,
        tied[0],
    ]
    known = [g.latency_ms for g in fleet if g.latency_ms is not None]
    near = sorted(
        g.gateway_id for g in fleet if g.latency_ms is not None and g.latency_ms <= min(known) + 2.0
    )
    pool, selector = Pool.of(fleet, 0.0), SelectorState()
    latency_based = [
        select(
            "LatencyBased",
            pool,
            region=None,
            state=selector,
            rng=random.Random(1),
            settings=LoadBalancingSettings(),
            regions={},
        ).gateway_id
        for _ in range(len(near))
    ]
    assert latency_based == near
    # WeightedRandom: the same draw lands on the same gateway as a cumulative walk.
    draw = random.Random(9).random() * sum(g.score for g in fleet)
    walk, expected = 0.0, fleet[-1].gateway_id
    for g in fleet:
        walk += g.score
        if draw < walk:
            expected = g.gateway_id
            break
    assert weighted_random(members, random.Random(9)) == expected


def test_weights_find_the_first_cumulative_sum_above_the_point() -> None:
    rng = random.Random(3)
    for n in (1, 2, 3, 7, 8, 9, 100):
        values = [rng.randrange(0, 100) for _ in range(n)]
        weights = Weights(values)
        for _ in range(20):  # change some, as heartbeats do
            i = rng.randrange(n)
            values[i] = rng.randrange(0, 100)
            weights.set(i, values[i])
        cumulative = list(itertools.accumulate(values))
        assert weights.total == cumulative[-1]
        for point in [0, 1, *cumulative, *(c - 1 for c in cumulative)]:
            if point < weights.total:
                assert weights.find(point) == bisect_right(cumulative, point), (values, point)


def test_shortlist_keeps_the_chosen_and_the_best_by_the_strategys_measure() -> None:
    fleet = [gw(f"g{i:03}", active=i % 7, max_connections=100) for i in range(200)]
    pool = Pool.of(fleet, 70.0)
    state, rng, settings = SelectorState(), random.Random(1), LoadBalancingSettings()

    def run(strategy: str) -> tuple[Selection, list[tuple[GatewaySnapshot, float | None]]]:
        selection = select(
            strategy, pool, region=None, state=state, rng=rng, settings=settings, regions={}
        )
        return selection, shortlist(selection, 10)

    selection, short = run("LeastConnections")
    assert len(short) == 11
    assert short[0][0].gateway_id == selection.gateway_id
    assert [measure for _, measure in short] == [0.0] * 11  # 29 idle gateways: the best
    selection, short = run("RoundRobin")
    assert selection.gateway_id is not None
    start = int(selection.gateway_id[1:])
    assert [g.gateway_id for g, _ in short] == [f"g{(start + k) % 200:03}" for k in range(11)]
    assert {measure for _, measure in short} == {None}
    _, short = run("WeightedRandom")
    assert all(measure == pytest.approx(1 / 200) for _, measure in short)
    unknown = Pool.of([gw("a", active=None), gw("b", active=None)], 70.0)
    selection = select(
        "LeastConnections",
        unknown,
        region=None,
        state=state,
        rng=rng,
        settings=settings,
        regions={},
    )
    assert [measure for _, measure in shortlist(selection, 10)] == [None, None]  # not inf


def test_audit_record_is_bounded_whatever_the_fleet_size() -> None:
    fleet = [
        GatewaySnapshot(
            gateway_id=f"gateway-{i:05}",
            region="eu-west",
            status="healthy" if i % 5 else "down",
            score=95.5,
            cpu_percent=12.5,
            memory_percent=40.25,
            active_connections=i % 100,
            max_connections=1000,
            reported_latency_ms=3.25,
            config_versions={"Route": 3, "Auth": 7},
            labels={"rack": "r1"},
        )
        for i in range(5000)
    ]
    pool = Pool.of(fleet, 70.0)
    config = LoadBalancingConfig(strategy="LeastConnections", health_threshold=70.0)
    selection = select(
        config.strategy,
        pool,
        region=None,
        state=SelectorState(),
        rng=random.Random(1),
        settings=LoadBalancingSettings(),
        regions={},
    )
    event = selection_event("evt-1", SelectRequest(), selection, pool, config)
    assert len(event.candidates) == AUDIT_CANDIDATES + 1
    assert event.candidate_count == 4000
    assert event.candidates[0].gateway_id == selection.gateway_id
    assert event.candidates[0].measure == 0.001  # i % 100 == 0 only for down gateways
    assert len(event.excluded) == AUDIT_EXCLUDED
    assert event.excluded_count == 1000
    assert len(encode(event)) < 16 * 1024
