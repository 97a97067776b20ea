"""Maintenance (drain): the planner's rules, then end to end with a real server: a planned
move to the backup, no selection, back through the rise rule, kept across a restart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from actors.failover import FailoverPlanner, FindReplacement, MassFailureGuard, Redirect
from actors.maintenance import MaintenanceRecord
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from schemas.api import MaintenanceReply, MaintenanceRequest
from schemas.events import (
    Alarm,
    Failback,
    Failover,
    GatewayMaintenance,
)
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet
from tests.tenures import hold_settings_key, lead_again, settings_store
from tests.test_ha import Redirects, healthy, select


def test_a_drained_gateway_moves_without_the_guard_and_is_not_failed_back_to() -> None:
    planner = FailoverPlanner(MassFailureGuard(10.0, 60.0), manual_failback=False)
    assert planner.start_maintenance("p") == [FindReplacement("p")]
    assert planner.start_maintenance("p") == []  # once
    (redirect,) = planner.on_replacement("p", "b", "backup of p")
    assert isinstance(redirect, Redirect)
    assert redirect.reason == "maintenance; backup of p"
    # Switched off for the work: neither a failover nor counted by the guard (10 % of 2).
    assert planner.on_change("p", "healthy", "down", fleet=2, down=1, now=0.0) == []
    assert not planner.guard.frozen
    # Back up while still in maintenance: no failback.
    assert planner.on_change("p", "down", "healthy", fleet=2, down=0, now=1.0) == []
    (failback,) = planner.end_maintenance("p", steady=True)
    assert isinstance(failback, Redirect)
    assert (failback.from_gateway, failback.to_gateway, failback.failback) == ("b", "p", True)


def test_maintenance_of_a_gateway_already_failed_over_asks_for_nothing() -> None:
    planner = FailoverPlanner(MassFailureGuard(100.0, 60.0), manual_failback=False)
    planner.on_change("p", "healthy", "down", fleet=2, down=1, now=0.0)
    planner.on_replacement("p", "b", "backup of p")
    assert planner.start_maintenance("p") == []
    assert planner.end_maintenance("p", steady=False) == []  # not healthy yet: waits
    assert planner.on_change("p", "down", "healthy", fleet=2, down=0, now=1.0) != []


# End to end ------------------------------------------------------------------------------


def settings(make_settings: SettingsFactory, **extra: Any) -> Settings:
    return make_settings(
        **extra,
        health={"heartbeat_interval_ms": 100, "fall": 3, "rise": 2},
        orchestrator={"load_balancing_strategy": "RegionAware"},
        gateways=[
            {"id": "primary", "region": "us-west"},
            {"id": "backup", "region": "us-west", "role": "backup", "backup_for": "primary"},
        ],
    )


def maintenance(
    fleet: Fleet, gateway_id: str, enabled: bool, reason: str | None = None
) -> MaintenanceReply:
    request = MaintenanceRequest(gateway_id=gateway_id, enabled=enabled, reason=reason)
    return fleet.call("maintenance", request, MaintenanceReply)


def drained(event_log: EventLog, enabled: bool, since: int = 0) -> GatewayMaintenance:
    event = event_log.wait_for(
        lambda e: isinstance(e, GatewayMaintenance) and e.enabled is enabled, since=since
    )
    assert isinstance(event, GatewayMaintenance)
    return event


@pytest.fixture
def pair(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> Fleet:
    start_orchestrator(settings(make_settings))
    fleet.add("primary")
    fleet.add("backup")
    healthy(event_log, "primary", "backup")
    return fleet


def test_maintenance_moves_traffic_as_planned_and_returns_it_after_rise(
    pair: Fleet, event_log: EventLog, bus: Bus, prefix: str
) -> None:
    redirects = Redirects(bus, prefix)
    assert select(pair) == "primary"
    reply = maintenance(pair, "primary", True, "kernel upgrade")
    assert (reply.gateway_id, reply.enabled, reply.reason) == ("primary", True, "kernel upgrade")

    event = drained(event_log, True)
    assert (event.gateway_id, event.reason) == ("primary", "kernel upgrade")
    failover = event_log.wait_for(lambda e: isinstance(e, Failover))
    assert isinstance(failover, Failover)
    assert (failover.from_gateway, failover.to_gateway) == ("primary", "backup")
    assert failover.reason.startswith("maintenance")
    assert redirects.arrived.wait(5)
    assert redirects.notices[0][1]["to"] == "backup"
    row = pair.gateways()["primary"]
    assert (row.maintenance, row.maintenance_reason, row.status) == (
        True,
        "kernel upgrade",
        "healthy",
    )
    assert pair.status().gateways_in_maintenance == 1
    assert {select(pair) for _ in range(6)} == {"backup"}
    assert not event_log.of_type(Alarm)  # a planned move raises no alarm

    mark = event_log.mark()
    assert not maintenance(pair, "primary", False).enabled
    drained(event_log, False, since=mark)  # after `rise` good heartbeats
    failback = event_log.wait_for(lambda e: isinstance(e, Failback), since=mark)
    assert isinstance(failback, Failback)
    assert (failback.from_gateway, failback.to_gateway) == ("backup", "primary")
    assert not pair.gateways()["primary"].maintenance
    assert pair.status().gateways_in_maintenance == 0
    assert select(pair) == "primary"


def test_maintenance_of_an_unknown_gateway_is_not_found(pair: Fleet) -> None:
    body = msgspec.json.encode({"gateway_id": "nobody", "enabled": True})
    error = pair.raw_call("maintenance", body)["error"]
    assert error["code"] == "not_found"


def test_maintenance_outlives_a_restart(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    first = start_orchestrator(settings(make_settings))
    fleet.add("primary")
    fleet.add("backup")
    healthy(event_log, "primary")
    maintenance(fleet, "primary", True, "rack move")
    drained(event_log, True)
    first.stop()

    start_orchestrator(settings(make_settings))

    def still_drained_and_backup_healthy() -> bool:
        rows = fleet.gateways()
        primary, backup = rows.get("primary"), rows.get("backup")
        return (
            primary is not None
            and primary.maintenance
            and primary.status == "healthy"
            and backup is not None
            and backup.status == "healthy"
        )

    # Both rows are new to this process: each is selectable only once heard again.
    wait_until(still_drained_and_backup_healthy, what="primary back in maintenance, backup healthy")
    assert fleet.gateways()["primary"].maintenance_reason == "rack move"
    assert {select(fleet) for _ in range(6)} == {"backup"}


def test_a_maintenance_write_after_another_replica_wrote_the_key_steps_the_leader_down(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    """The leader has stored primary's maintenance; another replica (a newer leader the
    old one does not know of yet) stores it since: the old leader's next write of that
    key is refused, it steps down, and the other's value stays stored."""
    leader = start_orchestrator(settings(make_settings))
    fleet.add("primary")
    healthy(event_log, "primary")
    maintenance(fleet, "primary", True, "rack move")
    settings_kv = settings_store(bus, prefix)
    newer = MaintenanceRecord(reason="the newer leader's", since=datetime.now(UTC))
    settings_kv.put("maintenance.primary", newer)

    body = msgspec.json.encode({"gateway_id": "primary", "enabled": False})
    error = fleet.raw_call("maintenance", body)["error"]
    assert error["code"] == "unavailable"
    assert error["retry_after_ms"]
    assert not leader.lease.still_leader()
    assert settings_kv.get("maintenance.primary", MaintenanceRecord) == newer


def test_a_maintenance_write_of_an_earlier_tenure_refused_late_leaves_the_present_one_leading(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    """A maintenance write is held on its way while this replica steps down and leads
    again; another writer stores the key meanwhile, so the write comes back refused. It
    was the earlier tenure's: the request is answered `unavailable`, and the present
    tenure leads on."""
    leader = start_orchestrator(settings(make_settings, cluster={"lease_ms": 2000}))
    fleet.add("primary")
    healthy(event_log, "primary")
    held = hold_settings_key("maintenance.primary")
    held.hold()
    body = msgspec.json.encode({"gateway_id": "primary", "enabled": True, "reason": "rack"})
    asked = bus.submit(bus.nc.request(f"{prefix}.api.maintenance", body, timeout=30))
    assert held.waiting.wait(5)
    epoch = lead_again(leader.lease)
    settings_kv = settings_store(bus, prefix)
    newer = MaintenanceRecord(reason="another writer's", since=datetime.now(UTC))
    settings_kv.put("maintenance.primary", newer)

    bus.run(held.release())
    error = msgspec.json.decode(asked.result(10).data)["error"]
    assert error["code"] == "unavailable"
    assert leader.lease.still_leader()
    assert leader.lease.view.epoch == epoch
    assert settings_kv.get("maintenance.primary", MaintenanceRecord) == newer
