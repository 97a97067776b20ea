"""Gateway selection: the five load-balancing strategies, and `select`, the entry point.

Pure logic: no threads, no NATS, no actors. The load-balancer actor owns one `Pool`
(actors/pool.py), one `SelectorState` and a seeded source of random numbers (`Draws`),
and calls `select` once per request. Given the pool, the rotation cursor the selection
read (`Selection.cursor`) and the numbers it drew, its outcome is determined: that is
what `gatefleet audit replay` re-runs.

Each strategy chooses among `Members` (actors/members.py): eligible gateways sorted by id,
with their figures and, built on first use, rankings by load, latency and score and
running sums of scores. So a choice costs O(log n), not a pass over the fleet: a bisect
for RoundRobin, the head of a ranking for LeastConnections and LatencyBased, a tree
descent for WeightedRandom.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from actors.members import Members, weight_of
from actors.pool import Pool
from actors.slow_start import SLOW_START_PASSES
from schemas.api import GatewaySnapshot
from schemas.settings import LoadBalancingSettings
from schemas.types import STRATEGIES


class Draws(Protocol):
    """Where selection gets random numbers: `random.Random`, or numbers recorded before."""

    def random(self) -> float: ...


# --- The strategies: each takes non-empty members and returns an id ----------------------


@dataclass
class RoundRobinState:
    """A rotation cursor: the id chosen last (an id, not an index, so that gateways
    joining or leaving neither reset nor skew the rotation)."""

    last: str | None = None


@dataclass
class SelectorState:
    """All the memory selection has: one rotation cursor per scope."""

    cursors: dict[str, RoundRobinState] = field(default_factory=dict)

    def cursor(self, scope: str) -> RoundRobinState:
        found = self.cursors.get(scope)
        if found is None:
            found = self.cursors[scope] = RoundRobinState()
        return found


def round_robin(members: Members, state: RoundRobinState) -> str:
    """Optimises fairness: every eligible gateway gets its turn, in id order. Over any
    run of selections from an unchanged pool, counts differ by at most one."""
    i = members.after(state.last)
    chosen = members.ids[i] if i < len(members) else members.ids[0]
    state.last = chosen
    return chosen


def least_connections(
    members: Members, state: RoundRobinState, passed: frozenset[str] = frozenset()
) -> str:
    """Optimises spare capacity: the lowest `connection_load`. Ties (e.g. an idle fleet)
    are shared by round robin over the tied ids, so they do not all go to one gateway.
    `passed`: gateways slow start passed over (a few): the next lowest instead."""
    chosen = members.by_load.next_tied(state.last)
    if chosen in passed:
        chosen = next((gw for _, gw in members.by_load.keys if gw not in passed), chosen)
    state.last = chosen
    return chosen


def weighted_random(members: Members, rng: Draws) -> str:
    """Optimises for health while spreading load: picks with probability proportional to
    the health score (uniformly when every score is 0). One rng draw per call."""
    weights, n = members.weights, len(members)
    if weights.total <= 0:
        return members.ids[min(int(rng.random() * n), n - 1)]
    return members.ids[weights.find(int(rng.random() * weights.total))]


@dataclass(frozen=True, slots=True)
class LatencyShare:
    """Who LatencyBased rotates among: the `count` gateways with a latency <= `limit`."""

    count: int
    best: float | None  # None: nobody reports a latency, so everyone shares
    margin: float
    limit: float


def latency_share(members: Members, margin_percent: float, margin_ms: float) -> LatencyShare:
    """The gateways within max(best * percent / 100, margin_ms) of the best latency.
    No latency counts as worst; when nobody has one, all share."""
    ranking = members.by_latency
    best = ranking.best()
    if best == math.inf:
        return LatencyShare(len(members), None, 0.0, math.inf)
    margin = max(best * margin_percent / 100.0, margin_ms)
    limit = best + margin
    return LatencyShare(ranking.count_upto(limit), best, margin, limit)


def _next_within(members: Members, share: LatencyShare, state: RoundRobinState) -> str:
    """The first id after the cursor (wrapping around) among those within the share."""
    n, last = len(members), state.last
    if share.count == n:
        chosen = round_robin(members, state)
    elif share.count * share.count <= n:  # few: take the least id after the cursor
        near = [gw_id for _, gw_id in members.by_latency.keys[: share.count]]
        later = [gw_id for gw_id in near if last is None or gw_id > last]
        chosen = min(later or near)
    else:  # many: walk the id order from the cursor (n / count steps on average, in C)
        start = members.after(last)
        order, again = itertools.tee(itertools.chain(range(start, n), range(start)))
        figures = map(members.latencies.__getitem__, again)
        within = map(operator.le, figures, itertools.repeat(share.limit))
        chosen = members.ids[next(itertools.compress(order, within))]
    state.last = chosen
    return chosen


def region_pool(
    pool: Pool, region: str | None, regions: dict[str, list[str]]
) -> tuple[str | None, Members, str]:
    """RegionAware's choice of region: (region or None for any, its members, why)."""
    if region is None:
        return None, pool.everyone, "no region requested, any region"
    for candidate in [region, *regions.get(region, [])]:
        members = pool.regions.get(candidate)
        if not members:
            continue
        if candidate == region:
            return region, members, f"region {region}"
        why = f"region {region} has no eligible gateway; nearest region {candidate}"
        return candidate, members, why
    why = f"region {region} and its nearer regions have no eligible gateway; any region"
    return None, pool.everyone, why


# --- The entry point ------------------------------------------------------------------


class Selection(msgspec.Struct, frozen=True, gc=False):
    """One selection: who was chosen (None when nobody can be), from what, and why.

    `members` are the eligible gateways the strategy chose among (for RegionAware, those
    of the chosen region): a view of the pool, to be read before the pool next changes.
    `rule` is the strategy that chose: RegionAware's inner one, or the strategy itself.
    (A Struct, not a dataclass: one is made per request, and it builds faster.)"""

    gateway_id: str | None
    strategy: str
    reason: str
    members: Members = msgspec.field(default_factory=Members)
    region: str | None = None  # the region RegionAware chose from; None: any, or not RegionAware
    rule: str = ""
    # Gateways in slow start that this selection passed over or chose -> their ramp factor.
    slow_start: dict[str, float] = msgspec.field(default_factory=dict)
    # The rotation cursor of its scope before it chose (None: none yet, or not read).
    cursor: str | None = None

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(self.members.ids)


def _count(n: int) -> str:
    return f"{n} eligible gateway{'s' if n != 1 else ''}"


def _rule(strategy: str, settings: LoadBalancingSettings) -> str:
    """The strategy that picks within the members; ValueError if there is none."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy != "RegionAware":
        return strategy
    inner = settings.region_inner_strategy
    if inner not in STRATEGIES or inner == "RegionAware":
        raise ValueError(f"region_inner_strategy cannot be {inner!r}")
    return inner


def _scope(strategy: str, region: str | None, rule: str) -> str:
    """One rotation per scope, so strategies (and regions) do not disturb each other."""
    return f"{strategy}/{region or '*'}/{rule}" if strategy == "RegionAware" else strategy


def _apply(
    rule: str,
    members: Members,
    *,
    cursor: RoundRobinState,
    rng: Draws,
    settings: LoadBalancingSettings,
    passed: frozenset[str] = frozenset(),
) -> tuple[str, str]:
    over = f"{rule} over {_count(len(members))}"
    match rule:
        case "RoundRobin":
            return round_robin(members, cursor), over
        case "LeastConnections":
            chosen = least_connections(members, cursor, passed)
            return chosen, f"{over}: lowest load {members.by_load.best():.3f}"
        case "WeightedRandom":
            return weighted_random(members, rng), f"{over}, weighted by health score"
        case "LatencyBased":
            share = latency_share(
                members, settings.latency_margin_percent, settings.latency_margin_ms
            )
            chosen = _next_within(members, share, cursor)
            if share.best is None:
                return chosen, f"{over}: none reports a latency, rotating among all"
            return chosen, (
                f"{over}: {share.count} within {share.margin:g} ms "
                f"of the best {share.best:g} ms, rotating"
            )
    raise ValueError(f"unknown strategy {rule!r}")


def select(
    strategy: str,
    pool: Pool,
    *,
    region: str | None,
    state: SelectorState,
    rng: Draws,
    settings: LoadBalancingSettings,
    regions: dict[str, list[str]],
    sticky_gateway: str | None = None,
    ramp: Callable[[str], float] | None = None,
) -> Selection:
    """Choose a gateway for one request. Never raises for an empty pool (gateway_id is
    None); raises ValueError only for an unknown strategy or inner strategy. `ramp`: each
    gateway's slow start factor (None: nobody is in slow start)."""
    rule = _rule(strategy, settings)
    if not pool.everyone:
        n = len(pool)
        known = f"{n} gateway{'s' if n != 1 else ''}, all excluded"
        why = f"no eligible gateway: {known if n else 'no gateway known'}"
        return Selection(gateway_id=None, strategy=strategy, reason=why, rule=rule)

    members, chosen_region, note = pool.everyone, None, ""
    if strategy == "RegionAware":
        chosen_region, members, note = region_pool(pool, region, regions)
    ramps: dict[str, float] = {}
    before = None
    if sticky_gateway is not None and members.find(sticky_gateway) is not None:
        gateway_id, why = sticky_gateway, "sticky client"
    else:
        cursor = state.cursor(_scope(strategy, chosen_region, rule))
        before = cursor.last
        gateway_id, why = _apply(rule, members, cursor=cursor, rng=rng, settings=settings)
        if ramp is not None:

            def again(passed: frozenset[str]) -> tuple[str, str]:
                return _apply(
                    rule, members, cursor=cursor, rng=rng, settings=settings, passed=passed
                )

            gateway_id, why, ramps = _slow_start(gateway_id, why, members, ramp, rng, again)
        why = f"{note}; {why}" if note else why
    return Selection(
        gateway_id=gateway_id,
        strategy=strategy,
        reason=why,
        members=members,
        region=chosen_region,
        rule=rule,
        slow_start=ramps,
        cursor=before,
    )


def _slow_start(
    chosen: str,
    why: str,
    members: Members,
    ramp: Callable[[str], float],
    rng: Draws,
    again: Callable[[frozenset[str]], tuple[str, str]],
) -> tuple[str, str, dict[str, float]]:
    """The strategy's pick, or another if slow start passes it over (actors/slow_start.py);
    with the reason and the ramping gateways met (id -> factor)."""
    passed: dict[str, float] = {}
    for _ in range(SLOW_START_PASSES):
        factor = ramp(chosen)
        if factor >= 1.0 or rng.random() < factor:
            break
        passed[chosen] = factor
        chosen, why = again(frozenset(passed))
    if chosen in passed:  # drawn again at the last pass: the first one not passed over
        chosen = next((gw for gw in members.ids if gw not in passed), chosen)
    factor = ramp(chosen)
    notes = [f"passed over {gw} (ramp {share:.0%})" for gw, share in passed.items()]
    if factor < 1.0:
        notes.append(f"{chosen} in slow start (ramp {factor:.0%})")
        passed[chosen] = factor
    return chosen, why + (f"; slow start: {', '.join(notes)}" if notes else ""), passed


def choose(
    strategy: str,
    members: Members,
    *,
    state: SelectorState,
    rng: Draws,
    settings: LoadBalancingSettings,
) -> str:
    """What `strategy` picks among non-empty `members`, all of one region (failover's
    choice in the failed gateway's region): as `select` with no region requested."""
    rule = _rule(strategy, settings)
    cursor = state.cursor(_scope(strategy, None, rule))
    return _apply(rule, members, cursor=cursor, rng=rng, settings=settings)[0]


# --- What an audit record keeps ---------------------------------------------------------


def _finite(figure: float) -> float | None:
    return None if math.isinf(figure) else figure


def _chance(total: int, n: int) -> Callable[[float], float | None]:
    """From a by_score key (-score) to the chance WeightedRandom gave it."""
    return (lambda neg: weight_of(-neg) / total) if total > 0 else (lambda _neg: 1 / n)


def shortlist(selection: Selection, limit: int) -> list[tuple[GatewaySnapshot, float | None]]:
    """The candidates worth recording, with the rule's measure of each: the chosen one,
    then up to `limit` others, best first by the rule's own measure (RoundRobin: next in
    turn; LeastConnections: lowest load; LatencyBased: lowest latency; WeightedRandom:
    highest chance). The measure is the load, the latency in ms, the chance (0-1), or
    None (RoundRobin, or unknown). O(limit log n), whatever the pool's size."""
    members, chosen = selection.members, selection.gateway_id
    n = len(members)
    at = None if chosen is None else members.find(chosen)
    if chosen is None or at is None:
        return []
    measure: Callable[[float], float | None] = _finite
    match selection.rule:
        case "LeastConnections":
            ranking, own = members.by_load, members.loads[at]
        case "LatencyBased":
            ranking, own = members.by_latency, members.latencies[at]
        case "WeightedRandom":
            ranking, own = members.by_score, -members.scores[at]
            measure = _chance(members.weights.total, n)
        case _:  # RoundRobin: who comes next in turn
            turns = [(at + k) % n for k in range(min(n, limit + 1))]
            return [(members.gateways[i], None) for i in turns]
    others = itertools.islice(((f, i) for f, i in ranking.keys if i != chosen), limit)
    return [
        (members.gateways[at], measure(own)),
        *((members.row(i), measure(f)) for f, i in others),
    ]
