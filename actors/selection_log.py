"""The audit trail of selections: what the load balancer records so that each selection
can be explained and re-run from the stream alone (docs/PROTOCOL.md section 5).

Pure logic: no threads, no NATS. The load balancer tells it what it did, in the order
it did it; events leave through `emit`:

- `changed`, `removed`, `held`, `settings`: the pool changed (already applied). Kept in
  the open generation; a gateway's row only counts if it differs from the row last
  recorded (`PoolRow`: what eligibility, the strategies and `audit explain` read), so a
  heartbeat that changes nothing a selection reads is not recorded.
- `selected`: one selection. If anything changed since the last one, the open
  generation is sealed first (a `PoolChange` step), so a selection is always judged
  against the generation recorded just before it.
- Batches: steps collect in one `lb.selections` event, emitted when the load balancer
  calls `flush` (BATCH_S after the batch opened: `schedule_flush` asks for that) or when
  it holds MAX_BATCH_ITEMS rows and selections.
- Snapshots: the whole pool (`lb.snapshot`, in parts of MAX_BATCH_ITEMS rows) replaces
  the open generation at a run's first selection, then at the first selection after
  SNAPSHOT_EVERY_S, or after events were lost (a lost batch leaves replay without the
  pool's state until the next snapshot).
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from actors.pool import Pool
from actors.strategies import Selection, shortlist
from schemas.api import GatewaySnapshot, LoadBalancingConfig, SelectRequest
from schemas.events import (
    CandidateView,
    Event,
    GatewaySelected,
    PoolChange,
    PoolRow,
    PoolSnapshot,
    SelectionBatch,
    SelectionRecord,
    SelectionRules,
    SelectionStep,
)

# What `audit explain` shows of a selection (about 12 KiB, whatever the fleet's size).
AUDIT_CANDIDATES: Final = 50  # besides the chosen one
AUDIT_EXCLUDED: Final = 50
BATCH_S: Final = 0.1
MAX_BATCH_ITEMS: Final = 2000  # rows and selections in one event (well under 1 MiB)
SNAPSHOT_EVERY_S: Final = 60.0


def pool_row(g: GatewaySnapshot) -> PoolRow:
    return PoolRow(
        g.gateway_id,
        g.region,
        g.role,
        g.backup_for,
        g.status,
        g.score,
        g.active_connections,
        g.max_connections,
        g.latency_ms,
        g.cpu_percent,
        g.memory_percent,
        g.last_seq,
        g.flapping,
        g.maintenance,
        g.maintenance_reason,
    )


def selection_id(run: str, n: int) -> str:
    return f"sel-{run}-{n}"


class RecordingDraws:
    """A seeded generator that keeps the numbers drawn since `draws` was last cleared."""

    __slots__ = ("draws", "source")

    def __init__(self, source: random.Random) -> None:
        self.source = source
        self.draws: list[float] = []

    def random(self) -> float:
        x = self.source.random()
        self.draws.append(x)
        return x


def selection_event(
    event_id: str,
    request: SelectRequest,
    selection: Selection,
    pool: Pool,
    config: LoadBalancingConfig,
) -> GatewaySelected:
    """A selection explained (the `lb.selected` shape), bounded whatever the fleet's size:
    the chosen candidate and the best AUDIT_CANDIDATES others by the strategy's measure,
    the first AUDIT_EXCLUDED excluded, with both counts. Build it before the pool next
    changes: the selection's members are a view of the pool."""
    candidates = [
        CandidateView(
            gateway_id=g.gateway_id,
            region=g.region,
            role=g.role,
            score=g.score,
            measure=measure,
            active_connections=g.active_connections,
            max_connections=g.max_connections,
            latency_ms=g.latency_ms,
            cpu_percent=g.cpu_percent,
            memory_percent=g.memory_percent,
        )
        for g, measure in shortlist(selection, AUDIT_CANDIDATES)
    ]
    return GatewaySelected(
        id=event_id,
        region=request.region,
        client_id=request.client_id,
        strategy=config.strategy,
        threshold=config.health_threshold,
        gateway_id=selection.gateway_id,
        reason=selection.reason,
        candidates=candidates,
        candidate_count=len(selection.members),
        excluded=pool.excluded(AUDIT_EXCLUDED),
        excluded_count=pool.excluded_count,
        slow_start=selection.slow_start,
    )


class SelectionLog:
    def __init__(
        self,
        emit: Callable[[Event], None],
        *,
        rules: SelectionRules,
        config: LoadBalancingConfig,
        events_lost: Callable[[], int],
        schedule_flush: Callable[[float], object],
        clock: Callable[[], float] = time.monotonic,
        replica_id: str | None = None,
    ) -> None:
        self._emit = emit
        self._replica_id = replica_id
        self._rules = rules
        self._config = config
        self._events_lost = events_lost
        self._schedule_flush = schedule_flush
        self._clock = clock
        self.run = secrets.token_hex(6)
        self._seq = 0  # of the next batch or snapshot part
        self._n = 0  # of the next selection
        self._generation = 0  # of the next one sealed
        # The pool's rows now, and as of the last recorded generation.
        self._table: dict[str, PoolRow] = {}
        self._sealed: dict[str, PoolRow] = {}
        # The open generation: gateways touched, removed, and whether held or settings did.
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._held: frozenset[str] = frozenset()
        self._held_changed = False
        self._settings_changed = False
        self._sealed_config = config
        # The batch being filled.
        self._steps: list[SelectionStep] = []
        self._items = 0
        self._first = self._last = -1
        self._opened = 0.0  # time.time() of its first step
        # Snapshots.
        self._snapshot_ts: datetime | None = None
        self._snapshot_at = 0.0
        self._lost_at_snapshot = 0

    # What the pool did ---------------------------------------------------------------------

    def changed(self, g: GatewaySnapshot) -> None:
        self._table[g.gateway_id] = pool_row(g)
        self._dirty.add(g.gateway_id)

    def removed(self, gateway_id: str) -> None:
        if self._table.pop(gateway_id, None) is not None:
            self._dirty.add(gateway_id)
            self._removed.add(gateway_id)

    def held(self, held: frozenset[str]) -> None:
        if held != self._held:
            self._held, self._held_changed = held, True

    def settings(self, config: LoadBalancingConfig) -> None:
        self._config = config
        self._settings_changed = config != self._sealed_config

    # Selections ----------------------------------------------------------------------------

    def reserve(self) -> str:
        """The id of the next selection (call `selected` for it before any other)."""
        return selection_id(self.run, self._n)

    def selected(
        self,
        pool: Pool,
        request: SelectRequest,
        selection: Selection,
        sticky: str | None,
        draws: list[float],
    ) -> None:
        """Records the selection whose id `reserve` gave, made against `pool` as it is."""
        if self._snapshot_due():
            self._snapshot(pool)
        else:
            self._seal()
        now = time.time()
        if not self._steps:
            self._open(now)
        n = self._n
        self._n += 1
        self._steps.append(
            SelectionRecord(
                n,
                int((now - self._opened) * 1000),
                request.region,
                request.client_id,
                sticky,
                selection.cursor,
                draws,
                selection.slow_start,
                selection.gateway_id,
            )
        )
        if self._first < 0:
            self._first = n
        self._last = n
        self._count(1)

    def flush(self) -> None:
        """Emits the batch being filled, if any."""
        if not self._steps:
            return
        assert self._snapshot_ts is not None  # a batch opens with a selection
        self._emit(
            SelectionBatch(
                run=self.run,
                seq=self._next_seq(),
                snapshot_ts=self._snapshot_ts,
                first=self._first,
                last=self._last,
                steps=self._steps,
                ts=datetime.fromtimestamp(self._opened, UTC),
                replica_id=self._replica_id,
            )
        )
        self._steps, self._items, self._first, self._last = [], 0, -1, -1

    # Internals -----------------------------------------------------------------------------

    def _open(self, now: float) -> None:
        self._opened = now
        self._schedule_flush(BATCH_S)

    def _count(self, items: int) -> None:
        self._items += items
        if self._items >= MAX_BATCH_ITEMS:
            self.flush()

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _seal(self) -> None:
        """The open generation as PoolChange steps, if anything in it changed."""
        if not (self._dirty or self._held_changed or self._settings_changed):
            return
        sealed, table = self._sealed, self._table
        removed = sorted(i for i in self._removed if i in sealed)
        rows = []
        for gateway_id in sorted(self._dirty):
            row = table.get(gateway_id)
            if row is None:
                sealed.pop(gateway_id, None)
            elif gateway_id in self._removed or row != sealed.get(gateway_id):
                rows.append(row)
                sealed[gateway_id] = row
        held = sorted(self._held) if self._held_changed else None
        config = self._config if self._settings_changed else None
        self._dirty.clear()
        self._removed.clear()
        self._held_changed = self._settings_changed = False
        if not (removed or rows or held is not None or config is not None):
            return
        self._sealed_config = self._config
        generation = self._generation
        self._generation += 1
        chunks = [rows[i : i + MAX_BATCH_ITEMS] for i in range(0, len(rows), MAX_BATCH_ITEMS)]
        chunks = chunks or [[]]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            if not self._steps:
                self._open(time.time())
            self._steps.append(
                PoolChange(
                    generation,
                    removed if i == 0 else [],
                    chunk,
                    held if last else None,
                    config.strategy if last and config is not None else None,
                    config.health_threshold if last and config is not None else None,
                )
            )
            self._count(max(1, len(chunk)))

    def _snapshot_due(self) -> bool:
        return (
            self._snapshot_ts is None
            or self._clock() - self._snapshot_at >= SNAPSHOT_EVERY_S
            or self._events_lost() > self._lost_at_snapshot
        )

    def _snapshot(self, pool: Pool) -> None:
        """The whole pool as the next generation, in place of the open one."""
        self.flush()
        self._dirty.clear()
        self._removed.clear()
        self._held_changed = self._settings_changed = False
        self._sealed = dict(self._table)
        self._sealed_config = config = self._config
        generation = self._generation
        self._generation += 1
        ts = datetime.now(UTC)
        rows = sorted(self._table.values(), key=lambda row: row.gateway_id)
        parts = max(1, -(-len(rows) // MAX_BATCH_ITEMS))
        picks = pool.picks
        for part in range(parts):
            chunk = rows[part * MAX_BATCH_ITEMS : (part + 1) * MAX_BATCH_ITEMS]
            self._emit(
                PoolSnapshot(
                    run=self.run,
                    seq=self._next_seq(),
                    generation=generation,
                    part=part,
                    parts=parts,
                    strategy=config.strategy,
                    threshold=config.health_threshold,
                    rules=self._rules,
                    held=sorted(self._held),
                    picks={
                        r.gateway_id: picks[r.gateway_id] for r in chunk if r.gateway_id in picks
                    },
                    rows=chunk,
                    ts=ts,
                    replica_id=self._replica_id,
                )
            )
        self._snapshot_ts = ts
        self._snapshot_at = self._clock()
        self._lost_at_snapshot = self._events_lost()
