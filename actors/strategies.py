"""Gateway selection: the eligible pool and the five load-balancing strategies.

Pure logic: no threads, no NATS, no actors. The load-balancer actor owns one
`SelectorState` and one `random.Random` and calls `select` once per request; given
those two, every outcome here is deterministic.

Pool rules: a gateway is eligible only while `status == "healthy"` and
`score >= threshold`; a `backup` with `backup_for = X` waits while X is eligible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from schemas.api import GatewaySnapshot
from schemas.settings import LoadBalancingSettings
from schemas.types import STRATEGIES

DEFAULT_CONNECTION_REFERENCE = 1000


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """One selection: who was chosen (None when nobody can be), from what, and why."""

    gateway_id: str | None
    strategy: str
    reason: str
    # Eligible ids the strategy chose among (for RegionAware: those of the chosen region).
    candidates: tuple[str, ...] = ()
    # Gateways left out of the pool: id -> reason.
    excluded: dict[str, str] = msgspec.field(default_factory=dict)
    # The region RegionAware chose from; None for the other strategies or "any region".
    region: str | None = None


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
        return self.cursors.setdefault(scope, RoundRobinState())


# --- The pool -------------------------------------------------------------------------


def partition_pool(
    gateways: Sequence[GatewaySnapshot], threshold: float, held: frozenset[str] = frozenset()
) -> tuple[list[GatewaySnapshot], dict[str, str]]:
    """Split `gateways` into the eligible pool (sorted by id) and the excluded (id -> why).

    `held`: recovered primaries whose traffic stays on their backups until an operator
    fails them back (`[ha] failback = "manual"`)."""
    by_id = {g.gateway_id: g for g in gateways}
    verdicts: dict[str, str | None] = {}  # id -> exclusion reason; None means eligible

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
            # A primary absent (or caught in a backup cycle) is not in the pool.
            if (
                primary in by_id
                and primary not in visiting
                and exclusion(primary, visiting | {gw_id}) is None
            ):
                reason = f"backup for {primary}, which is eligible"
        verdicts[gw_id] = reason
        return reason

    eligible: list[GatewaySnapshot] = []
    excluded: dict[str, str] = {}
    for gw_id in sorted(by_id):
        why = exclusion(gw_id, frozenset({gw_id}))
        if why is None:
            eligible.append(by_id[gw_id])
        else:
            excluded[gw_id] = why
    return eligible, excluded


# --- The strategies: each takes a non-empty eligible pool and returns an id ----------


def _rotate(ids: Sequence[str], state: RoundRobinState) -> str:
    """The first id after the cursor in sorted order, wrapping around; moves the cursor."""
    ordered = sorted(ids)
    last = state.last
    chosen = next((i for i in ordered if last is not None and i > last), ordered[0])
    state.last = chosen
    return chosen


def round_robin(pool: Sequence[GatewaySnapshot], state: RoundRobinState) -> str:
    """Optimises fairness: every eligible gateway gets its turn, in id order. Over any
    run of selections from an unchanged pool, counts differ by at most one."""
    return _rotate([g.gateway_id for g in pool], state)


def connection_load(g: GatewaySnapshot, reference: int = DEFAULT_CONNECTION_REFERENCE) -> float:
    """active/max_connections when the gateway reports a max, else active/reference;
    a gateway that reports no connection count at all counts as fully unknown (inf)."""
    if g.active_connections is None:
        return math.inf
    if g.max_connections is not None and g.max_connections > 0:
        return g.active_connections / g.max_connections
    return g.active_connections / reference


def least_connections(
    pool: Sequence[GatewaySnapshot],
    state: RoundRobinState,
    reference: int = DEFAULT_CONNECTION_REFERENCE,
) -> str:
    """Optimises spare capacity: the lowest `connection_load`. Ties (e.g. an idle fleet)
    are shared by round robin over the tied ids, so they do not all go to one gateway."""
    loads = {g.gateway_id: connection_load(g, reference) for g in pool}
    best = min(loads.values())
    return _rotate([i for i, load in loads.items() if load == best], state)


def weighted_random(pool: Sequence[GatewaySnapshot], rng: random.Random) -> str:
    """Optimises for health while spreading load: picks with probability proportional to
    the health score (uniformly when every score is 0). One `rng.random()` per call."""
    ordered = sorted(pool, key=lambda g: g.gateway_id)
    total = sum(g.score for g in ordered)
    if total <= 0:
        return ordered[rng.randrange(len(ordered))].gateway_id
    point = rng.random() * total
    cumulative = 0.0
    for g in ordered:
        cumulative += g.score
        if point < cumulative:
            return g.gateway_id
    return ordered[-1].gateway_id  # float rounding at the very top


def latency_share(
    pool: Sequence[GatewaySnapshot], margin_percent: float, margin_ms: float
) -> tuple[list[GatewaySnapshot], float | None, float]:
    """The gateways within max(best * percent / 100, margin_ms) of the best latency,
    with the best latency and the margin. No latency counts as worst; when nobody has
    one, the whole pool shares."""
    known = [g.latency_ms for g in pool if g.latency_ms is not None]
    if not known:
        return list(pool), None, 0.0
    best = min(known)
    margin = max(best * margin_percent / 100.0, margin_ms)
    near = [g for g in pool if g.latency_ms is not None and g.latency_ms <= best + margin]
    return near, best, margin


def latency_based(
    pool: Sequence[GatewaySnapshot],
    state: RoundRobinState,
    margin_percent: float = 10.0,
    margin_ms: float = 2.0,
) -> str:
    """Optimises client latency: the lowest latency, rotating among the gateways within
    the margin of the best so that clients do not all herd onto one."""
    near, _, _ = latency_share(pool, margin_percent, margin_ms)
    return _rotate([g.gateway_id for g in near], state)


def region_pool(
    pool: Sequence[GatewaySnapshot], region: str | None, regions: dict[str, list[str]]
) -> tuple[str | None, list[GatewaySnapshot], str]:
    """RegionAware's choice of region: (region or None for any, its gateways, why)."""
    if region is None:
        return None, list(pool), "no region requested, any region"
    for candidate in [region, *regions.get(region, [])]:
        members = [g for g in pool if g.region == candidate]
        if not members:
            continue
        if candidate == region:
            return region, members, f"region {region}"
        why = f"region {region} has no eligible gateway; nearest region {candidate}"
        return candidate, members, why
    why = f"region {region} and its nearer regions have no eligible gateway; any region"
    return None, list(pool), why


def region_aware(
    pool: Sequence[GatewaySnapshot],
    region: str | None,
    regions: dict[str, list[str]],
    inner: Callable[[Sequence[GatewaySnapshot]], str],
) -> str:
    """Optimises locality: a gateway of the requested region, else of the nearest region
    (by `regions`) that has one, else any; `inner` picks within that region."""
    _, members, _ = region_pool(pool, region, regions)
    return inner(members)


# --- The entry point ------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n} eligible gateway{'s' if n != 1 else ''}"


def _apply(
    name: str,
    pool: Sequence[GatewaySnapshot],
    *,
    cursor: RoundRobinState,
    rng: random.Random,
    settings: LoadBalancingSettings,
    reference: int,
) -> tuple[str, str]:
    over = f"{name} over {_count(len(pool))}"
    match name:
        case "RoundRobin":
            return round_robin(pool, cursor), over
        case "LeastConnections":
            chosen = least_connections(pool, cursor, reference)
            load = connection_load(next(g for g in pool if g.gateway_id == chosen), reference)
            return chosen, f"{over}: lowest load {load:.3f}"
        case "WeightedRandom":
            return weighted_random(pool, rng), f"{over}, weighted by health score"
        case "LatencyBased":
            pct, ms = settings.latency_margin_percent, settings.latency_margin_ms
            near, best, margin = latency_share(pool, pct, ms)
            chosen = latency_based(pool, cursor, pct, ms)
            if best is None:
                return chosen, f"{over}: none reports a latency, rotating among all"
            return chosen, (
                f"{over}: {len(near)} within {margin:g} ms of the best {best:g} ms, rotating"
            )
    raise ValueError(f"unknown strategy {name!r}")


def select(
    strategy: str,
    gateways: Sequence[GatewaySnapshot],
    threshold: float,
    *,
    region: str | None,
    state: SelectorState,
    rng: random.Random,
    settings: LoadBalancingSettings,
    regions: dict[str, list[str]],
    sticky_gateway: str | None = None,
    connection_reference: int = DEFAULT_CONNECTION_REFERENCE,
    held: frozenset[str] = frozenset(),
) -> Selection:
    """Choose a gateway for one request. Never raises for an empty pool (gateway_id is
    None); raises ValueError only for an unknown strategy or inner strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    inner = settings.region_inner_strategy
    if strategy == "RegionAware" and (inner not in STRATEGIES or inner == "RegionAware"):
        raise ValueError(f"region_inner_strategy cannot be {inner!r}")
    eligible, excluded = partition_pool(gateways, threshold, held)
    if not eligible:
        known = f"{len(gateways)} gateway{'s' if len(gateways) != 1 else ''}, all excluded"
        why = f"no eligible gateway: {known if gateways else 'no gateway known'}"
        return Selection(gateway_id=None, strategy=strategy, reason=why, excluded=excluded)

    name, pool, chosen_region, note = strategy, eligible, None, ""
    if strategy == "RegionAware":
        chosen_region, pool, note = region_pool(eligible, region, regions)
        name = inner
    ids = tuple(g.gateway_id for g in pool)
    if sticky_gateway is not None and sticky_gateway in ids:
        gateway_id, why = sticky_gateway, "sticky client"
    else:
        # One rotation per scope, so strategies (and regions) do not disturb each other.
        regional = strategy == "RegionAware"
        scope = f"{strategy}/{chosen_region or '*'}/{name}" if regional else strategy
        gateway_id, why = _apply(
            name,
            pool,
            cursor=state.cursor(scope),
            rng=rng,
            settings=settings,
            reference=connection_reference,
        )
        why = f"{note}; {why}" if note else why
    return Selection(
        gateway_id=gateway_id,
        strategy=strategy,
        reason=why,
        candidates=ids,
        excluded=excluded,
        region=chosen_region,
    )
