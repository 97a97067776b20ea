"""Health score and HealthTracker state machine, driven by a fake clock (plain floats)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actors.health import (
    CHECK_SLACK_S,
    BatchOutcome,
    HealthTracker,
    Transition,
    health_score,
)
from schemas.settings import HealthSettings, HealthWeights
from schemas.wire import Heartbeat

T0 = 1000.0  # monotonic seconds
WALL0 = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
DEFAULT = HealthSettings()  # interval 1 s, fall 3, rise 2


def hb(seq: int, **kw: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "gateway_id": "edge-1",
        "region": "us-west",
        "seq": seq,
        "ts": WALL0,
        "cpu_percent": 0.0,
        "memory_percent": 0.0,
        "active_connections": 0,
    }
    fields.update(kw)
    return Heartbeat(**fields)


BAD: dict[str, Any] = {"cpu_percent": 95.0, "memory_percent": 95.0}


def score(settings: HealthSettings = DEFAULT, **kw: Any) -> float:
    args: dict[str, Any] = {"cpu_percent": 0.0, "memory_percent": 0.0, "active_connections": 0}
    args.update(kw)
    return health_score(settings, **args)


def tracker(settings: HealthSettings = DEFAULT, threshold: float = 70.0) -> HealthTracker:
    return HealthTracker("edge-1", region="us-west", settings=settings, threshold=threshold)


@dataclass(frozen=True)
class One:
    """What one heartbeat alone (a batch of one) came to."""

    accepted: bool
    reason: str | None
    transition: Transition | None


def one(t: HealthTracker, heartbeat: Heartbeat, now: float, wall: datetime) -> One:
    out = t.on_heartbeats([(heartbeat, now)], now, wall)
    if not out.accepted:
        return One(accepted=False, reason=out.rejected[0].reason, transition=None)
    return One(accepted=True, reason="restart" if out.restarts else None, transition=out.transition)


def beat(t: HealthTracker, seq: int, now: float, **kw: Any) -> Transition | None:
    out = one(t, hb(seq, **kw), now, WALL0 + timedelta(seconds=now - T0))
    assert out.accepted
    return out.transition


def status(t: HealthTracker) -> str:
    return t.status  # a plain str: keeps mypy from narrowing across calls


def moved(tr: Transition | None, old: str, new: str) -> None:
    assert tr is not None
    assert (tr.old_status, tr.new_status) == (old, new)


# --- score ---------------------------------------------------------------------------------


def test_score_requirements() -> None:
    assert score(cpu_percent=95.0, memory_percent=95.0) == pytest.approx(47.75)
    assert score(cpu_percent=95.0, memory_percent=95.0) < 70
    assert score() == pytest.approx(100.0)
    assert score(cpu_percent=5.0, memory_percent=5.0, active_connections=10) > 90


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("cpu_percent", [0.0, 20.0, 50.0, 80.0, 100.0]),
        ("memory_percent", [0.0, 20.0, 50.0, 80.0, 100.0]),
        ("active_connections", [0, 100, 500, 900, 1000]),
        ("reported_latency_ms", [0.0, 50.0, 200.0, 400.0, 500.0]),
        ("probe_latency_ms", [0.0, 50.0, 200.0, 400.0, 500.0]),
        ("consecutive_failures", [0, 1, 2, 3]),
    ],
)
def test_score_strictly_decreases_in_each_metric(key: str, values: list[float]) -> None:
    scores = [score(DEFAULT, **{key: v}) for v in values]
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert all(0.0 <= s <= 100.0 for s in scores)


def test_score_saturates_and_clamps() -> None:
    assert score(active_connections=5000) == score(active_connections=1000)
    assert score(reported_latency_ms=10_000.0) == score(reported_latency_ms=500.0)
    assert score(consecutive_failures=100) == 0.0


def test_failures_cost_the_penalty_each() -> None:
    assert score(consecutive_failures=2) == pytest.approx(70.0)
    no_penalty = HealthSettings(weights=HealthWeights(failure_penalty=0.0))
    assert score(no_penalty, consecutive_failures=5) == pytest.approx(100.0)


def test_weights_are_configurable_and_normalised() -> None:
    cpu_only = HealthSettings(weights=HealthWeights(cpu=1.0, memory=0, connections=0, latency=0))
    assert score(cpu_only, cpu_percent=40.0, memory_percent=100.0) == pytest.approx(60.0)
    doubled = HealthSettings(
        weights=HealthWeights(cpu=0.6, memory=0.5, connections=0.5, latency=0.4)
    )
    assert score(doubled, cpu_percent=95.0, memory_percent=95.0) == pytest.approx(47.75)
    none = HealthSettings(weights=HealthWeights(cpu=0, memory=0, connections=0, latency=0))
    assert score(none, cpu_percent=100.0, memory_percent=100.0) == pytest.approx(100.0)


def test_connections_relative_to_max_or_reference() -> None:
    conn_only = HealthWeights(cpu=0, memory=0, connections=1.0, latency=0)
    s = HealthSettings(weights=conn_only, connection_reference=200)
    assert score(s, active_connections=100, max_connections=1000) == pytest.approx(90.0)
    assert score(s, active_connections=100) == pytest.approx(50.0)


def test_probe_latency_preferred_over_reported() -> None:
    lat_only = HealthSettings(
        weights=HealthWeights(cpu=0, memory=0, connections=0, latency=1.0), latency_budget_ms=100.0
    )
    assert score(lat_only, reported_latency_ms=80.0) == pytest.approx(20.0)
    assert score(lat_only, reported_latency_ms=80.0, probe_latency_ms=10.0) == pytest.approx(90.0)
    assert score(lat_only) == pytest.approx(100.0)


# --- transitions ---------------------------------------------------------------------------


def test_starts_unknown_with_zero_score_and_no_checks() -> None:
    t = tracker()
    assert status(t) == "unknown"
    assert t.score == 0.0
    assert t.next_check_at(T0) is None
    assert t.on_tick(T0 + 3600) is None
    assert status(t) == "unknown"


def test_unknown_to_healthy_on_first_good_heartbeat() -> None:
    t = tracker()
    tr = beat(t, 1, T0)
    moved(tr, "unknown", "healthy")
    assert tr is not None
    assert tr.gateway_id == "edge-1"
    assert tr.score > 90


def test_unknown_to_degraded_on_first_bad_heartbeat() -> None:
    t = tracker()
    moved(beat(t, 1, T0, **BAD), "unknown", "degraded")
    assert t.score < 70


def test_healthy_to_degraded_at_once() -> None:
    t = tracker()
    beat(t, 1, T0)
    moved(beat(t, 2, T0 + 1, **BAD), "healthy", "degraded")


def test_degraded_to_healthy_only_after_rise() -> None:
    t = tracker(HealthSettings(rise=3))
    beat(t, 1, T0, **BAD)
    assert beat(t, 2, T0 + 1) is None
    assert beat(t, 3, T0 + 2) is None
    assert beat(t, 4, T0 + 3, **BAD) is None  # breaks the run
    assert beat(t, 5, T0 + 4) is None
    assert beat(t, 6, T0 + 5) is None
    assert status(t) == "degraded"
    moved(beat(t, 7, T0 + 6), "degraded", "healthy")


def test_missed_interval_breaks_the_rise_run() -> None:
    t = tracker()  # rise 2
    beat(t, 1, T0, **BAD)
    beat(t, 2, T0 + 1)
    assert t.on_tick(T0 + 2.6) is None  # one missed heartbeat
    assert t.missed_heartbeats == 1
    assert beat(t, 3, T0 + 2.7) is None
    assert status(t) == "degraded"
    moved(beat(t, 4, T0 + 3.7), "degraded", "healthy")


def test_healthy_to_down_after_fall_missed_intervals() -> None:
    t = tracker()
    beat(t, 1, T0)
    assert t.on_tick(T0 + 1.6) is None
    assert t.consecutive_failures == 1
    assert t.score == pytest.approx(85.0)
    assert t.on_tick(T0 + 2.6) is None
    assert t.score == pytest.approx(70.0)
    assert status(t) == "healthy"
    tr = t.on_tick(T0 + 3.6)
    moved(tr, "healthy", "down")
    assert tr is not None
    assert tr.score == 0.0
    assert t.score == 0.0
    assert t.on_tick(T0 + 10) is None
    assert status(t) == "down"


def test_missed_heartbeats_can_degrade_before_down() -> None:
    t = tracker(HealthSettings(fall=5))
    beat(t, 1, T0)
    assert t.on_tick(T0 + 2.5) is None  # 2 missed: 70, still healthy
    moved(t.on_tick(T0 + 3.5), "healthy", "degraded")  # 3 missed: 55
    moved(t.on_tick(T0 + 5.5), "degraded", "down")


def test_down_to_healthy_after_rise() -> None:
    t = tracker()
    beat(t, 1, T0)
    t.on_tick(T0 + 4)
    assert status(t) == "down"
    assert beat(t, 2, T0 + 5) is None  # probation: still down
    assert status(t) == "down"
    assert t.score == 0.0
    assert t.consecutive_failures == 0
    moved(beat(t, 3, T0 + 6), "down", "healthy")


def test_gap_during_probation_restarts_the_rise_run() -> None:
    t = tracker()
    beat(t, 1, T0)
    t.on_tick(T0 + 4)
    assert t.next_check_at(T0 + 4) is None
    assert beat(t, 2, T0 + 5) is None
    assert beat(t, 3, T0 + 9) is None  # silent for 4 s in between, no tick ran
    assert status(t) == "down"
    moved(beat(t, 4, T0 + 10), "down", "healthy")


def test_down_to_degraded_on_bad_heartbeat() -> None:
    t = tracker()
    beat(t, 1, T0)
    t.on_tick(T0 + 4)
    moved(beat(t, 2, T0 + 5, **BAD), "down", "degraded")
    assert t.score == pytest.approx(47.75)


def test_set_threshold_can_degrade_but_not_promote() -> None:
    t = tracker()
    beat(t, 1, T0, cpu_percent=50.0, memory_percent=50.0)  # 72.5
    assert status(t) == "healthy"
    moved(t.set_threshold(80.0), "healthy", "degraded")
    assert t.set_threshold(50.0) is None
    assert status(t) == "degraded"
    assert t.threshold == 50.0


# --- detection timing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval_ms", "fall"), [(1000, 3), (100, 3), (250, 1), (1000, 5), (30, 7)]
)
def test_down_exactly_at_deadline_never_before(interval_ms: int, fall: int) -> None:
    t = tracker(HealthSettings(heartbeat_interval_ms=interval_ms, fall=fall))
    last_seen = T0 + 0.1
    beat(t, 1, last_seen)
    deadline = last_seen + (fall + 0.5) * interval_ms / 1000
    now = last_seen
    while now < deadline - 1e-6:
        t.on_tick(now)
        assert status(t) != "down"
        now += 0.001
    t.on_tick(deadline - 1e-6)
    assert status(t) != "down"
    tr = t.on_tick(deadline)
    assert tr is not None
    assert tr.new_status == "down"


def test_next_check_at_follows_each_missed_interval() -> None:
    t = tracker()
    beat(t, 1, T0)
    times = []
    now = T0
    while (at := t.next_check_at(now)) is not None:
        times.append(at)
        now = at
        t.on_tick(now)
    assert times == pytest.approx(
        [T0 + 1.5 + CHECK_SLACK_S, T0 + 2.5 + CHECK_SLACK_S, T0 + 3.5 + CHECK_SLACK_S]
    )
    assert status(t) == "down"
    assert t.missed_heartbeats == 3


def test_next_check_at_moves_with_heartbeats_and_is_overdue_when_late() -> None:
    t = tracker()
    beat(t, 1, T0)
    assert t.next_check_at(T0 + 0.2) == pytest.approx(T0 + 1.5 + CHECK_SLACK_S)
    beat(t, 2, T0 + 1)
    assert t.next_check_at(T0 + 1) == pytest.approx(T0 + 2.5 + CHECK_SLACK_S)
    # A caller that slept too long is told to check at once (a time in the past).
    at = t.next_check_at(T0 + 50)
    assert at is not None
    assert at <= T0 + 50
    moved(t.on_tick(T0 + 50), "healthy", "down")
    assert t.next_check_at(T0 + 50) is None


# --- replay and restart --------------------------------------------------------------------


def test_replayed_heartbeat_is_ignored() -> None:
    t = tracker()
    beat(t, 10, T0)
    beat(t, 11, T0 + 0.5)
    before = t.snapshot()
    for seq in (11, 7):  # duplicate, then one old message
        out = one(t, hb(seq, **BAD), T0 + 0.6, WALL0)
        assert not out.accepted
        assert out.reason == "replay"
        assert out.transition is None
    assert t.snapshot() == before
    out = one(t, hb(12), T0 + 0.9, WALL0)
    assert out.accepted
    assert out.reason is None
    # The replayed 7 is no longer "the first of a run": an 8 now is a replay too.
    assert not one(t, hb(8), T0 + 1.0, WALL0).accepted


def test_restart_recognised_after_silence() -> None:
    t = tracker()
    beat(t, 500, T0)
    out = one(t, hb(1, **BAD), T0 + 1.0, WALL0)
    assert out.accepted
    assert out.reason == "restart"
    moved(out.transition, "healthy", "degraded")
    assert t.last_seq == 1


def test_restart_recognised_by_second_increasing_heartbeat() -> None:
    t = tracker()
    beat(t, 500, T0)
    first = one(t, hb(1, **BAD), T0 + 0.3, WALL0)
    assert (first.accepted, first.reason) == (False, "replay")
    second = one(t, hb(2, **BAD), T0 + 0.6, WALL0)
    assert (second.accepted, second.reason) == (True, "restart")
    moved(second.transition, "healthy", "degraded")
    assert t.last_seq == 2
    assert beat(t, 3, T0 + 0.9, **BAD) is None


def test_foreign_heartbeat_is_ignored() -> None:
    t = tracker()
    out = one(t, hb(1, gateway_id="edge-2"), T0, WALL0)
    assert (out.accepted, out.reason) == (False, "wrong_gateway")
    assert status(t) == "unknown"


# --- batches (coalesced heartbeats) -------------------------------------------------------


def batch(t: HealthTracker, *arrivals: tuple[Heartbeat, float]) -> BatchOutcome:
    """The arrivals as one batch, processed just after the last one arrived."""
    now = arrivals[-1][1] + 0.05 if arrivals else T0
    return t.on_heartbeats(arrivals, now, WALL0 + timedelta(seconds=now - T0))


def test_batch_counts_every_heartbeat_and_keeps_the_newest_metrics() -> None:
    t = tracker()
    out = batch(
        t,
        (hb(1, cpu_percent=10.0), T0),
        (hb(2, cpu_percent=20.0), T0 + 0.1),
        (hb(3, cpu_percent=30.0, active_connections=7, labels={"az": "b"}), T0 + 0.2),
    )
    assert (out.accepted, out.restarts, out.rejected) == (3, 0, ())
    moved(out.transition, "unknown", "healthy")
    s = t.snapshot()
    assert (s.heartbeats, s.last_seq, s.cpu_percent, s.active_connections) == (3, 3, 30.0, 7)
    assert s.labels == {"az": "b"}
    # Seen when the newest arrived, not when the batch was processed.
    assert s.last_seen is not None
    assert abs((s.last_seen - (WALL0 + timedelta(seconds=0.2))).total_seconds()) < 1e-6
    assert t.next_check_at(T0 + 0.25) == pytest.approx(T0 + 0.2 + 1.5 + CHECK_SLACK_S)


def test_batch_applies_the_replay_rule_to_each_heartbeat_in_order() -> None:
    t = tracker()
    beat(t, 10, T0)
    out = batch(
        t,
        (hb(11), T0 + 0.1),
        (hb(11), T0 + 0.2),  # the same message twice
        (hb(4), T0 + 0.3),  # an old one
        (hb(12, cpu_percent=50.0), T0 + 0.4),
        (hb(5), T0 + 0.5),  # not "the second of a new run": 12 came in between
    )
    assert out.accepted == 2
    assert [(r.reason, r.seq) for r in out.rejected] == [
        ("replay", 11),
        ("replay", 4),
        ("replay", 5),
    ]
    assert (t.last_seq, t.heartbeats) == (12, 3)
    assert t.snapshot().cpu_percent == 50.0


def test_batch_recognises_a_restart_inside_it() -> None:
    t = tracker()
    beat(t, 500, T0)
    out = batch(t, (hb(1, **BAD), T0 + 0.2), (hb(2, **BAD), T0 + 0.3), (hb(3, **BAD), T0 + 0.4))
    assert (out.accepted, out.restarts) == (2, 1)
    assert [(r.reason, r.seq) for r in out.rejected] == [("replay", 1)]
    moved(out.transition, "healthy", "degraded")
    assert t.last_seq == 3


def test_coalesced_good_heartbeats_each_count_towards_rise() -> None:
    t = tracker(HealthSettings(rise=3))
    beat(t, 1, T0, **BAD)
    # One by one, the bad 2 would break the run; coalesced, both share the good newest.
    out = batch(t, (hb(2, **BAD), T0 + 0.1), (hb(3), T0 + 0.2))
    assert out.transition is None
    assert t.good_heartbeats == 2
    moved(beat(t, 4, T0 + 0.4), "degraded", "healthy")


def test_a_bad_newest_heartbeat_breaks_the_run_for_its_whole_batch() -> None:
    t = tracker()  # rise 2
    beat(t, 1, T0, **BAD)
    beat(t, 2, T0 + 0.1)
    out = batch(t, (hb(3), T0 + 0.2), (hb(4, **BAD), T0 + 0.3))
    assert out.transition is None
    assert (status(t), t.good_heartbeats) == ("degraded", 0)


def test_a_gap_inside_a_batch_restarts_the_rise_run() -> None:
    t = tracker(HealthSettings(rise=3))
    beat(t, 1, T0, **BAD)
    out = batch(t, (hb(2), T0 + 1), (hb(3), T0 + 3), (hb(4), T0 + 4))  # 2 s silent before 3
    assert out.transition is None
    assert t.good_heartbeats == 2  # 3 and 4
    moved(beat(t, 5, T0 + 5), "degraded", "healthy")


def test_at_most_one_transition_per_batch() -> None:
    t = tracker()
    beat(t, 1, T0)
    # One by one: healthy -> degraded -> (rise 2) healthy. Coalesced: it never left healthy.
    out = batch(t, (hb(2, **BAD), T0 + 0.1), (hb(3), T0 + 0.2), (hb(4), T0 + 0.3))
    assert out.transition is None
    assert (status(t), t.heartbeats) == ("healthy", 4)


def test_batch_with_nothing_accepted_changes_nothing() -> None:
    t = tracker()
    beat(t, 5, T0)
    before = t.snapshot()
    assert batch(t) == BatchOutcome(accepted=0, restarts=0)
    out = batch(t, (hb(5), T0 + 0.1), (hb(6, gateway_id="edge-2"), T0 + 0.2))
    assert out.accepted == 0
    assert [r.reason for r in out.rejected] == ["replay", "wrong_gateway"]
    assert out.transition is None
    assert t.snapshot() == before


# --- probes --------------------------------------------------------------------------------


def test_probe_latency_is_smoothed() -> None:
    t = tracker(HealthSettings(latency_smoothing=0.5))
    assert t.on_probe_ok(100.0) is None
    assert t.probe_latency_ms == pytest.approx(100.0)
    t.on_probe_ok(20.0)
    assert t.probe_latency_ms == pytest.approx(60.0)
    t.on_probe_ok(20.0)
    assert t.probe_latency_ms == pytest.approx(40.0)


def test_probe_failures_lower_score_degrade_but_never_down() -> None:
    t = tracker()
    beat(t, 1, T0)
    assert t.on_probe_failed() is None
    assert t.on_probe_failed() is None
    assert t.score == pytest.approx(70.0)
    moved(t.on_probe_failed(), "healthy", "degraded")
    for _ in range(10):
        t.on_probe_failed()
    assert status(t) == "degraded"
    assert t.score == 0.0
    assert t.consecutive_failures == 13
    t.on_probe_ok(5.0)
    assert t.failed_probes == 0
    assert status(t) == "degraded"  # only heartbeats count towards rise
    assert beat(t, 2, T0 + 1) is None  # the good beat before the demotion does not count
    moved(beat(t, 3, T0 + 2), "degraded", "healthy")


def test_slow_probes_can_degrade() -> None:
    t = tracker(HealthSettings(latency_smoothing=1.0))
    beat(t, 1, T0, cpu_percent=50.0, memory_percent=50.0)  # 72.5, latency unknown
    tr = t.on_probe_ok(500.0)  # latency part 0: 52.5
    moved(tr, "healthy", "degraded")


# --- snapshot ------------------------------------------------------------------------------


def test_snapshot_carries_every_field() -> None:
    t = tracker()
    assert t.snapshot().status == "unknown"
    assert t.snapshot().last_seen is None
    beat(
        t,
        7,
        T0,
        region="eu-1",
        role="backup",
        backup_for="edge-0",
        active_connections=50,
        max_connections=500,
        latency_ms=12.5,
        config_versions={"Route": 3},
        labels={"az": "a"},
    )
    t.on_probe_ok(8.0)
    t.on_probe_failed()
    s = t.snapshot()
    assert (s.gateway_id, s.region, s.role, s.backup_for) == ("edge-1", "eu-1", "backup", "edge-0")
    assert s.status == "healthy"
    assert s.score == pytest.approx(t.score)
    assert (s.cpu_percent, s.memory_percent) == (0.0, 0.0)
    assert (s.active_connections, s.max_connections) == (50, 500)
    assert (s.reported_latency_ms, s.probe_latency_ms) == (12.5, 8.0)
    assert s.latency_ms == 8.0
    assert s.consecutive_failures == 1
    assert s.last_seq == 7
    assert s.last_seen == WALL0
    assert s.config_versions == {"Route": 3}
    assert s.labels == {"az": "a"}
