"""Progressive delivery in the pure distribution machine and actors/rollout.py: canary,
health gates, halts, pauses, windows, aborts and resuming after a crash, step by step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors.distribution_machine import (
    Command,
    DistributionMachine,
    Emit,
    Finished,
    NotAllowed,
    ScheduleGate,
    ScheduleWake,
    Send,
    new_distribution,
)
from actors.rollout import (
    batches_left,
    canary_count,
    phase,
    rollback_targets,
    split_batches,
    split_by_previous,
)
from schemas.api import Distribution, Rollout

T0 = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
IDS = ["a", "b", "c", "d", "e"]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def machine(
    rollout: Rollout, ids: list[str] = IDS, *, unhealthy: dict[str, str] | None = None
) -> DistributionMachine:
    record = new_distribution(
        "dist-1", "Route", 2, targets=ids, unknown=[], created_at=T0, rollout=rollout
    )
    return DistributionMachine(
        record, batch_size=2, retry_count=1, retry_delay_s=0.5, unhealthy=unhealthy
    )


def reload(m: DistributionMachine) -> DistributionMachine:
    """The machine a restart makes of its stored record (timers and health view lost)."""
    stored = msgspec.json.decode(msgspec.json.encode(m.record), type=Distribution)
    return DistributionMachine(stored, batch_size=2, retry_count=1, retry_delay_s=0.5)


def sent(cmds: list[Command]) -> list[str]:
    return [c.gateway_id for c in cmds if isinstance(c, Send)]


def steps(cmds: list[Command]) -> list[str]:
    return [c.step for c in cmds if isinstance(c, Emit)]


def ack_all(m: DistributionMachine, ids: list[str], now: datetime = T0) -> list[Command]:
    cmds: list[Command] = []
    for gw in ids:
        cmds += m.on_ack(gw, now_wall=now)
    return cmds


def states(m: DistributionMachine) -> dict[str, str]:
    return {gw: d.state for gw, d in m.record.gateways.items()}


def test_a_canary_that_nacks_halts_with_no_other_gateway_pushed() -> None:
    m = machine(Rollout(canary=1, max_failures=0))
    first = m.start(T0)
    assert sent(first) == ["a"]
    assert [c.detail for c in first if isinstance(c, Emit)][-1].canary is True  # type: ignore[union-attr]
    cmds = m.on_nack("a", "bad route", now_wall=at(1))
    assert sent(cmds) == []
    assert steps(cmds) == ["gateway_nacked", "halted", "finished"]
    assert cmds[-1] == Finished("halted")
    rec = m.record
    assert (rec.status, rec.completed_at) == ("halted", at(1))
    assert rec.reason == "1 failed, more than max_failures 0 (last: a rejected it)"
    assert states(m) == {"a": "nacked", **dict.fromkeys(IDS[1:], "skipped")}
    assert rec.gateways["b"].error == "halted before its batch"
    assert rollback_targets(rec) == []  # a rejection keeps the gateway's last good config


def test_failures_up_to_max_failures_are_tolerated() -> None:
    m = machine(Rollout(max_failures=1))
    assert sent(m.start(T0)) == ["a", "b"]
    m.on_nack("a", "no", now_wall=T0)
    assert sent(m.on_ack("b", now_wall=T0)) == ["c", "d"]  # one failure: goes on
    cmds = m.on_nack("c", "no", now_wall=T0)
    assert steps(cmds)[-2:] == ["halted", "finished"]
    # d was in flight: skipped, and its late ack is ignored.
    assert m.record.gateways["d"].state == "skipped"
    assert m.record.gateways["d"].error == "halted before it answered"
    assert m.on_ack("d", now_wall=T0) == []
    assert rollback_targets(m.record) == ["b", "d"]  # d may have applied it


def test_health_gate_holds_the_next_batch_and_passes() -> None:
    m = machine(Rollout(canary=1, health_gate_s=5.0))
    m.start(T0)
    cmds = m.on_ack("a", now_wall=at(1))
    assert steps(cmds) == ["gateway_acked", "gate_started"]
    assert ScheduleGate(1, 5.0) in cmds
    assert m.record.gate_until == at(6)
    [wait] = m.on_gate_due(1, now_wall=at(5.9))
    assert isinstance(wait, ScheduleGate)
    assert (wait.batch, round(wait.delay_s, 3)) == (1, 0.1)
    cmds = m.on_gate_due(1, now_wall=at(6))
    assert steps(cmds) == ["gate_passed", "batch_sent"]
    assert sent(cmds) == ["b", "c"]
    assert m.record.gate_until is None
    assert (m.record.batch, m.record.batch_count) == (2, 3)
    # The canary's gate is over: it is no longer watched.
    assert m.on_health("a", False, "down", now_wall=at(7)) == []
    ack_all(m, ["b", "c"], at(8))
    m.on_gate_due(2, now_wall=at(13))
    ack_all(m, ["d", "e"], at(14))
    cmds = m.on_gate_due(3, now_wall=at(19))
    assert steps(cmds) == ["gate_passed", "finished"]
    assert m.record.status == "completed"


def test_a_canary_unhealthy_inside_its_gate_fails_and_rolls_back() -> None:
    m = machine(Rollout(canary=1, health_gate_s=5.0, auto_rollback=True))
    m.start(T0)
    m.on_ack("a", now_wall=at(1))
    assert m.on_health("b", False, "down", now_wall=at(2)) == []  # not pushed: not watched
    cmds = m.on_health("a", False, "degraded (score 40.0)", now_wall=at(2))
    assert steps(cmds) == ["gateway_unhealthy", "halted"]
    assert cmds[-1] == Finished("rolling_back")
    rec = m.record
    assert (rec.status, rec.completed_at, rec.gate_until) == ("rolling_back", None, None)
    assert rec.gateways["a"].state == "unhealthy"
    assert rec.gateways["a"].error == "unhealthy within its health gate: degraded (score 40.0)"
    assert (rec.successful_gateways, rec.failed_gateways) == ([], ["a"])
    assert rollback_targets(rec) == ["a"]
    assert m.on_gate_due(1, now_wall=at(6)) == []  # the gate is over with it


def test_a_gateway_already_unhealthy_when_it_acks_fails_its_gate() -> None:
    m = machine(Rollout(canary=1, health_gate_s=5.0, max_failures=3), unhealthy={"a": "down"})
    m.start(T0)
    cmds = m.on_ack("a", now_wall=at(1))
    assert steps(cmds) == ["gateway_acked", "gateway_unhealthy", "batch_sent"]
    assert m.record.gateways["a"].state == "unhealthy"
    # Tolerated (max_failures 3), and nothing acked to watch: the next batch goes at once.
    assert sent(cmds) == ["b", "c"]


def test_pause_after_the_canary_then_resume() -> None:
    m = machine(Rollout(canary="40%", pause_after_canary=True))
    assert sent(m.start(T0)) == ["a", "b"]  # 40% of 5
    m.on_ack("a", now_wall=T0)
    cmds = m.on_ack("b", now_wall=T0)
    assert steps(cmds) == ["gateway_acked", "paused"]
    assert m.record.status == "paused"
    assert phase(m.record, T0) == "paused after the canary"
    with pytest.raises(NotAllowed, match="cannot be paused"):
        m.pause()
    cmds = m.resume_paused(T0)
    assert steps(cmds) == ["unpaused", "batch_sent"]
    assert sent(cmds) == ["c", "d"]
    assert phase(m.record, T0) == "batch 2 of 3"


def test_a_paused_distribution_takes_answers_but_sends_no_new_batch() -> None:
    m = machine(Rollout())
    m.start(T0)
    assert steps(m.pause()) == ["paused"]
    assert m.on_ack("a", now_wall=T0) != []
    assert sent(m.on_ack("b", now_wall=T0)) == []
    with pytest.raises(NotAllowed, match="not paused"):
        machine(Rollout()).resume_paused(T0)
    assert sent(m.resume_paused(T0)) == ["c", "d"]


def test_not_before_holds_every_push_until_then() -> None:
    m = machine(Rollout(not_before=at(60)))
    cmds = m.start(T0)
    assert steps(cmds) == ["created", "scheduled"]
    assert cmds[-1] == ScheduleWake(60.0)
    assert (m.record.status, sent(cmds)) == ("scheduled", [])
    assert m.on_wake(at(59)) == [ScheduleWake(1.0)]  # woken early: waits again
    # A restart meanwhile sets its timer again.
    assert reload(m).resume(at(30))[-1] == ScheduleWake(30.0)
    cmds = m.on_wake(at(60))
    assert steps(cmds) == ["started", "batch_sent"]
    assert sent(cmds) == ["a", "b"]


def test_paused_while_scheduled_resumes_to_its_window() -> None:
    m = machine(Rollout(not_before=at(60)))
    m.start(T0)
    m.pause()
    assert phase(m.record, T0) == "paused (starting)"
    assert m.on_wake(at(60)) == []  # paused: the window does not start it
    assert m.resume_paused(at(10))[-1] == ScheduleWake(50.0)
    assert m.record.status == "scheduled"
    assert sent(m.on_wake(at(61))) == ["a", "b"]


def test_abort_skips_what_is_left_and_ignores_late_answers() -> None:
    m = machine(Rollout(auto_rollback=True))
    m.start(T0)
    m.on_ack("a", now_wall=T0)
    cmds = m.abort(at(2))
    assert steps(cmds) == ["finished"]
    assert cmds[-1] == Finished("aborted")
    rec = m.record
    assert (rec.status, rec.reason, rec.completed_at) == ("aborted", "aborted on request", at(2))
    assert states(m) == {"a": "acked", **dict.fromkeys(IDS[1:], "skipped")}
    assert m.on_ack("b", now_wall=at(3)) == []
    with pytest.raises(NotAllowed, match="aborted: it cannot be aborted"):
        m.abort(at(3))


def test_a_restart_during_a_gate_resumes_it_and_still_watches_the_batch() -> None:
    m = machine(Rollout(health_gate_s=10.0, max_failures=0, auto_rollback=True))
    m.start(T0)
    ack_all(m, ["a", "b"], at(1))
    m.on_gate_due(1, now_wall=at(11))
    ack_all(m, ["c", "d"], at(12))
    assert m.record.gate_until == at(22)

    again = reload(m)
    cmds = again.resume(at(15))
    assert ScheduleGate(2, 7.0) in cmds
    assert sent(cmds) == []
    assert again.on_health("a", False, "down", now_wall=at(16)) == []  # an earlier batch's
    cmds = again.on_health("d", False, "down", now_wall=at(16))
    assert cmds[-1] == Finished("rolling_back")
    assert rollback_targets(again.record) == ["a", "b", "c", "d"]


def test_without_a_rollout_nothing_changes() -> None:
    record = new_distribution("dist-1", "Route", 1, targets=IDS, unknown=[], created_at=T0)
    m = DistributionMachine(record, batch_size=2, retry_count=0, retry_delay_s=0)
    m.start(T0)
    m.on_nack("a", "no", now_wall=T0)
    assert sent(m.on_ack("b", now_wall=T0)) == ["c", "d"]
    assert m.on_health("b", False, "down", now_wall=T0) == []
    assert (m.record.batch_start, m.record.gated_batch) == (0, 0)


def test_canary_batches_and_rollback_split() -> None:
    assert [canary_count(Rollout(canary=c), 20) for c in (0, 3, 50, "10%", "2.5%", "0%")] == [
        0,
        3,
        20,
        2,
        1,
        0,
    ]
    assert canary_count(None, 20) == 0
    assert split_batches(IDS, 2, 1) == [["a"], ["b", "c"], ["d", "e"]]
    assert split_batches(IDS, 2, 0) == [["a", "b"], ["c", "d"], ["e"]]
    assert batches_left(5, 2, 1) == 3
    restores, pushed, listed = split_by_previous(["a", "b", "c"], {"a": 3, "b": None, "c": 1})
    assert (restores, pushed) == (3, ["a"])
    assert listed == {
        "b": "no previous version: not rolled back",
        "c": "its previous version is 1, not 3: not rolled back",
    }
    assert split_by_previous(["a"], {}) == (None, [], {"a": "no previous version: not rolled back"})
