"""High availability with a real server at a 100 ms heartbeat: failover, failback, the
mass-failure guard, actor restarts, and HA turned off."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pykka
import pytest

from actors.base import CRASH
from actors.gateway import GatewayActor
from bus.runtime import Bus, Inbound
from gatefleet.app import Orchestrator
from schemas.api import FailbackReply, FailbackRequest, SelectReply, SelectRequest
from schemas.events import Alarm, Failback, Failover, GatewayDown, GatewayStatusChanged
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import ArrivalClock, Fleet

INTERVAL_S = 0.1
FALL = 3


class Redirects:
    """Collects redirect notices from `P.redirect.>`."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        self.notices: list[tuple[str, dict[str, Any], float]] = []
        self.arrived = threading.Event()
        bus.subscribe(f"{prefix}.redirect.>", self._on_notice)

    def _on_notice(self, msg: Inbound) -> None:
        self.notices.append((msg.subject, msgspec.json.decode(msg.data), time.monotonic()))
        self.arrived.set()


def ha_settings(make_settings: SettingsFactory, **ha: Any) -> Settings:
    return make_settings(
        health={"heartbeat_interval_ms": 100, "fall": FALL, "rise": 2},
        orchestrator={"load_balancing_strategy": "RegionAware"},
        ha=ha,
        gateways=[
            {"id": "primary", "region": "us-west"},
            {"id": "backup", "region": "us-west", "role": "backup", "backup_for": "primary"},
            {"id": "other", "region": "eu-west"},
        ],
    )


def select(fleet: Fleet) -> str | None:
    return fleet.call("select-gateway", SelectRequest(region="us-west"), SelectReply).gateway_id


def healthy(event_log: EventLog, *ids: str, since: int = 0) -> None:
    for gateway_id in ids:
        event_log.wait_for(
            lambda e, g=gateway_id: (
                isinstance(e, GatewayStatusChanged)  # type: ignore[misc]
                and e.gateway_id == g
                and e.new_status == "healthy"
            ),
            since=since,
        )


def add_pair(fleet: Fleet, event_log: EventLog) -> None:
    """A primary with its backup (us-west) and a gateway elsewhere (eu-west), healthy."""
    for gateway_id, region in (("primary", "us-west"), ("backup", "us-west"), ("other", "eu-west")):
        fleet.add(gateway_id, region)
    healthy(event_log, "primary", "backup", "other")


@pytest.fixture
def pair(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    request: pytest.FixtureRequest,
) -> Fleet:
    """A primary with its backup and a gateway elsewhere; ha options from the test's marker."""
    marker = request.node.get_closest_marker("ha")
    start_orchestrator(ha_settings(make_settings, **(marker.kwargs if marker else {})))
    add_pair(fleet, event_log)
    return fleet


def test_backup_takes_over_within_detection_time(
    pair: Fleet, bus: Bus, prefix: str, event_log: EventLog
) -> None:
    assert {select(pair) for _ in range(6)} == {"primary"}  # the backup waits
    redirects = Redirects(bus, prefix)
    arrivals = ArrivalClock(bus, f"{prefix}.gw.primary.heartbeat")
    wait_until(lambda: arrivals.count >= 1, what="a heartbeat seen by the test")
    pair.agents["primary"].pause_heartbeats()
    failover = event_log.wait_for(lambda e: isinstance(e, Failover))
    assert redirects.arrived.wait(5)
    subject, notice, redirected_at = redirects.notices[0]
    assert subject == f"{prefix}.redirect.primary"
    assert notice == {"from": "primary", "to": "backup", "reason": "backup of primary"}
    assert isinstance(failover, Failover)
    assert (failover.from_gateway, failover.to_gateway) == ("primary", "backup")
    assert arrivals.last is not None
    assert redirected_at - arrivals.last <= (FALL + 1) * INTERVAL_S
    assert select(pair) == "backup"


def test_auto_failback(pair: Fleet, event_log: EventLog) -> None:
    pair.agents["primary"].pause_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, Failover))
    mark = event_log.mark()
    pair.agents["primary"].resume_heartbeats()
    failback = event_log.wait_for(lambda e: isinstance(e, Failback), since=mark)
    assert isinstance(failback, Failback)
    assert (failback.from_gateway, failback.to_gateway) == ("backup", "primary")
    assert {select(pair) for _ in range(6)} == {"primary"}


@pytest.mark.ha(failback="manual")
def test_manual_failback_waits_for_the_operator(pair: Fleet, event_log: EventLog) -> None:
    pair.agents["primary"].pause_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, Failover))
    mark = event_log.mark()
    pair.agents["primary"].resume_heartbeats()
    healthy(event_log, "primary", since=mark)
    # Recovered, but held: traffic stays on the backup, never flickers back.
    assert {select(pair) for _ in range(10)} == {"backup"}
    reply = pair.call("failback", FailbackRequest(gateway_id="primary"), FailbackReply)
    assert (reply.gateway_id, reply.released_from) == ("primary", "backup")
    event_log.wait_for(lambda e: isinstance(e, Failback), since=mark)
    assert {select(pair) for _ in range(6)} == {"primary"}
    again = pair.raw_call("failback", b'{"gateway_id": "primary"}')
    assert again["error"]["code"] == "not_found"


def test_failover_without_a_backup_goes_to_the_region(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    start_orchestrator(make_settings(health={"heartbeat_interval_ms": 100, "fall": FALL}))
    for gateway_id, region in (("a", "us-west"), ("b", "us-west"), ("c", "eu-west")):
        fleet.add(gateway_id, region)
    healthy(event_log, "a", "b", "c")
    fleet.agents["a"].pause_heartbeats()
    failover = event_log.wait_for(lambda e: isinstance(e, Failover))
    assert isinstance(failover, Failover)
    assert failover.to_gateway == "b"


def test_mass_failure_freezes_failover(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    start_orchestrator(
        make_settings(
            health={"heartbeat_interval_ms": 100, "fall": FALL}, ha={"max_failover_percent": 50.0}
        )
    )
    ids = [f"gw-{n}" for n in range(4)]
    for gateway_id in ids:
        fleet.add(gateway_id, "us-west")
    healthy(event_log, *ids)
    for gateway_id in ids[:3]:  # 3 of 4 at once: more than 50%
        fleet.agents[gateway_id].pause_heartbeats()
    alarm = event_log.wait_for(lambda e: isinstance(e, Alarm) and e.active)
    assert isinstance(alarm, Alarm)
    assert alarm.kind == "mass_failure"
    downs = [
        event_log.wait_for(
            lambda e, g=g: (
                isinstance(e, GatewayDown)  # type: ignore[misc]
                and e.gateway_id == g
            )
        )
        for g in ids[:3]
    ]
    assert len(downs) == 3
    failovers_while_frozen = len(event_log.of_type(Failover))
    assert failovers_while_frozen < 3  # at most the ones decided before the guard tripped
    mark = event_log.mark()
    for gateway_id in ids[:3]:
        fleet.agents[gateway_id].resume_heartbeats()
    resumed = event_log.wait_for(lambda e: isinstance(e, Alarm) and not e.active, since=mark)
    assert isinstance(resumed, Alarm)


def test_crashed_gateway_actor_is_restarted(pair: Fleet, event_log: EventLog) -> None:
    [victim] = [
        ref
        for ref in pykka.ActorRegistry.get_by_class(GatewayActor)
        if ref.proxy().gateway_id.get() == "other"
    ]
    victim.tell(CRASH)
    wait_until(lambda: pair.status().actor_restarts == 1, what="the restart counted")
    # The new actor rebuilds its state from the next heartbeats.
    wait_until(
        lambda: pair.gateways()["other"].status == "healthy",
        what="other healthy again",
        show=lambda: pair.gateways()["other"],
    )
    assert not victim.is_alive()
    names = [ref.proxy().gateway_id.get() for ref in pykka.ActorRegistry.get_by_class(GatewayActor)]
    assert sorted(names) == ["backup", "other", "primary"]


def test_ha_disabled_detects_but_does_not_fail_over(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    settings = ha_settings(make_settings)
    settings = msgspec.structs.replace(
        settings, orchestrator=msgspec.structs.replace(settings.orchestrator, ha_enabled=False)
    )
    start_orchestrator(settings)
    add_pair(fleet, event_log)
    redirects = Redirects(bus, prefix)
    fleet.agents["primary"].pause_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, GatewayDown))
    # Out of the pool at once; the backup serves because its primary is not eligible.
    assert select(fleet) == "backup"
    mark = event_log.mark()
    fleet.agents["other"].pause_heartbeats()  # a later event proves the first was handled
    event_log.wait_for(lambda e: isinstance(e, GatewayDown), since=mark)
    assert event_log.of_type(Failover) == []
    assert redirects.notices == []
    assert fleet.status().ha_enabled is False
