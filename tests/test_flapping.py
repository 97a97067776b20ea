"""Flap detection: the rule on a controlled clock, then end to end with a real server
(a flapping gateway is not selected and not failed back to until it holds steady)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from actors.failover import FailoverPlanner, MassFailureGuard, Redirect
from actors.flapping import FlapDetector
from actors.pool import Pool
from gatefleet.app import Orchestrator
from schemas.api import GatewaySnapshot, SelectReply, SelectRequest
from schemas.events import Failback, GatewayFlapping, GatewayStatusChanged
from schemas.settings import HealthSettings, Settings
from schemas.types import GatewayStatus
from tests.conftest import EventLog, SettingsFactory
from tests.fleet import BUSY, IDLE, Fleet, MutableMetrics

BACK_AND_FORTH: list[tuple[GatewayStatus, GatewayStatus]] = [
    ("healthy", "degraded"),
    ("degraded", "healthy"),
]
DOWN_AND_UP: list[tuple[GatewayStatus, GatewayStatus]] = [("healthy", "down"), ("down", "healthy")]


def detector(threshold: int = 3, window_s: float = 10.0, hold_s: float = 5.0) -> FlapDetector:
    return FlapDetector(
        HealthSettings(flap_threshold=threshold, flap_window_s=window_s, flap_hold_s=hold_s)
    )


def test_enough_changes_within_the_window_make_it_flap() -> None:
    flaps = detector()
    assert not flaps.on_change("unknown", "healthy", 0.0)  # its first status is no change
    assert not flaps.on_change("healthy", "degraded", 1.0)
    assert not flaps.on_change("degraded", "healthy", 2.0)
    assert flaps.on_change("healthy", "down", 3.0)
    assert flaps.flapping
    assert not flaps.on_change("down", "healthy", 4.0)  # already flapping: no second start


def test_changes_spread_wider_than_the_window_are_no_flap() -> None:
    flaps = detector(window_s=10.0)
    for n, (old, new) in enumerate(BACK_AND_FORTH * 3):
        assert not flaps.on_change(old, new, n * 6.0)  # 3 changes span 12 s > 10 s
    assert not flaps.flapping


def test_it_ends_after_holding_healthy_and_a_change_restarts_the_hold() -> None:
    flaps = detector(hold_s=5.0)
    for at, (old, new) in enumerate(DOWN_AND_UP * 2):
        flaps.on_change(old, new, float(at))
    assert flaps.flapping
    assert flaps.ends_at() == 3.0 + 5.0
    assert not flaps.on_check(7.9)
    flaps.on_change("healthy", "degraded", 7.9)
    assert flaps.ends_at() is None  # not healthy: not on its way out
    flaps.on_change("degraded", "healthy", 9.0)
    assert not flaps.on_check(13.9)
    assert flaps.on_check(14.0)
    assert not flaps.flapping
    assert flaps.ends_at() is None
    # Judged: the changes before it ended do not count towards the next flap.
    assert not flaps.on_change("healthy", "degraded", 14.5)
    assert not flaps.on_change("degraded", "healthy", 15.0)


def test_threshold_zero_turns_detection_off() -> None:
    flaps = detector(threshold=0)
    for n in range(20):
        assert not flaps.on_change(
            "healthy" if n % 2 else "down", "down" if n % 2 else "healthy", n
        )
    assert not flaps.flapping


def test_a_flapping_gateway_is_not_selectable_and_says_why() -> None:
    row = GatewaySnapshot(gateway_id="a", region="r", status="healthy", score=90.0)
    pool = Pool.of([row], 70.0)
    assert pool.is_eligible("a")
    pool.update(
        GatewaySnapshot(gateway_id="a", region="r", status="healthy", score=90.0, flapping=True)
    )
    assert not pool.is_eligible("a")
    assert pool.exclusion("a") == "flapping"


def test_failback_to_a_flapping_primary_waits_until_it_is_steady() -> None:
    planner = FailoverPlanner(MassFailureGuard(100.0, 1.0), manual_failback=False)
    planner.on_change("p", "healthy", "down", fleet=3, down=1, now=0.0)
    planner.on_replacement("p", "b", "backup of p")
    assert planner.on_change("p", "down", "healthy", fleet=3, down=0, now=1.0, flapping=True) == []
    (redirect,) = planner.on_steady("p")
    assert isinstance(redirect, Redirect)
    assert (redirect.from_gateway, redirect.to_gateway, redirect.failback) == ("b", "p", True)
    assert planner.on_steady("p") == []  # once


# End to end ------------------------------------------------------------------------------

HOLD_S = 1.0


def flap_settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        health={
            "heartbeat_interval_ms": 100,
            "fall": 3,
            "rise": 2,
            "flap_threshold": 4,
            "flap_window_s": 30.0,
            "flap_hold_s": HOLD_S,
        },
        orchestrator={"load_balancing_strategy": "RoundRobin"},
        gateways=[
            {"id": "primary", "region": "us-west"},
            {"id": "backup", "region": "us-west", "role": "backup", "backup_for": "primary"},
        ],
    )


def changed_to(event_log: EventLog, gateway_id: str, status: str, since: int) -> None:
    event_log.wait_for(
        lambda e: (
            isinstance(e, GatewayStatusChanged)
            and e.gateway_id == gateway_id
            and e.new_status == status
        ),
        since=since,
    )


def flapping(event_log: EventLog, value: bool, since: int = 0, timeout: float = 5.0) -> int:
    event = event_log.wait_for(
        lambda e: isinstance(e, GatewayFlapping) and e.flapping is value, timeout, since
    )
    assert isinstance(event, GatewayFlapping)
    assert (event.gateway_id, event.changes, event.window_s) == ("primary", 4, 30.0)
    return event_log.mark()


def select(fleet: Fleet) -> str | None:
    return fleet.call("select-gateway", SelectRequest(), SelectReply).gateway_id


@pytest.fixture
def orchestrator(
    make_settings: SettingsFactory, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Orchestrator:
    return start_orchestrator(flap_settings(make_settings))


def test_a_flapping_gateway_is_shown_counted_and_not_selected_until_steady(
    orchestrator: Orchestrator, fleet: Fleet, event_log: EventLog
) -> None:
    metrics = MutableMetrics(IDLE)
    fleet.add("primary", metrics=metrics)
    fleet.add("other", "us-west")
    changed_to(event_log, "primary", "healthy", 0)
    for status, load in [("degraded", BUSY), ("healthy", IDLE)] * 2:  # 4 changes
        mark = event_log.mark()
        metrics.metrics = load
        changed_to(event_log, "primary", status, mark)
    flapping(event_log, True)
    assert fleet.gateways()["primary"].flapping
    assert fleet.status().gateways_flapping == 1
    assert {select(fleet) for _ in range(6)} == {"other"}  # healthy, but flapping

    flapping(event_log, False, timeout=HOLD_S + 5)
    assert not fleet.gateways()["primary"].flapping
    assert fleet.status().gateways_flapping == 0
    assert "primary" in {select(fleet) for _ in range(6)}


def test_failback_waits_until_a_flapping_primary_holds_steady(
    orchestrator: Orchestrator, fleet: Fleet, event_log: EventLog
) -> None:
    primary = fleet.add("primary")
    fleet.add("backup")
    changed_to(event_log, "primary", "healthy", 0)
    changed_to(event_log, "backup", "healthy", 0)
    for _ in range(2):  # down and back twice: 4 changes, the last one a recovery
        mark = event_log.mark()
        primary.pause_heartbeats()
        changed_to(event_log, "primary", "down", mark)
        mark = event_log.mark()
        primary.resume_heartbeats()
        changed_to(event_log, "primary", "healthy", mark)
    flapping(event_log, True)
    failbacks = event_log.of_type(Failback)
    assert len(failbacks) == 1  # the first recovery's; the flapping one waits
    assert select(fleet) == "backup"

    ended = flapping(event_log, False, timeout=HOLD_S + 5)
    failback = event_log.wait_for(lambda e: isinstance(e, Failback), since=ended - 1)
    assert isinstance(failback, Failback)
    assert (failback.from_gateway, failback.to_gateway) == ("backup", "primary")
    assert select(fleet) == "primary"
