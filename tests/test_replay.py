"""Selections re-run from their audit trail (issue 15), without NATS: a `Balancer` records
into a `SelectionLog`, the events go through JSON, and `Rerun` replays them.

Seeded and deterministic: a mix of every strategy, strategy and threshold changes,
gateways going down and coming back, sticky clients, held gateways, slow start and
failover choices (which move the rotation) must replay 100 %.
"""

from __future__ import annotations

import random
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from actors.balancer import Balancer, Choice, selection_rules
from actors.selection_log import SelectionLog, selection_event
from gatefleet.audit.rerun import Lane, Rerun, WhatIf
from schemas.api import GatewaySnapshot, LoadBalancingConfig, SelectRequest
from schemas.codec import encode
from schemas.events import (
    AuditGap,
    Event,
    GatewaySelected,
    PoolSnapshot,
    SelectionBatch,
    SelectionRecord,
    decode_event,
)
from schemas.settings import Settings
from schemas.types import STRATEGIES, GatewayStatus, StrategyName

STRATEGY_NAMES: tuple[StrategyName, ...] = typing.get_args(StrategyName)

REGIONS = ("eu-west", "eu-central", "us-east")
STATUSES: tuple[GatewayStatus, ...] = ("healthy",) * 8 + ("degraded",)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Recorder:
    """What the load balancer emitted, through JSON, with made-up storage times."""

    events: list[Event] = field(default_factory=list)
    due: bool = False

    def emit(self, event: Event) -> None:
        self.events.append(decode_event(encode(event)))

    def schedule(self, _delay: float) -> None:
        self.due = True

    def stored(self) -> Iterator[tuple[Event, int]]:
        for i, event in enumerate(self.events):
            yield event, i


def make_balancer(
    clock: Clock, recorder: Recorder, *, seed: int = 7, slow_start_s: float = 0.0
) -> Balancer:
    settings = msgspec.convert(
        {
            "load_balancing": {"random_seed": seed, "slow_start_s": slow_start_s},
            "regions": {"eu-central": ["eu-west"], "us-east": ["eu-west"]},
        },
        Settings,
    )
    config = LoadBalancingConfig(strategy="RoundRobin", health_threshold=70.0)
    log = SelectionLog(
        recorder.emit,
        rules=selection_rules(settings),
        config=config,
        events_lost=lambda: 0,
        schedule_flush=recorder.schedule,
        clock=clock,
    )
    return Balancer(settings, config, log=log, clock=clock)


def gateway(rng: random.Random, n: int, seq: int, *, down: bool = False) -> GatewaySnapshot:
    backup = n % 10 == 9
    return GatewaySnapshot(
        gateway_id=f"gw-{n:05}",
        region=REGIONS[n % len(REGIONS)],
        role="backup" if backup else "primary",
        backup_for=f"gw-{n - 1:05}" if backup else None,
        status="down" if down else rng.choice(STATUSES),
        score=0.0 if down else round(rng.uniform(60, 100), 2),
        cpu_percent=round(rng.uniform(0, 90), 1),
        memory_percent=round(rng.uniform(10, 80), 1),
        active_connections=rng.randrange(0, 900),
        max_connections=1000,
        reported_latency_ms=rng.choice([None, round(rng.uniform(1, 40), 3)]),
        last_seq=seq,
        flapping=rng.random() < 0.02,
    )


def run_fleet(
    lb: Balancer,
    recorder: Recorder,
    clock: Clock,
    *,
    gateways: int,
    selections: int,
    seed: int,
    explain: dict[int, GatewaySelected] | None = None,
) -> list[Choice]:
    """A seeded life of a fleet, recorded; returns every choice made, in order.
    `explain`: selection numbers whose explanation to keep, as the live pool gives it."""
    rng = random.Random(seed)
    seqs = dict.fromkeys(range(gateways), 1)
    for n in range(gateways):
        lb.update(gateway(rng, n, 1))
    down: set[int] = set()
    clients = [f"client-{i}" for i in range(40)]
    choices = []
    for i in range(selections):
        clock.now += 0.01
        roll = rng.random()
        if roll < 0.25:  # heartbeats
            for n in rng.sample(range(gateways), k=min(5, gateways)):
                seqs[n] += 1
                lb.update(gateway(rng, n, seqs[n], down=n in down))
        elif roll < 0.27:  # a gateway goes down, or comes back (slow start)
            n = rng.randrange(gateways)
            down ^= {n}
            lb.update(gateway(rng, n, seqs[n], down=n in down))
            if n in down and rng.random() < 0.5:
                lb.replacement(lb.pool.gateways[f"gw-{n:05}"])
        elif roll < 0.28:
            lb.remove(f"gw-{rng.randrange(gateways):05}")
        elif roll < 0.29:
            n = rng.randrange(gateways)
            (lb.hold if rng.random() < 0.5 else lb.release)(f"gw-{n:05}")
        elif roll < 0.30:
            strategy = rng.choice(STRATEGY_NAMES)
            lb.set_config(LoadBalancingConfig(strategy=strategy, health_threshold=70.0))
        elif roll < 0.31:
            threshold = rng.choice([0.0, 65.0, 70.0, 80.0, 95.0])
            lb.set_config(
                LoadBalancingConfig(strategy=lb.config.strategy, health_threshold=threshold)
            )
        request = SelectRequest(
            region=rng.choice([None, *REGIONS, "ap-south"]),
            client_id=rng.choice([None, None, *clients]),
        )
        choice = lb.choose(request)
        if explain is not None and i in explain:
            explain[i] = selection_event("live", request, choice.selection, lb.pool, lb.config)
        lb.commit(choice)
        choices.append(choice)
        if recorder.due and rng.random() < 0.1:  # the batch timer
            recorder.due = False
            assert lb.log is not None
            lb.log.flush()
    assert lb.log is not None
    lb.log.flush()
    return choices


def rerun(recorder: Recorder, what_if: WhatIf | None = None, **options: Any) -> Rerun:
    rerun = Rerun(what_if, **options)
    for event, stored in recorder.stored():
        rerun.feed(event, stored)
    rerun.finish()
    return rerun


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replay_reproduces_every_selection_of_a_seeded_fleet(strategy: StrategyName) -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder, slow_start_s=2.0)
    lb.set_config(LoadBalancingConfig(strategy=strategy, health_threshold=70.0))
    choices = run_fleet(lb, recorder, clock, gateways=60, selections=3000, seed=len(strategy))
    tally = rerun(recorder).tally
    assert tally.differed == []
    assert tally.selections == len(choices) == 3000
    assert tally.in_gap == 0
    # The mix did happen: strategies, nobody eligible, sticky clients, slow start, draws.
    reasons = " ".join(c.selection.reason for c in choices)
    assert "sticky client" in reasons
    assert "slow start" in reasons
    assert any(c.draws for c in choices)
    assert len({c.selection.strategy for c in choices}) >= 3
    batches = [e for e in recorder.events if isinstance(e, SelectionBatch)]
    assert len(batches) > 10  # several batches, and snapshots past the first
    clock_snapshots = {e.seq for e in recorder.events if isinstance(e, PoolSnapshot)}
    assert len(clock_snapshots) >= 1


def test_replay_at_ten_thousand_gateways() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    lb.set_config(LoadBalancingConfig(strategy="WeightedRandom", health_threshold=70.0))
    choices = run_fleet(lb, recorder, clock, gateways=10_000, selections=400, seed=3)
    parts = [e for e in recorder.events if isinstance(e, PoolSnapshot)]
    assert parts[0].parts == 5  # 10,000 rows in parts of 2,000
    tally = rerun(recorder).tally
    assert (tally.selections, tally.differed) == (len(choices), [])


def test_a_wrong_record_is_a_difference_with_both_picks_and_the_inputs() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    run_fleet(lb, recorder, clock, gateways=20, selections=50, seed=1)
    batch = next(e for e in recorder.events if isinstance(e, SelectionBatch))
    record = next(s for s in batch.steps if isinstance(s, SelectionRecord) and s.gateway_id)
    forged = msgspec.structs.replace(record, gateway_id="gw-99999")
    steps = [forged if s is record else s for s in batch.steps]
    recorder.events[recorder.events.index(batch)] = msgspec.structs.replace(batch, steps=steps)
    tally = rerun(recorder).tally
    [difference] = tally.differed
    assert (difference.recorded, difference.replayed) == ("gw-99999", record.gateway_id)
    assert difference.selection_id == f"sel-{batch.run}-{record.n}"
    assert difference.cursor == record.cursor
    assert difference.strategy == "RoundRobin"
    assert tally.selections == 50


def test_what_if_with_the_recorded_settings_changes_nothing() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    lb.set_config(LoadBalancingConfig(strategy="LeastConnections", health_threshold=70.0))
    choices = run_fleet(lb, recorder, clock, gateways=30, selections=1500, seed=5)
    # The run changes strategy and threshold along the way: what-if without overrides,
    # and with the settings the run started with, where the run kept them.
    same = rerun(recorder, WhatIf()).tally
    assert (same.selections, same.changed, same.no_gateway) == (len(choices), 0, 0)
    assert all(recorded == whatif for recorded, whatif in same.per_gateway.values())
    other = rerun(recorder, WhatIf(strategy="RoundRobin", threshold=90.0)).tally
    assert other.selections == len(choices)
    assert other.changed > 0
    assert sum(w for _, w in other.per_gateway.values()) + other.no_gateway == len(choices)


def test_what_if_of_a_run_that_kept_its_settings() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    rng = random.Random(2)
    for n in range(20):
        lb.update(gateway(rng, n, 1))
    for _ in range(500):
        lb.commit(lb.choose(SelectRequest(client_id=rng.choice([None, "a", "b"]))))
    assert lb.log is not None
    lb.log.flush()
    same = rerun(recorder, WhatIf(strategy="RoundRobin", threshold=70.0)).tally
    assert (same.selections, same.changed) == (500, 0)
    higher = rerun(recorder, WhatIf(threshold=101.0)).tally  # nobody is eligible
    assert (higher.selections, higher.no_gateway, higher.changed) == (500, 500, 500)


def explain(recorder: Recorder, run: str, n: int) -> list[GatewaySelected]:
    explained: list[GatewaySelected] = []

    def found(lane: Lane, record: SelectionRecord, _batch: SelectionBatch, selection: Any) -> None:
        request = SelectRequest(region=record.region, client_id=record.client_id)
        explained.append(selection_event("live", request, selection, lane.pool, lane.recorded))

    rerun(recorder, find=(run, n), found=found)
    return explained


def test_explain_rebuilds_a_selection_made_thousands_of_selections_ago() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    lb.set_config(LoadBalancingConfig(strategy="LatencyBased", health_threshold=80.0))
    placeholder = GatewaySelected(
        region=None,
        client_id=None,
        strategy="RoundRobin",
        threshold=0.0,
        gateway_id=None,
        reason="",
        candidates=[],
        excluded={},
    )
    live = dict.fromkeys((20, 41), placeholder)
    choices = run_fleet(lb, recorder, clock, gateways=120, selections=5000, seed=9, explain=live)
    for i, expected in live.items():
        selection_id = choices[i].selection_id
        assert selection_id is not None
        run, n = selection_id.removeprefix("sel-").rsplit("-", 1)
        [event] = explain(recorder, run, int(n))
        # Exactly what the live pool gave at the time, candidates and exclusions included.
        assert msgspec.structs.replace(event, ts=expected.ts) == expected
        assert event.gateway_id is not None
        assert event.excluded  # down, degraded, backups, below 80
        assert event.excluded_count
        assert len(event.candidates) > 10


def test_selections_after_a_lost_batch_are_not_vouched_for_until_a_snapshot() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    run_fleet(lb, recorder, clock, gateways=20, selections=400, seed=4)
    batches = [e for e in recorder.events if isinstance(e, SelectionBatch)]
    lost = batches[3]
    recorder.events.remove(lost)
    tally = rerun(recorder).tally
    after = sum(b.last - b.first + 1 for b in batches[4:])
    lost_count = lost.last - lost.first + 1
    # No snapshot after the loss in this short run: nothing after it can be vouched for.
    assert tally.in_gap == after
    assert tally.selections == 400 - lost_count - after
    assert tally.differed == []


def test_selections_within_an_audit_gap_are_reported_as_such() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    run_fleet(lb, recorder, clock, gateways=20, selections=300, seed=6)
    batch = [e for e in recorder.events if isinstance(e, SelectionBatch)][2]
    recorder.events.append(
        AuditGap(cause="not_stored", since=batch.ts, until=batch.ts, events_lost=1, reason="test")
    )
    tally = rerun(recorder).tally
    at_start = [s for s in batch.steps if isinstance(s, SelectionRecord) and s.at_ms == 0]
    assert tally.in_gap == len(at_start) > 0
    assert tally.selections == 300 - len(at_start)


def test_messages_stored_out_of_order_are_applied_in_order() -> None:
    clock, recorder = Clock(), Recorder()
    lb = make_balancer(clock, recorder)
    run_fleet(lb, recorder, clock, gateways=20, selections=300, seed=8)
    events = recorder.events
    events[2], events[5] = events[5], events[2]  # a retried message landed later
    tally = rerun(recorder).tally
    assert (tally.selections, tally.differed, tally.in_gap) == (300, [], 0)
