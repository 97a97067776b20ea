"""Selections re-run from the stream: `audit replay`, `audit whatif`, `audit explain`.

A pure fold (no I/O): feed it the `lb.snapshot`, `lb.selections` and `audit.gap` events
in stream order with their storage times; it rebuilds each load balancer run's pool
with the load balancer's own code (actors/pool.py, actors/strategies.py) and re-runs
every recorded selection:

- replay: with everything as recorded (strategy, threshold, cursor, random draws,
  sticky gateway, slow start ramps); the pick must be the one recorded, else it is a
  `Difference`, shown with both picks and the inputs. After each selection the pool
  counts the *recorded* pick (LeastConnections' picks), so one difference does not
  cascade.
- what-if (`WhatIf`): under another strategy and/or threshold. Its own rotation, picks
  and sticky clients then follow its own choices; random numbers are the recorded ones
  while they last, then a seeded generator's. With the recorded settings it is the
  replay, and changes nothing.

What it cannot vouch for is counted apart (`in_gap`), not as reproduced: selections of
a run whose pool state is unknown (read from the middle of a run without its
snapshot, or after a lost batch or snapshot part: a gap in its `seq`, until its next
whole snapshot), and selections within an `audit.gap` window. Messages of a run are
applied in `seq` order: one stored out of order (the outbox retried it) waits for
those before it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import msgspec

from actors.pool import Pool
from actors.strategies import RoundRobinState, Selection, SelectorState, select
from schemas.api import GatewaySnapshot, LoadBalancingConfig, SelectRequest
from schemas.events import (
    AuditGap,
    Event,
    PoolChange,
    PoolRow,
    PoolSnapshot,
    SelectionBatch,
    SelectionRecord,
)
from schemas.settings import LoadBalancingSettings
from schemas.types import StrategyName

WHAT_IF_SEED: Final = 0  # the generator a what-if draws from once the recorded draws run out
MAX_WAITING: Final = 10_000  # messages of a run held for one missing before it counts as lost


@dataclass(frozen=True, slots=True)
class WhatIf:
    strategy: StrategyName | None = None
    threshold: float | None = None


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """A selection that did not replay as recorded: both picks and its inputs."""

    selection_id: str
    ts: datetime
    recorded: str | None
    replayed: str | None
    why: str  # the replayed reason, or what made the replay impossible
    strategy: StrategyName
    threshold: float
    generation: int
    region: str | None
    client_id: str | None
    sticky: str | None
    cursor: str | None
    draws: list[float]
    slow_start: dict[str, float]
    candidates: int
    replica_id: str | None = None  # the replica that made it


Outcome = tuple[datetime, str, str | None, str | None, bool, str]
NO_REPLICA: Final = "-"  # recorded before replicas


@dataclass(slots=True)
class Tally:
    """What a re-run found. `outcomes`: (ts, selection id, recorded pick, re-run pick or
    None, error, replica) for each selection re-run, until `finish` sets aside those in
    gaps. `per_replica`: replica id ("-" before replicas) -> [selections, reproduced]."""

    selections: int = 0
    in_gap: int = 0
    differed: list[Difference] = field(default_factory=list)
    changed: int = 0
    no_gateway: int = 0
    per_gateway: dict[str, list[int]] = field(default_factory=dict)  # id -> [recorded, what-if]
    outcomes: list[Outcome] = field(default_factory=list)
    per_replica: dict[str, list[int]] = field(default_factory=dict)


class _RecordedCursor(SelectorState):
    """Every scope's rotation cursor is the one a selection recorded."""

    def __init__(self, last: str | None) -> None:
        super().__init__()
        self.last = last

    def cursor(self, scope: str) -> RoundRobinState:
        return RoundRobinState(self.last)


class OutOfDraws(Exception):
    """The re-run needed more random numbers than the selection recorded."""


class _Draws:
    """The recorded numbers in order; then `fallback`'s (None: running out is an error)."""

    __slots__ = ("_fallback", "_numbers", "used")

    def __init__(self, numbers: list[float], fallback: random.Random | None) -> None:
        self._numbers, self._fallback, self.used = numbers, fallback, 0

    def random(self) -> float:
        if self.used < len(self._numbers):
            self.used += 1
            return self._numbers[self.used - 1]
        if self._fallback is None:
            raise OutOfDraws
        return self._fallback.random()


def snapshot_of(row: PoolRow) -> GatewaySnapshot:
    """The snapshot the load balancer judged, as far as the row records it."""
    return GatewaySnapshot(
        gateway_id=row.gateway_id,
        region=row.region,
        role=row.role,
        backup_for=row.backup_for,
        status=row.status,
        score=row.score,
        cpu_percent=row.cpu_percent,
        memory_percent=row.memory_percent,
        active_connections=row.active_connections,
        max_connections=row.max_connections,
        reported_latency_ms=row.latency_ms,
        last_seq=row.seq,
        flapping=row.flapping,
        maintenance=row.maintenance,
        maintenance_reason=row.maintenance_reason,
    )


class Lane:
    """One run's pool from its snapshot on, and how its selections are re-run."""

    def __init__(self, parts: list[PoolSnapshot], what_if: WhatIf | None) -> None:
        head = parts[0]
        self.what_if = what_if
        self.recorded = LoadBalancingConfig(strategy=head.strategy, health_threshold=head.threshold)
        rules = head.rules
        self.settings = LoadBalancingSettings(
            region_inner_strategy=rules.region_inner_strategy,
            latency_margin_percent=rules.latency_margin_percent,
            latency_margin_ms=rules.latency_margin_ms,
        )
        self.regions = rules.regions
        self.pool = Pool(self._threshold(), held=head.held, reference=rules.connection_reference)
        for part in parts:
            for row in part.rows:
                self.pool.update(snapshot_of(row))
        for part in parts:
            for gateway_id, picks in part.picks.items():
                self.pool.picked(gateway_id, picks)
        self.generation = head.generation
        self.state = SelectorState()  # a what-if's own rotation
        self.sticky: dict[str, str] = {}  # a what-if's own sticky clients
        self.fallback = random.Random(WHAT_IF_SEED)

    def _threshold(self) -> float:
        override = None if self.what_if is None else self.what_if.threshold
        return self.recorded.health_threshold if override is None else override

    @property
    def strategy(self) -> StrategyName:
        override = None if self.what_if is None else self.what_if.strategy
        return self.recorded.strategy if override is None else override

    def apply(self, change: PoolChange) -> None:
        pool = self.pool
        self.generation = change.generation
        for gateway_id in change.removed:
            pool.remove(gateway_id)
        for row in change.rows:
            pool.update(snapshot_of(row))
        if change.held is not None:
            pool.set_held(change.held)
        if change.strategy is not None and change.threshold is not None:
            self.recorded = LoadBalancingConfig(
                strategy=change.strategy, health_threshold=change.threshold
            )
            pool.set_threshold(self._threshold())

    def skip(self, record: SelectionRecord) -> None:
        """A selection outside the window: it happened as recorded."""
        if record.gateway_id is not None:
            self.pool.picked(record.gateway_id)
            if record.client_id:
                self.sticky[record.client_id] = record.gateway_id

    def rerun(self, record: SelectionRecord) -> tuple[Selection, _Draws]:
        """The selection re-run (OutOfDraws if a replay needs more numbers than recorded).
        The pool then counts the recorded pick (replay) or its own (what-if)."""
        replay = self.what_if is None
        same_strategy = self.strategy == self.recorded.strategy
        draws = _Draws(record.draws, None if replay else self.fallback)
        ramps = record.slow_start
        sticky = record.sticky
        if not replay and record.client_id:
            sticky = self.sticky.get(record.client_id, sticky)
        selection = select(
            self.strategy,
            self.pool,
            region=record.region,
            state=_RecordedCursor(record.cursor) if same_strategy else self.state,
            rng=draws,
            settings=self.settings,
            regions=self.regions,
            sticky_gateway=sticky,
            ramp=(lambda gw: ramps.get(gw, 1.0)) if ramps else None,
        )
        counted = record.gateway_id if replay else selection.gateway_id
        if counted is not None:
            self.pool.picked(counted)
            if record.client_id:
                self.sticky[record.client_id] = counted
        return selection, draws


@dataclass(frozen=True, slots=True)
class _Stored:
    event: SelectionBatch | PoolSnapshot
    ns: int


@dataclass(slots=True)
class _Run:
    lane: Lane | None = None
    next_seq: int = -1  # -1: not yet known (read from the middle of the run)
    waiting: dict[int, _Stored] = field(default_factory=dict)
    parts: list[PoolSnapshot] = field(default_factory=list)


def request_of(record: SelectionRecord) -> SelectRequest:
    return SelectRequest(region=record.region, client_id=record.client_id)


def selection_ts(batch: SelectionBatch, record: SelectionRecord) -> datetime:
    return batch.ts + timedelta(milliseconds=record.at_ms)


# Called at the selection asked for: (lane, the record, its batch, the re-run selection).
Found = Callable[[Lane, SelectionRecord, SelectionBatch, Selection], None]


class Rerun:
    """Feed events (`feed`) in stream order, then `finish()` for the tally.

    `since_ns`/`until_ns`: only selections of batches stored in that window are re-run
    (the others are applied as recorded). `find`: (run, n) of one selection; `found` is
    called with it, re-run against the pool as it was."""

    def __init__(
        self,
        what_if: WhatIf | None = None,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        find: tuple[str, int] | None = None,
        found: Found | None = None,
    ) -> None:
        self.what_if = what_if
        self.since_ns, self.until_ns = since_ns, until_ns
        self.find, self.found = find, found
        self.tally = Tally()
        self._runs: dict[str, _Run] = {}
        self._gaps: list[tuple[datetime, datetime]] = []

    def feed(self, event: Event, stored_ns: int) -> None:
        match event:
            case SelectionBatch() | PoolSnapshot():
                self._arrive(event, stored_ns)
            case AuditGap(since=since, until=until):
                self._gaps.append((since, until))
            case _:
                pass

    def finish(self) -> Tally:
        """Applies what still waits (what it waited for is lost), then sets the
        selections within audit gaps apart."""
        for run in self._runs.values():
            while run.waiting:
                self._lost(run, min(run.waiting))
                self._drain(run)
        tally = self.tally
        if self._gaps:
            kept = []
            for outcome in tally.outcomes:
                if any(since <= outcome[0] <= until for since, until in self._gaps):
                    tally.in_gap += 1
                    self._uncount(outcome)
                else:
                    kept.append(outcome)
            tally.outcomes = kept
        for *_, error, replica in tally.outcomes:
            counts = tally.per_replica.setdefault(replica, [0, 0])
            counts[0] += 1
            counts[1] += not error
        return tally

    # Ordering ------------------------------------------------------------------------------

    def _arrive(self, event: SelectionBatch | PoolSnapshot, stored_ns: int) -> None:
        run = self._runs.setdefault(event.run, _Run())
        if run.next_seq < 0:
            run.next_seq = event.seq  # the first read of this run: from here on
        if event.seq < run.next_seq:
            return  # stored twice: already applied
        run.waiting[event.seq] = _Stored(event, stored_ns)
        self._drain(run)
        if len(run.waiting) > MAX_WAITING:
            self._lost(run, min(run.waiting))
            self._drain(run)

    def _drain(self, run: _Run) -> None:
        while run.next_seq in run.waiting:
            stored = run.waiting.pop(run.next_seq)
            run.next_seq += 1
            self._apply(run, stored.event, stored.ns)

    def _lost(self, run: _Run, resume: int) -> None:
        """Messages before `resume` were lost: the pool is unknown until a snapshot."""
        run.next_seq = resume
        run.lane = None
        run.parts = []

    # Applying ------------------------------------------------------------------------------

    def _apply(self, run: _Run, event: SelectionBatch | PoolSnapshot, stored_ns: int) -> None:
        if isinstance(event, PoolSnapshot):
            if event.part == 0:
                run.parts = []
            run.parts.append(event)
            if event.part == event.parts - 1:
                if len(run.parts) == event.parts:
                    run.lane = Lane(run.parts, self.what_if)
                run.parts = []
            return
        lane = run.lane
        window = (self.since_ns is None or stored_ns >= self.since_ns) and (
            self.until_ns is None or stored_ns <= self.until_ns
        )
        for step in event.steps:
            if isinstance(step, PoolChange):
                if lane is not None:
                    lane.apply(step)
            elif lane is None:
                self.tally.in_gap += window
            elif not window:
                lane.skip(step)
            else:
                self._selection(lane, event, step)

    def _selection(self, lane: Lane, batch: SelectionBatch, record: SelectionRecord) -> None:
        sid = f"sel-{batch.run}-{record.n}"
        ts = selection_ts(batch, record)
        try:
            selection, draws = lane.rerun(record)
        except OutOfDraws:
            self._count(ts, sid, record.gateway_id, None, batch, error=True)
            self._differ(lane, batch, record, None, "needed more random draws than recorded")
            return
        if self.find == (batch.run, record.n) and self.found is not None:
            self.found(lane, record, batch, selection)
        pick = selection.gateway_id
        if self.what_if is None:
            unused = draws.used < len(record.draws)
            wrong = pick != record.gateway_id or unused
            self._count(ts, sid, record.gateway_id, pick, batch, error=wrong)
            if wrong:
                why = selection.reason
                if unused and pick == record.gateway_id:
                    why = f"drew {draws.used} of the {len(record.draws)} numbers recorded"
                self._differ(lane, batch, record, pick, why, len(selection.members))
        else:
            self._count(ts, sid, record.gateway_id, pick, batch, error=False)

    def _count(
        self,
        ts: datetime,
        sid: str,
        recorded: str | None,
        pick: str | None,
        batch: SelectionBatch,
        *,
        error: bool,
    ) -> None:
        tally = self.tally
        tally.selections += 1
        tally.outcomes.append((ts, sid, recorded, pick, error, batch.replica_id or NO_REPLICA))
        if self.what_if is not None:
            tally.changed += pick != recorded
            tally.no_gateway += pick is None
            for gateway_id, column in ((recorded, 0), (pick, 1)):
                if gateway_id is not None:
                    tally.per_gateway.setdefault(gateway_id, [0, 0])[column] += 1

    def _uncount(self, outcome: Outcome) -> None:
        _, sid, recorded, pick, error, _ = outcome
        tally = self.tally
        tally.selections -= 1
        if error:
            tally.differed = [d for d in tally.differed if d.selection_id != sid]
        if self.what_if is not None:
            tally.changed -= pick != recorded
            tally.no_gateway -= pick is None
            for gateway_id, column in ((recorded, 0), (pick, 1)):
                if gateway_id is not None:
                    tally.per_gateway[gateway_id][column] -= 1

    def _differ(
        self,
        lane: Lane,
        batch: SelectionBatch,
        record: SelectionRecord,
        pick: str | None,
        why: str,
        candidates: int = 0,
    ) -> None:
        self.tally.differed.append(
            Difference(
                selection_id=f"sel-{batch.run}-{record.n}",
                ts=selection_ts(batch, record),
                recorded=record.gateway_id,
                replayed=pick,
                why=why,
                strategy=lane.recorded.strategy,
                threshold=lane.recorded.health_threshold,
                generation=lane.generation,
                region=record.region,
                client_id=record.client_id,
                sticky=record.sticky,
                cursor=record.cursor,
                draws=record.draws,
                slow_start=record.slow_start,
                candidates=candidates,
                replica_id=batch.replica_id,
            )
        )


def busiest_share(counts: dict[str, list[int]], column: int) -> tuple[str | None, float]:
    """The gateway with the most picks in `column` (0 recorded, 1 what-if), and its share."""
    total = sum(c[column] for c in counts.values())
    if not total:
        return None, 0.0
    gateway_id = max(counts, key=lambda g: (counts[g][column], g))
    return gateway_id, counts[gateway_id][column] / total
