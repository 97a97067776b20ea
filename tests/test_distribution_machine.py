"""The distribution state machine, driven by a deterministic simulated fleet."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import pytest

from actors.distribution_machine import (
    NO_TARGETS,
    UNKNOWN_GATEWAY,
    AskVersion,
    Command,
    DistributionMachine,
    Emit,
    Finished,
    ScheduleRetry,
    Send,
    new_distribution,
    resolve_targets,
)
from schemas.api import Distribution
from schemas.codec import encode
from schemas.events import (
    EVENT_MAX_IDS,
    BatchSentStep,
    CreatedStep,
    FinishedStep,
    GatewayAckedStep,
    GatewayRetriedStep,
    VersionMovedStep,
)

T0 = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 28, 7, 5, tzinfo=UTC)

# What a gateway answers to attempt n: "ack", "nack", "timeout" or "no_responders".
Behaviour = Callable[[int], str]


def ack(_: int) -> str:
    return "ack"


def silent(_: int) -> str:
    return "no_responders"


def nack(_: int) -> str:
    return "nack"


def flaky(failures: int) -> Behaviour:
    return lambda attempt: "timeout" if attempt <= failures else "ack"


def record_for(ids: list[str], unknown: list[str] | None = None) -> Distribution:
    return new_distribution("dist-1", "Route", 8, targets=ids, unknown=unknown or [], created_at=T0)


def roundtrip(record: Distribution) -> Distribution:
    """What a crash does to a record: stored as JSON, read back."""
    return msgspec.json.decode(msgspec.json.encode(record), type=Distribution)


class Fleet:
    """Carries out the machine's commands against simulated gateways, one step at a time,
    checking the invariants after every step."""

    def __init__(
        self,
        behaviours: dict[str, Behaviour],
        *,
        batch_size: int = 3,
        retry_count: int = 2,
        retry_delay_s: float = 1.5,
    ) -> None:
        self.behaviours = behaviours
        self.batch_size = batch_size
        self.retry_count = retry_count
        self.retry_delay_s = retry_delay_s
        self.sends: list[Send] = []
        self.retries: list[ScheduleRetry] = []
        self.events: list[Emit] = []
        self.finished: list[Finished] = []
        self.queue: deque[Command] = deque()
        self.stored: Distribution | None = None

    def machine(self, record: Distribution) -> DistributionMachine:
        return DistributionMachine(
            record,
            batch_size=self.batch_size,
            retry_count=self.retry_count,
            retry_delay_s=self.retry_delay_s,
        )

    def feed(self, m: DistributionMachine, cmds: list[Command]) -> None:
        self.stored = roundtrip(m.record)  # store first, then act
        self.check(m)
        for cmd in cmds:
            if isinstance(cmd, Emit):
                self.events.append(cmd)
            elif isinstance(cmd, Finished):
                self.finished.append(cmd)
            else:
                self.queue.append(cmd)

    def run(self, m: DistributionMachine, cmds: list[Command], crash_after: int = -1) -> int:
        """Run until done, or until `crash_after` steps (then the queue is lost)."""
        self.feed(m, cmds)
        steps = 0
        while self.queue and steps != crash_after:
            cmd = self.queue.popleft()
            if isinstance(cmd, ScheduleRetry):
                self.retries.append(cmd)
                self.feed(m, m.on_retry_due(cmd.gateway_id))
            elif isinstance(cmd, Send):
                self.sends.append(cmd)
                self.feed(m, self.answer(m, cmd))
            steps += 1
        if steps == crash_after:
            self.queue.clear()
        return steps

    def answer(self, m: DistributionMachine, cmd: Send) -> list[Command]:
        gw, n = cmd.gateway_id, cmd.attempt
        match self.behaviours[gw](n):
            case "ack":
                return m.on_ack(gw, now_wall=T1, attempt=n)
            case "nack":
                return m.on_nack(gw, "bad route", now_wall=T1, attempt=n)
            case outcome:
                return m.on_timeout(gw, outcome, now_wall=T1, attempt=n)

    def check(self, m: DistributionMachine) -> None:
        rec = m.record
        assert len(m.in_flight) <= self.batch_size
        states = {gw: rec.gateways[gw].state for gw in rec.gateways}
        assert m.in_flight == {gw for gw, s in states.items() if s in ("sent", "retrying")}
        assert "timed_out" not in states.values()
        assert Counter(rec.successful_gateways) == Counter(
            gw for gw, s in states.items() if s == "acked"
        )
        assert Counter(rec.failed_gateways) == Counter(
            gw for gw, s in states.items() if s in ("nacked", "failed")
        )
        assert roundtrip(rec) == rec

    def of_type(self, name: str) -> list[dict[str, object]]:
        """The fields of each `name` step, with the gateway's id where it has one."""
        return [
            msgspec.structs.asdict(e.detail)
            | ({"gateway_id": e.gateway_id} if e.gateway_id else {})
            for e in self.events
            if e.step == name
        ]


def run_all(fleet: Fleet, ids: list[str], unknown: list[str] | None = None) -> Distribution:
    m = fleet.machine(record_for(ids, unknown))
    fleet.run(m, m.start(T0))
    assert m.finished
    return m.record


def test_all_ack_in_batches() -> None:
    ids = [f"gw-{i}" for i in range(7)]
    fleet = Fleet(dict.fromkeys(ids, ack), batch_size=3)
    rec = run_all(fleet, ids)
    assert rec.status == "completed"
    assert rec.reason is None
    assert rec.completed_at == T1
    assert rec.successful_gateways == ids
    assert rec.failed_gateways == []
    assert all(d.state == "acked" and d.attempts == 1 for d in rec.gateways.values())
    assert rec.batch == 3
    assert [e["gateways"] for e in fleet.of_type("batch_sent")] == [ids[:3], ids[3:6], ids[6:]]
    assert [s.gateway_id for s in fleet.sends] == ids
    assert fleet.events[0].step == "created"
    assert fleet.of_type("finished") == [
        {
            "status": "completed",
            "successful": ids,
            "failed": [],
            "reason": None,
            "successful_count": len(ids),
            "failed_count": 0,
        }
    ]
    assert fleet.finished == [Finished("completed")]


def test_next_batch_waits_for_every_gateway_of_the_current_one() -> None:
    m = DistributionMachine(
        record_for(["a", "b", "c"]), batch_size=2, retry_count=0, retry_delay_s=0
    )
    first = m.start(T0)
    assert [c for c in first if isinstance(c, Send)] == [Send("a", 1), Send("b", 1)]
    assert m.on_ack("a", now_wall=T1) == [Emit(GatewayAckedStep(attempts=1), "a")]
    assert m.record.gateways["c"].state == "pending"
    nxt = m.on_nack("b", "no", now_wall=T1)
    assert Send("c", 1) in nxt
    assert m.record.batch == 2
    assert m.in_flight == {"c"}


def test_flaky_gateway_succeeds_on_retry() -> None:
    fleet = Fleet({"a": ack, "f": flaky(2)}, retry_count=2, retry_delay_s=1.5)
    rec = run_all(fleet, ["a", "f"])
    assert rec.status == "completed"
    assert rec.gateways["f"].state == "acked"
    assert rec.gateways["f"].attempts == 3
    assert rec.gateways["f"].error is None
    assert [s.attempt for s in fleet.sends if s.gateway_id == "f"] == [1, 2, 3]
    assert fleet.retries == [ScheduleRetry("f", 1.5), ScheduleRetry("f", 1.5)]
    assert [e["attempt"] for e in fleet.of_type("gateway_retried")] == [2, 3]
    assert [e["final"] for e in fleet.of_type("gateway_timed_out")] == [False, False]


def test_nack_is_final_and_recorded() -> None:
    fleet = Fleet({"a": ack, "n": nack}, retry_count=3)
    rec = run_all(fleet, ["a", "n"])
    assert rec.status == "partially_failed"
    assert rec.reason == "1 of 2 gateways failed"
    assert rec.gateways["n"].state == "nacked"
    assert rec.gateways["n"].error == "bad route"
    assert rec.gateways["n"].attempts == 1
    assert rec.failed_gateways == ["n"]
    assert [s for s in fleet.sends if s.gateway_id == "n"] == [Send("n", 1)]
    assert fleet.retries == []
    assert fleet.of_type("gateway_nacked") == [
        {"gateway_id": "n", "attempts": 1, "error": "bad route"}
    ]


@pytest.mark.parametrize("retry_count", [0, 1, 3])
def test_silent_gateway_fails_after_retry_count_plus_one_attempts(retry_count: int) -> None:
    fleet = Fleet({"s": silent}, retry_count=retry_count)
    rec = run_all(fleet, ["s"])
    assert rec.status == "failed"
    assert rec.reason == "1 of 1 gateways failed"
    assert [s.attempt for s in fleet.sends] == list(range(1, retry_count + 2))
    assert len(fleet.retries) == retry_count
    d = rec.gateways["s"]
    assert d.state == "failed"
    assert d.attempts == retry_count + 1
    assert d.error == f"no ack after {retry_count + 1} attempts: no_responders"
    finals = [e["final"] for e in fleet.of_type("gateway_timed_out")]
    assert finals == [False] * retry_count + [True]


def test_resolve_targets() -> None:
    known = {"b": True, "a": True, "down": False}
    assert resolve_targets(None, known) == (["a", "b"], [])
    assert resolve_targets(["b", "zz", "b", "down", "yy"], known) == (["b", "down"], ["zz", "yy"])
    assert resolve_targets([], known) == ([], [])


def test_unknown_target_fails_with_reason_and_is_never_sent() -> None:
    targets, unknown = resolve_targets(["a", "zz"], {"a": True})
    fleet = Fleet({"a": ack})
    m = fleet.machine(record_for(targets, unknown))
    assert m.record.failed_gateways == ["zz"]
    cmds = m.start(T0)
    assert cmds[0] == Emit(
        CreatedStep(
            config_type="Route",
            version=8,
            target_gateways=["a", "zz"],
            unknown_gateways=["zz"],
            target_count=2,
        )
    )
    fleet.run(m, cmds)
    rec = m.record
    assert rec.status == "partially_failed"
    assert rec.target_gateways == ["a", "zz"]
    assert rec.gateways["zz"].state == "failed"
    assert rec.gateways["zz"].error == UNKNOWN_GATEWAY
    assert rec.failed_gateways == ["zz"]
    assert all(s.gateway_id != "zz" for s in fleet.sends)


def test_only_unknown_targets_fails_without_sending() -> None:
    fleet = Fleet({})
    rec = run_all(fleet, [], ["x", "y"])
    assert rec.status == "failed"
    assert fleet.sends == []
    assert rec.failed_gateways == ["x", "y"]


def test_zero_targets_completes_with_reason() -> None:
    m = Fleet({}).machine(record_for(*resolve_targets(None, {"down": False})))
    cmds = m.start(T0)
    assert [type(c) for c in cmds] == [Emit, Emit, Finished]
    assert cmds[-1] == Finished("completed")
    assert m.record.status == "completed"
    assert m.record.reason == NO_TARGETS
    assert m.record.completed_at == T0
    assert m.record.batch == 0


def test_late_duplicate_and_stale_answers_are_ignored() -> None:
    m = DistributionMachine(record_for(["a", "b"]), batch_size=2, retry_count=2, retry_delay_s=1)
    m.start(T0)
    assert m.on_ack("a", now_wall=T1, attempt=1)
    before = m.record
    assert m.on_ack("a", now_wall=T1) == []  # duplicate
    assert m.on_nack("a", "late", now_wall=T1) == []  # late, already acked
    assert m.on_timeout("a", now_wall=T1) == []
    assert m.on_ack("nope", now_wall=T1) == []  # not a target
    assert m.on_retry_due("b") == []  # b is sent, not retrying
    assert m.on_timeout("b", now_wall=T1, attempt=1)  # -> retrying
    assert m.on_ack("b", now_wall=T1, attempt=1) == []  # stale attempt, while retrying
    assert m.on_retry_due("b") == [
        Emit(GatewayRetriedStep(attempt=2), "b"),
        Send("b", 2),
    ]
    assert m.on_ack("b", now_wall=T1, attempt=1) == []  # stale attempt, while sent
    assert m.record.gateways["a"] == before.gateways["a"]
    assert m.record.gateways["b"].state == "sent"
    assert m.on_ack("b", now_wall=T1, attempt=2)[-1] == Finished("completed")
    done = m.record
    assert m.on_ack("b", now_wall=T1) == []
    assert m.on_retry_due("b") == []
    assert m.resume(T1) == []
    assert m.record is done


# A counter behind the gateways (stale_version) ---------------------------------------------


def test_gateways_holding_newer_versions_move_the_distribution_above_them() -> None:
    m = DistributionMachine(
        record_for(["a", "b", "c", "d", "e"]), batch_size=4, retry_count=0, retry_delay_s=0
    )
    assert [c for c in m.start(T0) if isinstance(c, Send)] == [Send(gw, 1) for gw in "abcd"]
    m.on_ack("a", now_wall=T1, attempt=1)
    assert m.on_stale("b", 12, now_wall=T1, attempt=1) == [AskVersion(12)]
    assert m.on_stale("c", 10, now_wall=T1, attempt=1) == []  # asked above it already
    assert m.on_stale("d", 15, now_wall=T1, attempt=1) == [AskVersion(15)]
    waiting = m.record
    assert (waiting.status, waiting.version, waiting.failed_gateways) == ("in_progress", 8, [])
    assert {gw: waiting.gateways[gw].state for gw in "bcd"} == dict.fromkeys("bcd", "sent")
    assert m.in_flight == set("bcd")  # the next batch waits for the move
    assert m.move_version(13, T1) == []  # not above 15: the next answer will be
    assert m.move_version(16, T1) == [
        Emit(
            VersionMovedStep(
                from_version=8, to_version=16, held_version=15, gateways=["b", "c", "d"]
            )
        ),
        *(Send(gw, 1) for gw in "abcd"),
        Emit(BatchSentStep(batch=1, gateways=list("abcd"))),
    ]
    moved = roundtrip(m.record)
    assert (moved.version, moved.batch, moved.successful_gateways) == (16, 1, [])
    assert m.move_version(17, T1) == []  # nobody waits for one
    for gw in "abc":
        m.on_ack(gw, now_wall=T1, attempt=1)
    assert Send("e", 1) in m.on_ack("d", now_wall=T1, attempt=1)
    assert m.on_ack("e", now_wall=T1, attempt=1)[-1] == Finished("completed")
    done = m.record
    assert (done.version, done.failed_gateways) == (16, [])
    assert done.successful_gateways == list("abcde")


def test_a_version_that_cannot_move_nacks_the_gateways_waiting_for_it() -> None:
    m = DistributionMachine(record_for(["a", "b"]), batch_size=2, retry_count=0, retry_delay_s=0)
    m.start(T0)
    assert m.on_stale("b", 12, now_wall=T1, attempt=1) == [AskVersion(12)]
    assert m.on_ack("a", now_wall=T1, attempt=1) == [Emit(GatewayAckedStep(attempts=1), "a")]
    assert m.version_refused("cannot store a new version: down", T1)[-1] == Finished(
        "partially_failed"
    )
    b = m.record.gateways["b"]
    assert (b.state, b.error) == (
        "nacked",
        "stale_version: holds version 12; cannot store a new version: down",
    )


def test_a_stale_answer_that_holds_no_newer_version_is_a_nack() -> None:
    m = DistributionMachine(record_for(["a"]), batch_size=1, retry_count=0, retry_delay_s=0)
    m.start(T0)
    assert m.on_stale("a", 8, now_wall=T1, attempt=1)[-1] == Finished("failed")
    assert m.record.gateways["a"].error == "stale_version although it holds version 8"


def test_start_twice_is_an_error() -> None:
    m = Fleet({}).machine(record_for(["a"]))
    m.start(T0)
    with pytest.raises(RuntimeError, match="not pending"):
        m.start(T0)


def test_records_are_never_mutated_in_place() -> None:
    m = Fleet({}).machine(record_for(["a", "b"]))
    first = m.record
    m.start(T0)
    second = m.record
    m.on_ack("a", now_wall=T1)
    assert first.status == "pending"
    assert all(d.state == "pending" for d in first.gateways.values())
    assert second.gateways["a"].state == "sent"
    assert second.successful_gateways == []


def test_resume_of_a_pending_record_starts_it() -> None:
    fleet = Fleet({"a": ack})
    m = fleet.machine(roundtrip(record_for(["a"])))
    fleet.run(m, m.resume(T0))
    assert m.record.status == "completed"


BEHAVIOURS: dict[str, Behaviour] = {
    "a": ack,
    "b": flaky(1),
    "c": nack,
    "d": ack,
    "e": flaky(2),
    "f": silent,
    "g": ack,
}


def _full_run() -> tuple[int, Distribution]:
    fleet = Fleet(BEHAVIOURS, batch_size=3, retry_count=2)
    m = fleet.machine(record_for(list(BEHAVIOURS)))
    steps = fleet.run(m, m.start(T0))
    return steps, m.record


FULL_STEPS, REFERENCE = _full_run()


@pytest.mark.parametrize("crash_after", range(1, FULL_STEPS))
def test_resume_after_crash_finishes_without_resending_to_acked_gateways(crash_after: int) -> None:
    ids = list(BEHAVIOURS)
    fleet = Fleet(BEHAVIOURS, batch_size=3, retry_count=2)
    m = fleet.machine(record_for(ids))
    steps = fleet.run(m, m.start(T0), crash_after=crash_after)
    assert steps == crash_after
    assert not m.finished
    stored = fleet.stored
    assert stored is not None
    stored = roundtrip(stored)  # SIGKILL: only the stored record survives
    acked_before = set(stored.successful_gateways)
    sends_before = len(fleet.sends)

    m2 = fleet.machine(stored)
    resumed = m2.resume(T1)
    assert isinstance(resumed[0], Emit)
    assert resumed[0].step == "resumed"
    fleet.run(m2, resumed)

    after = fleet.sends[sends_before:]
    assert not acked_before & {s.gateway_id for s in after}
    # Re-sends keep their attempt number: nobody gets more than retry_count + 1 attempts.
    assert all(s.attempt <= 3 for s in fleet.sends)
    rec = m2.record
    assert rec.status == REFERENCE.status == "partially_failed"
    assert rec.gateways == REFERENCE.gateways
    assert sorted(rec.successful_gateways) == ["a", "b", "d", "e", "g"]
    assert sorted(rec.failed_gateways) == ["c", "f"]


def test_crash_points_cover_sent_and_retrying_gateways() -> None:
    seen: set[str] = set()
    for crash_after in range(1, FULL_STEPS):
        fleet = Fleet(BEHAVIOURS, batch_size=3, retry_count=2)
        m = fleet.machine(record_for(list(BEHAVIOURS)))
        fleet.run(m, m.start(T0), crash_after=crash_after)
        assert fleet.stored is not None
        seen |= {d.state for d in fleet.stored.gateways.values()}
    assert {"pending", "sent", "retrying", "acked", "nacked", "failed"} <= seen


def test_two_hundred_gateways() -> None:
    ids = [f"edge-{i:03d}" for i in range(200)]
    behaviours: dict[str, Behaviour] = {}
    for i, gw in enumerate(ids):
        behaviours[gw] = (
            nack if i % 10 == 0 else silent if i % 13 == 0 else flaky(1) if i % 7 == 0 else ack
        )
    fleet = Fleet(behaviours, batch_size=7, retry_count=2, retry_delay_s=0.25)
    rec = run_all(fleet, ids)

    nacked = [gw for i, gw in enumerate(ids) if i % 10 == 0]
    silent_ids = [gw for i, gw in enumerate(ids) if i % 10 != 0 and i % 13 == 0]
    assert rec.status == "partially_failed"
    assert sorted(rec.failed_gateways) == sorted(nacked + silent_ids)
    assert len(rec.successful_gateways) == 200 - len(nacked) - len(silent_ids)
    assert rec.batch == 29  # ceil(200 / 7)
    batches = fleet.of_type("batch_sent")
    assert [b["batch"] for b in batches] == list(range(1, 30))
    assert [gw for b in batches for gw in b["gateways"]] == ids  # type: ignore[attr-defined]
    sends = Counter(s.gateway_id for s in fleet.sends)
    for i, gw in enumerate(ids):
        expected = 1 if i % 10 == 0 else 3 if i % 13 == 0 else 2 if i % 7 == 0 else 1
        assert sends[gw] == expected, gw
        assert rec.gateways[gw].attempts == expected


def test_the_events_of_a_distribution_to_a_large_fleet_list_a_bounded_number_of_ids() -> None:
    """Its created and finished steps list the first EVENT_MAX_IDS gateways of each list,
    with the counts of all: the event stays far under NATS's 1 MiB payload limit."""
    ids = [f"gw-{n:06d}-".ljust(64, "x") for n in range(3 * EVENT_MAX_IDS)]
    rec = new_distribution("d", "Route", 1, targets=ids, unknown=["ghost"], created_at=T0)
    m = DistributionMachine(rec, batch_size=len(ids), retry_count=0, retry_delay_s=0.0)
    [created, *_] = m.start(T0)
    assert isinstance(created, Emit)
    assert isinstance(created.detail, CreatedStep)
    assert created.detail.target_gateways == ids[:EVENT_MAX_IDS]
    assert (created.detail.unknown_gateways, created.detail.target_count) == (
        ["ghost"],
        len(ids) + 1,
    )
    done: list[Command] = []
    for gw in ids:
        done = m.on_ack(gw, now_wall=T1)
    _, finished, _ = done  # acked, finished, Finished
    assert isinstance(finished, Emit)
    assert isinstance(finished.detail, FinishedStep)
    assert finished.detail.successful == ids[:EVENT_MAX_IDS]
    assert (finished.detail.successful_count, finished.detail.failed_count) == (len(ids), 1)
    assert len(encode(created.detail)) < 100 * 1024
    assert len(encode(finished.detail)) < 100 * 1024
