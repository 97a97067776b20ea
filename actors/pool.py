"""The selection pool: every known gateway, and which are eligible, kept one change at a time.

Pure logic, no threads. Rules: a gateway is eligible only while `status == "healthy"`,
`score >= threshold`, it is not flapping, in maintenance or held; a `backup` with `backup_for = X` waits while X
is eligible.

An update re-judges only the gateways linked to the one that changed by `backup_for` (its
primary and its backups, transitively), and an update that changes no input of
eligibility (a heartbeat's new metrics) just replaces the gateway's row in the eligible
`Members`. Exclusion reasons are worked out only when asked for.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from actors.members import DEFAULT_CONNECTION_REFERENCE, Members
from schemas.api import GatewaySnapshot


class Pool:
    """Every known gateway, and which are eligible, kept up to date one change at a time.

    `gateways` is the whole table (id -> latest snapshot); `everyone` the eligible ones;
    `regions` the eligible ones per region (a region with none has no entry).
    `held`: recovered primaries whose traffic stays on their backups until an operator
    fails them back (`[ha] failback = "manual"`).
    """

    def __init__(
        self,
        threshold: float = 0.0,
        *,
        held: Iterable[str] = (),
        reference: int = DEFAULT_CONNECTION_REFERENCE,
    ) -> None:
        self.threshold = threshold
        self.held: frozenset[str] = frozenset(held)
        self.reference = reference
        self.gateways: dict[str, GatewaySnapshot] = {}
        self.everyone = Members(reference)
        self.regions: dict[str, Members] = {}
        self._excluded: list[str] = []  # sorted ids of known, not eligible gateways
        self._backups: dict[str, set[str]] = {}  # primary id -> backups naming it

    @classmethod
    def of(
        cls,
        gateways: Iterable[GatewaySnapshot],
        threshold: float,
        held: Iterable[str] = (),
        reference: int = DEFAULT_CONNECTION_REFERENCE,
    ) -> Pool:
        pool = cls(threshold, held=held, reference=reference)
        for g in gateways:
            pool.update(g)
        return pool

    def __len__(self) -> int:
        return len(self.gateways)

    # Changes ---------------------------------------------------------------------------

    def update(self, snapshot: GatewaySnapshot) -> None:
        """A gateway's new snapshot (it may be new)."""
        gw_id = snapshot.gateway_id
        old = self.gateways.get(gw_id)
        self.gateways[gw_id] = snapshot
        if old is not None and self._same_standing(old, snapshot):
            if self.everyone.find(gw_id) is not None:
                self.everyone.put(snapshot)
                self.regions[snapshot.region].put(snapshot)
            return
        seeds = {gw_id}
        if old is not None:
            seeds |= self._unlink(old)
        self._link(snapshot)
        self._refresh(seeds)

    def picked(self, gateway_id: str, times: int = 1) -> None:
        """A selection chose it: its load counts one more connection (actors/members.py)."""
        g = self.gateways.get(gateway_id)
        if g is not None and self.everyone.picked(gateway_id, times):
            self.regions[g.region].picked(gateway_id, times)

    @property
    def picks(self) -> dict[str, int]:
        """Selections of each eligible gateway since its last heartbeat (not a copy)."""
        return self.everyone.picks

    def remove(self, gateway_id: str) -> None:
        old = self.gateways.pop(gateway_id, None)
        if old is not None:
            self._refresh({gateway_id} | self._unlink(old))

    def set_threshold(self, threshold: float) -> None:
        if threshold != self.threshold:
            self.threshold = threshold
            self._refresh(self.gateways)

    def set_held(self, held: Iterable[str]) -> None:
        new = frozenset(held)
        changed, self.held = new ^ self.held, new
        self._refresh(changed)

    def hold(self, gateway_id: str) -> None:
        self.set_held(self.held | {gateway_id})

    def release(self, gateway_id: str) -> None:
        self.set_held(self.held - {gateway_id})

    @contextmanager
    def without(self, gateway_id: str) -> Iterator[Pool]:
        """The pool as if `gateway_id` were unknown, for the duration of the block; then
        as it was, its picks since its last heartbeat included (selections replay so)."""
        g = self.gateways.get(gateway_id)
        if g is None:
            yield self
            return
        picks = self.picks.get(gateway_id, 0)
        self.remove(gateway_id)
        try:
            yield self
        finally:
            self.update(g)
            if picks:
                self.picked(gateway_id, picks)

    # Questions -------------------------------------------------------------------------

    def is_eligible(self, gateway_id: str) -> bool:
        return self.everyone.find(gateway_id) is not None

    def backups_of(self, gateway_id: str) -> list[str]:
        """The eligible backups of `gateway_id`, by id."""
        return sorted(b for b in self._backups.get(gateway_id, ()) if self.is_eligible(b))

    def exclusion(self, gateway_id: str) -> str | None:
        """Why a known gateway is not eligible (None if it is)."""
        if self.is_eligible(gateway_id):
            return None
        g = self.gateways[gateway_id]
        if g.status != "healthy":
            return f"status {g.status}"
        if g.score < self.threshold:
            return f"score {float(g.score)} below threshold {float(self.threshold)}"
        if g.maintenance:
            return f"maintenance ({g.maintenance_reason or 'no reason given'})"
        if g.flapping:
            return "flapping"
        if gateway_id in self.held:
            return "held on its backup until an operator fails it back"
        return f"backup for {g.backup_for}, which is eligible"

    @property
    def excluded_count(self) -> int:
        return len(self._excluded)

    def excluded(self, limit: int | None = None) -> dict[str, str]:
        """Excluded gateways (id -> why) by id; the first `limit` of them if given."""
        ids = self._excluded if limit is None else self._excluded[:limit]
        return {gw_id: self.exclusion(gw_id) or "" for gw_id in ids}

    # Internals -------------------------------------------------------------------------

    def _fits(self, g: GatewaySnapshot) -> bool:
        return (
            g.status == "healthy"
            and g.score >= self.threshold
            and not g.flapping
            and not g.maintenance
            and g.gateway_id not in self.held
        )

    def _same_standing(self, old: GatewaySnapshot, new: GatewaySnapshot) -> bool:
        """Whether nothing eligibility (or the region index) depends on changed."""
        return (
            old.status == new.status
            and (old.score >= self.threshold) == (new.score >= self.threshold)
            and old.flapping == new.flapping
            and old.maintenance == new.maintenance
            and old.role == new.role
            and old.backup_for == new.backup_for
            and old.region == new.region
        )

    @staticmethod
    def _primary(g: GatewaySnapshot) -> str | None:
        return g.backup_for if g.role == "backup" else None

    def _link(self, g: GatewaySnapshot) -> None:
        primary = self._primary(g)
        if primary is not None:
            self._backups.setdefault(primary, set()).add(g.gateway_id)

    def _unlink(self, g: GatewaySnapshot) -> set[str]:
        """Forgets `g`'s backup link; returns the primary it named (a gateway to re-judge)."""
        primary = self._primary(g)
        if primary is None:
            return set()
        backups = self._backups.get(primary)
        if backups is not None:
            backups.discard(g.gateway_id)
            if not backups:
                del self._backups[primary]
        return {primary}

    def _linked(self, seeds: Iterable[str]) -> set[str]:
        """`seeds` and every id joined to them by backup links, either way."""
        found, todo = set(seeds), list(seeds)
        while todo:
            gw_id = todo.pop()
            near = set(self._backups.get(gw_id, ()))
            g = self.gateways.get(gw_id)
            primary = None if g is None else self._primary(g)
            if primary is not None:
                near.add(primary)
            todo.extend(near - found)
            found |= near
        return found

    def _judge(self, ids: Iterable[str]) -> set[str]:
        """The eligible ones among `ids` (which include every id linked to them).

        Judged in id order with memory, as a whole-fleet pass would: a primary absent, or
        caught in a backup cycle, does not keep its backup waiting."""
        verdicts: dict[str, bool] = {}  # id -> eligible

        def eligible(gw_id: str, visiting: frozenset[str]) -> bool:
            if gw_id in verdicts:
                return verdicts[gw_id]
            g = self.gateways[gw_id]
            ok = self._fits(g)
            primary = self._primary(g)
            if (
                ok
                and primary is not None
                and primary in self.gateways
                and primary not in visiting
                and eligible(primary, visiting | {gw_id})
            ):
                ok = False
            verdicts[gw_id] = ok
            return ok

        known = sorted(i for i in ids if i in self.gateways)
        return {gw_id for gw_id in known if eligible(gw_id, frozenset({gw_id}))}

    def _refresh(self, seeds: Iterable[str]) -> None:
        linked = self._linked(seeds)
        eligible = self._judge(linked)
        for gw_id in linked:
            if gw_id in eligible:
                self._admit(self.gateways[gw_id])
            else:
                self._expel(gw_id)

    def _admit(self, g: GatewaySnapshot) -> None:
        i = self.everyone.find(g.gateway_id)
        if i is not None and self.everyone.gateways[i].region != g.region:
            self._region_drop(self.everyone.gateways[i].region, g.gateway_id)
        self.everyone.put(g)
        members = self.regions.get(g.region)
        if members is None:
            members = self.regions[g.region] = Members(self.reference)
        members.put(g)
        self._excluded_discard(g.gateway_id)

    def _expel(self, gateway_id: str) -> None:
        old = self.everyone.drop(gateway_id)
        if old is not None:
            self._region_drop(old.region, gateway_id)
        if gateway_id in self.gateways:
            i = bisect_left(self._excluded, gateway_id)
            if i == len(self._excluded) or self._excluded[i] != gateway_id:
                self._excluded.insert(i, gateway_id)
        else:
            self._excluded_discard(gateway_id)

    def _region_drop(self, region: str, gateway_id: str) -> None:
        members = self.regions.get(region)
        if members is not None:
            members.drop(gateway_id)
            if not members:
                del self.regions[region]

    def _excluded_discard(self, gateway_id: str) -> None:
        i = bisect_left(self._excluded, gateway_id)
        if i < len(self._excluded) and self._excluded[i] == gateway_id:
            del self._excluded[i]
