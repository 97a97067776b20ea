"""The fleet rebuilt from events (gatefleet.audit.state): a pure fold, tested without a server.

Distribution folds are checked against the real state machine: its events, folded, must
give back the record it keeps (that record is what `P.api.distributions.get` serves).
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors.distribution import step_event
from actors.distribution_machine import (
    AskVersion,
    Command,
    DistributionMachine,
    Emit,
    ScheduleRetry,
    Send,
    new_distribution,
)
from gatefleet.audit.state import (
    DistributionState,
    FleetFold,
    LoadBalancingState,
    rebuild,
)
from schemas.api import Distribution
from schemas.events import (
    EVENT_MAX_IDS,
    Alarm,
    DistributionEvent,
    Event,
    Failback,
    Failover,
    GatewayDown,
    GatewayLeft,
    GatewayRecovered,
    GatewayRegistered,
    GatewaySelected,
    GatewayStatusChanged,
    LoadBalancingChanged,
    OrchestratorStarted,
)

T0 = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
CONFIGURED = LoadBalancingState(strategy="RoundRobin", health_threshold=70.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def registered(gw: str, s: float) -> GatewayRegistered:
    return GatewayRegistered(gateway_id=gw, region="eu-west", source="heartbeat", ts=at(s))


def changed(gw: str, old: str, new: str, score: float, s: float) -> GatewayStatusChanged:
    return GatewayStatusChanged(
        gateway_id=gw,
        old_status=old,  # type: ignore[arg-type]
        new_status=new,  # type: ignore[arg-type]
        score=score,
        reason=f"{old} to {new}",
        ts=at(s),
    )


def fold(events: list[Event], moment: float = 1e6) -> FleetFold:
    fleet = FleetFold(CONFIGURED)
    for event in events:
        if event.ts <= at(moment):
            fleet.apply(event)
    return fleet


# Gateways ---------------------------------------------------------------------------------


def test_gateway_life_cycle_status_and_score() -> None:
    events: list[Event] = [
        registered("edge-1", 1),
        changed("edge-1", "unknown", "healthy", 96.5, 2),
        changed("edge-1", "healthy", "down", 0.0, 5),
        GatewayDown(gateway_id="edge-1", missed_heartbeats=3, reason="missed 3", ts=at(5)),
        changed("edge-1", "down", "healthy", 95.0, 9),
        GatewayRecovered(gateway_id="edge-1", score=95.0, ts=at(9)),
    ]
    states = {s: rebuild(events, at=at(s), load_balancing=CONFIGURED) for s in (0, 1, 3, 6, 10)}
    assert states[0].gateways == {}
    first = states[1].gateways["edge-1"]
    assert (first.status, first.score, first.region, first.since) == (
        "unknown",
        0.0,
        "eu-west",
        at(1),
    )
    assert (states[3].gateways["edge-1"].status, states[3].gateways["edge-1"].score) == (
        "healthy",
        96.5,
    )
    down = states[6].gateways["edge-1"]
    assert (down.status, down.score, down.since, down.reason) == ("down", 0.0, at(5), "missed 3")
    back = states[10].gateways["edge-1"]
    assert (back.status, back.score, back.since, back.reason) == (
        "healthy",
        95.0,
        at(9),
        "down to healthy",  # the recovered event keeps the status change's reason
    )
    assert states[10].events == 6


def test_left_removes_and_registering_again_starts_unknown() -> None:
    events: list[Event] = [
        registered("edge-1", 1),
        changed("edge-1", "unknown", "healthy", 90.0, 2),
        GatewayLeft(gateway_id="edge-1", reason="goodbye", ts=at(3)),
    ]
    assert fold(events).gateways == {}
    again = fold([*events, registered("edge-1", 4)]).state(at(4)).gateways["edge-1"]
    assert (again.status, again.score) == ("unknown", 0.0)


def test_a_registration_published_just_after_the_first_change_is_that_change_s() -> None:
    late: list[Event] = [
        changed("edge-1", "unknown", "healthy", 93.0, 1.0),
        registered("edge-1", 1.002),
    ]
    gateway = fold(late).state(at(2)).gateways["edge-1"]
    assert (gateway.region, gateway.status, gateway.score) == ("eu-west", "healthy", 93.0)
    # Much later, a registration is a new start (an orchestrator restart): unknown again.
    restarted = fold([*late, registered("edge-1", 60)]).state(at(60)).gateways["edge-1"]
    assert (restarted.status, restarted.score) == ("unknown", 0.0)
    # As is one that follows a later change (the gateway had been tracked for a while).
    tracked = [
        *late,
        changed("edge-1", "healthy", "degraded", 60.0, 1.1),
        registered("edge-1", 1.2),
    ]
    assert fold(tracked).state(at(2)).gateways["edge-1"].status == "unknown"


def test_status_of_a_gateway_registered_before_the_oldest_event() -> None:
    state = fold([changed("edge-7", "healthy", "degraded", 55.0, 1)]).state(at(2))
    gateway = state.gateways["edge-7"]
    assert (gateway.region, gateway.status, gateway.score) == (None, "degraded", 55.0)


# Load balancing, failovers, alarms --------------------------------------------------------


def test_load_balancing_starts_as_configured_then_follows_changes() -> None:
    change = LoadBalancingChanged(
        old_strategy="RoundRobin",
        new_strategy="LeastConnections",
        old_threshold=70.0,
        new_threshold=75.0,
        ts=at(5),
    )
    before = rebuild([change], at=at(4), load_balancing=CONFIGURED).load_balancing
    after = rebuild([change], at=at(5), load_balancing=CONFIGURED).load_balancing
    assert before == CONFIGURED
    assert before.since is None
    assert after == LoadBalancingState(
        strategy="LeastConnections", health_threshold=75.0, since=at(5)
    )


def test_failovers_and_alarms_in_effect() -> None:
    events: list[Event] = [
        Failover(from_gateway="edge-1", to_gateway="edge-1b", reason="down", ts=at(1)),
        Failover(from_gateway="edge-2", to_gateway=None, reason="down", ts=at(2)),
        Alarm(kind="mass_failure", message="3 of 4 down", active=True, ts=at(2)),
        Failback(from_gateway="edge-1b", to_gateway="edge-1", reason="healthy", ts=at(3)),
        Alarm(kind="mass_failure", message="over", active=False, ts=at(4)),
    ]
    middle = rebuild(events, at=at(2), load_balancing=CONFIGURED)
    assert middle.failovers == {"edge-1": "edge-1b", "edge-2": None}
    assert middle.alarms == {"mass_failure": "3 of 4 down"}
    end = rebuild(events, at=at(4), load_balancing=CONFIGURED)
    assert end.failovers == {"edge-2": None}
    assert end.alarms == {}


def test_selections_change_nothing_and_a_state_is_a_copy() -> None:
    fleet = fold([registered("edge-1", 1)])
    before = fleet.state(at(1))
    fleet.apply(
        GatewaySelected(
            region=None,
            client_id=None,
            strategy="RoundRobin",
            threshold=70.0,
            gateway_id=None,
            reason="no eligible gateway",
            candidates=[],
            excluded={"edge-1": "status unknown"},
            ts=at(2),
        )
    )
    fleet.apply(changed("edge-1", "unknown", "healthy", 99.0, 3))
    assert before.gateways["edge-1"].status == "unknown"
    assert fleet.state(at(3)).gateways["edge-1"].status == "healthy"


# Distributions, against the real state machine -------------------------------------------


def comparable(record: Distribution | DistributionState) -> tuple[object, ...]:
    return (
        record.status,
        record.target_gateways,
        sorted(record.successful_gateways),
        sorted(record.failed_gateways),
        dict(sorted(record.gateways.items())),
        record.batch,
        record.reason,
    )


class Driver:
    """Runs a DistributionMachine against scripted gateways; every event is folded."""

    def __init__(self, machine: DistributionMachine, answers: dict[str, list[str]]) -> None:
        self.machine = machine
        self.answers = answers  # gateway -> answers to its attempts, in order
        self.fleet = FleetFold(CONFIGURED)
        self.inbox: deque[Command] = deque()
        self.clock = 0.0

    def run(self, commands: list[Command]) -> None:
        self.inbox.extend(commands)
        while self.inbox:
            command = self.inbox.popleft()
            self.clock += 1
            now = at(self.clock)
            match command:
                case Emit():
                    event = step_event(self.machine.record, command)
                    self.fleet.apply(msgspec.structs.replace(event, ts=now))
                case Send(gateway_id=gw, attempt=attempt):
                    answer = self.answers[gw][attempt - 1]
                    machine = self.machine
                    if answer.startswith("holds "):  # refuses a version below, takes the rest
                        held = int(answer.removeprefix("holds "))
                        if machine.record.version < held:
                            self.inbox.extend(machine.on_stale(gw, held, now_wall=now))
                        else:
                            self.inbox.extend(machine.on_ack(gw, now_wall=now, attempt=attempt))
                    elif answer == "ack":
                        self.inbox.extend(machine.on_ack(gw, now_wall=now, attempt=attempt))
                    elif answer == "nack":
                        self.inbox.extend(
                            machine.on_nack(gw, "bad route", now_wall=now, attempt=attempt)
                        )
                    elif answer == "timeout":
                        self.inbox.extend(machine.on_timeout(gw, now_wall=now, attempt=attempt))
                    # "crash": no answer ever comes (the test resumes from the record)
                case ScheduleRetry(gateway_id=gw):
                    self.inbox.extend(self.machine.on_retry_due(gw))
                case AskVersion(above=held):  # the distributor's part: the next version
                    self.inbox.extend(self.machine.move_version(held + 1, now))
                case _:
                    pass

    def check(self) -> DistributionState:
        record = self.machine.record
        folded = self.fleet.state(at(self.clock)).distributions[record.id]
        assert comparable(folded) == comparable(record)
        return folded


def machine_for(targets: list[str], unknown: list[str] | None = None) -> DistributionMachine:
    record = new_distribution(
        "dist-1", "Route", 3, targets=targets, unknown=unknown or [], created_at=T0
    )
    return DistributionMachine(record, batch_size=2, retry_count=2, retry_delay_s=0.1)


@pytest.mark.parametrize(
    ("answers", "unknown", "status"),
    [
        ({"a": ["ack"], "b": ["ack"], "c": ["ack"]}, [], "completed"),
        ({"a": ["ack"], "b": ["ack"], "c": ["ack"]}, ["zz"], "partially_failed"),
        ({"a": ["ack"], "b": ["nack"], "c": ["timeout", "ack"]}, [], "partially_failed"),
        ({"a": ["timeout"] * 3, "b": ["nack"], "c": ["timeout"] * 3}, ["zz"], "failed"),
    ],
)
def test_distribution_fold_matches_the_machine(
    answers: dict[str, list[str]], unknown: list[str], status: str
) -> None:
    driver = Driver(machine_for(["a", "b", "c"], unknown=unknown), answers)
    driver.run(driver.machine.start(T0))
    folded = driver.check()
    assert folded.status == status
    assert all(folded.gateways[gw].state == "failed" for gw in unknown)
    assert folded.completed_at is not None


def test_distribution_fold_matches_the_machine_past_the_ids_an_event_lists() -> None:
    """The created and finished steps list EVENT_MAX_IDS gateways of each list at most;
    the batches and the answers give the rest."""
    targets = [f"gw-{n:05d}" for n in range(EVENT_MAX_IDS * 5 // 2)]
    answers = {gw: ["nack" if n % 7 == 0 else "ack"] for n, gw in enumerate(targets)}
    driver = Driver(machine_for(targets), answers)
    driver.run(driver.machine.start(T0))
    folded = driver.check()
    assert (folded.status, len(folded.target_gateways)) == ("partially_failed", len(targets))


def test_distribution_fold_midway_and_after_a_resume() -> None:
    driver = Driver(machine_for(["a", "b", "c"]), {"a": ["ack"], "b": ["crash"], "c": ["ack"]})
    driver.run(driver.machine.start(T0))
    midway = driver.check()  # b never answered: in flight, batch 1
    assert (midway.status, midway.batch, midway.gateways["b"].state) == ("in_progress", 1, "sent")
    resumed = DistributionMachine(
        driver.machine.record, batch_size=2, retry_count=2, retry_delay_s=0.1
    )
    driver.machine = resumed
    driver.answers["b"] = ["ack"]
    driver.run(resumed.resume(T0))
    assert driver.check().status == "completed"


def test_distribution_fold_follows_a_version_move() -> None:
    """b and d hold newer versions: the distribution moves above them and starts over."""
    answers = {"a": ["ack"], "b": ["holds 7"], "c": ["nack"], "d": ["holds 9"], "e": ["ack"]}
    driver = Driver(machine_for(["a", "b", "c", "d", "e"]), answers)
    driver.run(driver.machine.start(T0))
    folded = driver.check()
    assert (folded.status, folded.version, driver.machine.record.version) == (
        "partially_failed",
        10,
        10,
    )
    assert (folded.successful_gateways, folded.failed_gateways) == (["a", "b", "d", "e"], ["c"])


def test_queued_distribution_is_pending_without_targets() -> None:
    queued = DistributionEvent(
        distribution_id="dist-2",
        config_type="Route",
        version=4,
        step="queued",
        details={"after": "dist-1"},
        ts=at(1),
    )
    state = fold([queued]).state(at(1)).distributions["dist-2"]
    assert (state.status, state.version, state.target_gateways, state.created_at) == (
        "pending",
        4,
        [],
        at(1),
    )


def test_a_restart_brings_its_settings_and_resets_health() -> None:
    events: list[Event] = [
        registered("edge-1", 1),
        changed("edge-1", "unknown", "healthy", 96.5, 2),
        OrchestratorStarted(strategy="LatencyBased", threshold=80.0, ha_enabled=True, ts=at(5)),
    ]
    state = rebuild(events, at=at(6), load_balancing=CONFIGURED)
    assert state.load_balancing == LoadBalancingState(
        strategy="LatencyBased", health_threshold=80.0, since=at(5)
    )
    edge = state.gateways["edge-1"]
    assert (edge.status, edge.score, edge.reason) == ("unknown", 0.0, "orchestrator restarted")
