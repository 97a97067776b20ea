"""The eligible gateways of one scope (the whole pool, or one region), as strategies read them.

Pure data structures, no threads. `Members` keeps the gateways sorted by id with, in
parallel lists, the three figures the strategies compare: connection load, latency and
health score. Built on first use and then kept up to date row by row, it also holds what
makes a strategy cheaper than a scan of every gateway per request:

- `Ranking`: ids sorted by one figure (lowest first, ties by id), for "the least loaded"
  and "the lowest latency" in O(log n);
- `Weights`: running sums of the scores in id order (a Fenwick tree), for a draw with
  probability proportional to the score in O(log n). The sums are of whole numbers (the
  score in thousandths, `weight_of`), so they are exact: a draw picks the same gateway
  whatever order the pool was built in, which replaying a selection relies on.

An update that changes a figure costs O(log n) per index built (plus a list shift on a
join or leave); indexes no strategy has asked for cost nothing.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable

from schemas.api import GatewaySnapshot

DEFAULT_CONNECTION_REFERENCE = 1000
WEIGHT_SCALE = 1000  # a score's weight for WeightedRandom: thousandths of a point


def weight_of(score: float) -> int:
    """A score (0-100) as a whole weight (exact sums, whatever their order)."""
    return round(score * WEIGHT_SCALE)


def connection_load(g: GatewaySnapshot, reference: int = DEFAULT_CONNECTION_REFERENCE) -> float:
    """active/max_connections when the gateway reports a max, else active/reference;
    a gateway that reports no connection count at all counts as fully unknown (inf)."""
    if g.active_connections is None:
        return math.inf
    if g.max_connections is not None and g.max_connections > 0:
        return g.active_connections / g.max_connections
    return g.active_connections / reference


def latency_of(g: GatewaySnapshot) -> float:
    """The latency a client would see; inf when unknown (so it ranks last)."""
    latency = g.latency_ms
    return math.inf if latency is None else latency


_FIGURE = operator.itemgetter(0)


class Ranking:
    """Ids sorted by a figure, lowest first, ties by id: `keys` is [(figure, id), ...]."""

    __slots__ = ("keys",)

    def __init__(self, figures: Iterable[float], ids: Iterable[str]) -> None:
        self.keys: list[tuple[float, str]] = sorted(zip(figures, ids, strict=True))

    def add(self, figure: float, gateway_id: str) -> None:
        insort(self.keys, (figure, gateway_id))

    def remove(self, figure: float, gateway_id: str) -> None:
        del self.keys[bisect_left(self.keys, (figure, gateway_id))]

    def move(self, old: float, new: float, gateway_id: str) -> None:
        if old != new:
            self.remove(old, gateway_id)
            self.add(new, gateway_id)

    def best(self) -> float:
        return self.keys[0][0]

    def count_upto(self, limit: float) -> int:
        """How many have a figure <= limit."""
        return bisect_right(self.keys, limit, key=_FIGURE)

    def next_tied(self, last: str | None) -> str:
        """Among those with the best figure, the first id after `last`, wrapping around."""
        keys = self.keys
        if last is not None:
            best = keys[0][0]
            j = bisect_right(keys, (best, last))
            if j < len(keys) and keys[j][0] == best:
                return keys[j][1]
        return keys[0][1]


class Weights:
    """Running sums of whole numbers (a Fenwick tree): `find(point)` is the first index
    whose cumulative sum exceeds `point`, `set` changes one value; both O(log n)."""

    __slots__ = ("_top", "_tree", "total", "values")

    def __init__(self, values: Iterable[int]) -> None:
        self.values = list(values)
        n = len(self.values)
        tree = [0, *self.values]
        for i in range(1, n + 1):
            parent = i + (i & -i)
            if parent <= n:
                tree[parent] += tree[i]
        self._tree = tree
        self._top = 1 << (n.bit_length() - 1) if n else 0
        self.total = sum(self.values)

    def set(self, index: int, value: int) -> None:
        delta = value - self.values[index]
        if delta == 0:
            return
        self.values[index] = value
        self.total += delta
        i, tree, n = index + 1, self._tree, len(self.values)
        while i <= n:
            tree[i] += delta
            i += i & -i

    def find(self, point: int) -> int:
        pos, rest, step, tree, n = 0, point, self._top, self._tree, len(self.values)
        while step:
            nxt = pos + step
            if nxt <= n and tree[nxt] <= rest:
                pos, rest = nxt, rest - tree[nxt]
            step >>= 1
        return min(pos, n - 1)  # the min: a point past the total


class Members:
    """Gateways sorted by id (`ids`, `gateways`), with `loads` (connection_load, inf when
    unknown), `latencies` (ms, inf when unknown) and `scores` in parallel lists, and the
    indexes strategies ask for (`by_load`, `by_latency`, `by_score`, `weights`)."""

    __slots__ = (
        "_by_latency",
        "_by_load",
        "_by_score",
        "_picked_since_built",
        "_weights",
        "gateways",
        "ids",
        "latencies",
        "loads",
        "picks",
        "reference",
        "scores",
    )

    def __init__(self, reference: int = DEFAULT_CONNECTION_REFERENCE) -> None:
        self.reference = reference
        self.ids: list[str] = []
        self.gateways: list[GatewaySnapshot] = []
        self.loads: list[float] = []
        self.latencies: list[float] = []
        self.scores: list[float] = []
        # Selections of each gateway since its last heartbeat: each counts as one more
        # connection in its load, so LeastConnections does not send every request between
        # two heartbeats to the same gateway (docs/ARCHITECTURE.md, "Load balancing").
        self.picks: dict[str, int] = {}
        self._by_load: Ranking | None = None
        self._picked_since_built = False  # loads of picked gateways not yet updated
        self._by_latency: Ranking | None = None
        self._by_score: Ranking | None = None  # by -score: the highest first
        self._weights: Weights | None = None

    @classmethod
    def of(
        cls, gateways: Iterable[GatewaySnapshot], reference: int = DEFAULT_CONNECTION_REFERENCE
    ) -> Members:
        """Members from any gateways (the last of a repeated id wins), ignoring eligibility."""
        members = cls(reference)
        for g in gateways:
            members.put(g)
        return members

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, gateway_id: str) -> int | None:
        """The index of `gateway_id`, or None."""
        i = bisect_left(self.ids, gateway_id)
        return i if i < len(self.ids) and self.ids[i] == gateway_id else None

    def after(self, last: str | None) -> int:
        """Where a rotation whose cursor is `last` resumes: the index of the first id after it."""
        return 0 if last is None else bisect_right(self.ids, last)

    # Indexes, built on first use ---------------------------------------------------------

    @property
    def by_load(self) -> Ranking:
        """Built on first use; until then a pick updates only `picks` (the load is read
        through this ranking alone), and the loads of the picked are brought up to date here."""
        if self._by_load is None:
            if self._picked_since_built:
                for gateway_id, count in self.picks.items():
                    i = bisect_left(self.ids, gateway_id)  # picks hold members only
                    self.loads[i] = self._load(self.gateways[i], count)
                self._picked_since_built = False
            self._by_load = Ranking(self.loads, self.ids)
        return self._by_load

    @property
    def by_latency(self) -> Ranking:
        if self._by_latency is None:
            self._by_latency = Ranking(self.latencies, self.ids)
        return self._by_latency

    @property
    def by_score(self) -> Ranking:
        """Ranked by -score: the healthiest first."""
        if self._by_score is None:
            self._by_score = Ranking((-s for s in self.scores), self.ids)
        return self._by_score

    @property
    def weights(self) -> Weights:
        if self._weights is None:
            self._weights = Weights(map(weight_of, self.scores))
        return self._weights

    # Changes -----------------------------------------------------------------------------

    def _load(self, g: GatewaySnapshot, picks: int | None = None) -> float:
        load = connection_load(g, self.reference)
        if picks is None:
            picks = self.picks.get(g.gateway_id)
            if picks is None:
                return load
        capacity = g.max_connections if g.max_connections else self.reference
        return load + picks / capacity

    def picked(self, gateway_id: str, times: int = 1) -> bool:
        """A selection chose it: one more connection until its next heartbeat says (or
        `times` more: picks given back, see Pool.without). False if it is not a member."""
        i = self.find(gateway_id)
        if i is None:
            return False
        picks = self.picks
        count = picks[gateway_id] = picks.get(gateway_id, 0) + times
        by_load = self._by_load
        if by_load is None:
            self._picked_since_built = True
            return True
        loads = self.loads
        old, new = loads[i], self._load(self.gateways[i], count)
        loads[i] = new
        by_load.move(old, new, gateway_id)
        return True

    def put(self, g: GatewaySnapshot) -> None:
        """Adds `g`, or replaces the row of its id."""
        gw_id = g.gateway_id
        i = bisect_left(self.ids, gw_id)
        present = i < len(self.ids) and self.ids[i] == gw_id
        if not present or self.gateways[i].last_seq != g.last_seq:
            self.picks.pop(gw_id, None)  # a new heartbeat counts its connections itself
        load, latency, score = self._load(g), latency_of(g), g.score
        if present:
            old_load, old_latency, old_score = self.loads[i], self.latencies[i], self.scores[i]
            self.gateways[i], self.loads[i] = g, load
            self.latencies[i], self.scores[i] = latency, score
            if self._by_load is not None:
                self._by_load.move(old_load, load, gw_id)
            if self._by_latency is not None:
                self._by_latency.move(old_latency, latency, gw_id)
            if self._by_score is not None:
                self._by_score.move(-old_score, -score, gw_id)
            if self._weights is not None:
                self._weights.set(i, weight_of(score))
            return
        self.ids.insert(i, gw_id)
        self.gateways.insert(i, g)
        self.loads.insert(i, load)
        self.latencies.insert(i, latency)
        self.scores.insert(i, score)
        if self._by_load is not None:
            self._by_load.add(load, gw_id)
        if self._by_latency is not None:
            self._by_latency.add(latency, gw_id)
        if self._by_score is not None:
            self._by_score.add(-score, gw_id)
        self._weights = None  # positions moved: rebuilt on next use

    def drop(self, gateway_id: str) -> GatewaySnapshot | None:
        """Removes `gateway_id`; returns its row, or None if it was not there."""
        i = self.find(gateway_id)
        if i is None:
            return None
        if self._by_load is not None:
            self._by_load.remove(self.loads[i], gateway_id)
        if self._by_latency is not None:
            self._by_latency.remove(self.latencies[i], gateway_id)
        if self._by_score is not None:
            self._by_score.remove(-self.scores[i], gateway_id)
        self._weights = None
        self.picks.pop(gateway_id, None)
        g = self.gateways.pop(i)
        del self.ids[i], self.loads[i], self.latencies[i], self.scores[i]
        return g

    def row(self, gateway_id: str) -> GatewaySnapshot:
        i = self.find(gateway_id)
        if i is None:
            raise KeyError(gateway_id)
        return self.gateways[i]
