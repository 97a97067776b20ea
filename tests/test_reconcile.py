"""Configuration consistency: gateways whose reported config versions are behind their
desired ones are pushed the desired version again (level-triggered reconciliation), never
racing a distribution, never re-pushing a version they rejected unless asked
(`P.api.reconcile`); and a DistributionActor that dies is restarted from its record.

A real nats-server, the orchestrator at a 100 ms heartbeat interval and GatewayAgents;
tests wait on events and replies (heartbeats counted as they arrive), never on bare
sleeps. The pure rules (actors/reconciliation.py) are tested first, without threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pykka
import pytest

from actors.base import CRASH
from actors.distribution import DistributionActor
from actors.reconciliation import Desired, Reconciler, Resync, Skip
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from gatefleet.gateway import ConfigResult, GatewayAgent
from schemas.api import GatewaySnapshot, ReconcileReply, ReconcileRequest
from schemas.events import GatewayDown, Reconciliation
from schemas.settings import Settings
from schemas.wire import ConfigPush
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.distribution_events import finished, steps
from tests.fleet import ArrivalClock, Fleet

HEARTBEAT_MS = 100
FAST = {
    "distribution_batch_size": 3,
    "distribution_retry_count": 2,
    "distribution_ack_timeout_ms": 250,
    "distribution_retry_delay_ms": 100,
}
ROUTE = {"routes": [{"path": "/api", "upstream": "svc-a"}]}
ROUTE_V2 = {"routes": [{"path": "/api", "upstream": "svc-b"}]}

# The rules, without threads -----------------------------------------------------------------

T0 = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
V1, V2 = Desired(1, "dist-1"), Desired(2, "dist-2")


def snapshot(status: str = "healthy", at: int = 0, **versions: int) -> GatewaySnapshot:
    return GatewaySnapshot(
        gateway_id="gw",
        region="eu-west",
        status=status,  # type: ignore[arg-type]
        last_seen=T0 + timedelta(seconds=at),
        config_versions=versions,
    )


def pushes(decision: object) -> bool:
    return isinstance(decision, Resync) and decision.push


def check(reconciler: Reconciler, *, busy: str | None = None, now: float = 0.0) -> Any:
    return reconciler.check("gw", "Route", busy=busy, now=now)


def test_rules_desired_running_and_busy() -> None:
    r = Reconciler(cooldown_s=1.0)
    r.on_gateway(snapshot(Route=1))
    assert check(r) == Skip("no desired version of Route")
    r.set_desired("Route", None, V1)
    r.set_desired("Route", "gw", V2)  # a targeted distribution gave it a newer one
    r.set_desired("Route", "other", Desired(3, "dist-3"))
    assert r.desired("gw", "Route") == V2
    assert check(r) == Resync("gw", "Route", V2, 1, "reported 1, desired 2", push=True)
    assert check(r, busy="distribution dist-2 targets it") == Skip("distribution dist-2 targets it")
    # An ack that reached the distributor after the last heartbeat: it runs version 2.
    r.on_outcome("gw", "Route", 2, "acked", at=T0 + timedelta(seconds=1), now=0.0)
    assert check(r) == Skip("in sync: runs version 2, desired 2")
    r.on_gateway(snapshot(at=2, Route=2))
    assert check(r) == Skip("in sync: runs version 2, desired 2")
    # Restarted from an older disk: a heartbeat received after the ack wins.
    r.on_gateway(snapshot(at=3, Route=1))
    assert pushes(check(r))
    r.on_gateway(snapshot("down", at=4, Route=1))
    assert check(r) == Skip("gateway is down")


def test_rules_a_gateway_in_maintenance_is_not_reconciled() -> None:
    r = Reconciler(cooldown_s=1.0)
    r.set_desired("Route", None, V2)
    drained = snapshot(Route=1)
    r.on_gateway(GatewaySnapshot(**{**msgspec.structs.asdict(drained), "maintenance": True}))
    assert check(r) == Skip("gateway in maintenance")
    r.on_gateway(drained)  # back in service
    assert pushes(check(r))


def test_rules_a_rejected_version_is_reported_once_and_pushed_only_on_request() -> None:
    r = Reconciler(cooldown_s=1.0)
    r.set_desired("Route", None, V1)
    r.on_gateway(snapshot())
    r.on_outcome("gw", "Route", 1, "nacked", at=T0, now=0.0)
    assert check(r) == Resync(
        "gw", "Route", V1, None, "out of sync: rejected version 1", push=False
    )
    assert check(r) == Skip("out of sync: rejected version 1")
    assert pushes(r.check("gw", "Route", busy=None, now=0.0, force=True))
    r.set_desired("Route", None, V2)  # a newer version is pushed as usual
    assert pushes(check(r))
    r.set_desired("Route", None, V1)
    r.on_outcome("gw", "Route", 1, "acked", at=T0, now=0.0)  # accepted when forced
    r.on_gateway(snapshot(at=1))  # then restarted with nothing
    assert pushes(check(r))


def test_rules_timeouts_cool_down_doubling_until_back_from_down() -> None:
    r = Reconciler(cooldown_s=1.0, max_cooldown_s=3.0)
    r.set_desired("Route", None, V1)
    r.on_gateway(snapshot())
    delays = [r.on_outcome("gw", "Route", 1, "timed_out", at=T0, now=0.0) for _ in range(3)]
    assert delays == [1.0, 2.0, 3.0]
    assert check(r, now=2.9) == Skip("cooling down after 3 timed-out pushes")
    assert pushes(check(r, now=3.0))
    r.on_outcome("gw", "Route", 1, "timed_out", at=T0, now=0.0)
    r.on_gateway(snapshot("down"))
    r.on_gateway(snapshot("healthy"))  # back: tried at once
    assert pushes(check(r))


# Against the orchestrator ---------------------------------------------------------------------


class Gateways(Fleet):
    """Agents beating every 100 ms, recording what they applied, rejecting on demand."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        super().__init__(bus, prefix)
        self.applied: dict[str, list[ConfigPush]] = {}
        self.reject: set[str] = set()

    def join(self, gateway_id: str, **kwargs: Any) -> GatewayAgent:
        self.applied.setdefault(gateway_id, [])

        def apply(push: ConfigPush) -> ConfigResult | None:
            self.applied[gateway_id].append(push)
            if gateway_id in self.reject:
                return ConfigResult.reject(f"{gateway_id} cannot route to svc-a")
            return None

        return self.add(
            gateway_id, "eu-west", interval_s=HEARTBEAT_MS / 1000, on_config=apply, **kwargs
        )

    def reconcile(self, gateway_id: str, config_type: str | None = None) -> ReconcileReply:
        request = ReconcileRequest(gateway_id=gateway_id, config_type=config_type)
        return self.call("reconcile", request, ReconcileReply)

    def sees(self, gateway_id: str, versions: dict[str, int]) -> None:
        """Waits until the orchestrator's view of the gateway reports these versions."""
        wait_until(
            lambda: self.gateways()[gateway_id].config_versions == versions,
            what=f"{gateway_id} reporting {versions}",
            show=lambda: self.gateways()[gateway_id].config_versions,
        )


@pytest.fixture
def gateways(bus: Bus, prefix: str) -> Iterator[Gateways]:
    fleet = Gateways(bus, prefix)
    yield fleet
    fleet.close()


@pytest.fixture
def run(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
) -> Callable[..., Orchestrator]:
    """Starts an orchestrator (FAST timings, overridable), then waits for the fleet."""

    def start(**orchestrator: Any) -> Orchestrator:
        settings = make_settings(
            orchestrator={**FAST, **orchestrator}, health={"heartbeat_interval_ms": HEARTBEAT_MS}
        )
        started = start_orchestrator(settings)
        wait_until(
            lambda: client.status().gateways_healthy == len(gateways.agents),
            what=f"{len(gateways.agents)} healthy gateways",
        )
        return started

    return start


def reconciliation(
    event_log: EventLog, gateway_id: str, *, pushed: bool = True, since: int = 0
) -> Reconciliation:
    """The next `ha.reconcile` event for this gateway: a push, or (pushed=False) a report."""
    event = event_log.wait_for(
        lambda e: (
            isinstance(e, Reconciliation)
            and e.gateway_id == gateway_id
            and (e.distribution_id is not None) == pushed
        ),
        since=since,
    )
    assert isinstance(event, Reconciliation)
    return event


def reconciliations(event_log: EventLog, gateway_id: str) -> list[Reconciliation]:
    return [e for e in event_log.of_type(Reconciliation) if e.gateway_id == gateway_id]


def heartbeats_pass(bus: Bus, prefix: str, gateway_id: str, count: int = 5) -> None:
    """Waits for `count` more heartbeats of the gateway: as many chances to act on them."""
    beats = ArrivalClock(bus, f"{prefix}.gw.{gateway_id}.heartbeat")
    wait_until(lambda: beats.count >= count, what=f"{count} heartbeats of {gateway_id}")


def test_a_gateway_that_joins_later_gets_the_desired_version(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    first = gateways.join("gw-1")
    run()
    dist_id = client.distribute("Route", ROUTE).distribution_id
    finished(event_log, dist_id)

    late = gateways.join("gw-2")
    event = reconciliation(event_log, "gw-2")
    assert (event.config_type, event.desired_version, event.reported_version) == ("Route", 1, None)
    assert event.reason == "reported nothing, desired 1"
    assert finished(event_log, event.distribution_id).details["status"] == "completed"
    assert event.distribution_id is not None
    record = client.get_distribution(event.distribution_id)
    assert (record.origin, record.version, record.target_gateways) == ("reconcile", 1, ["gw-2"])
    assert late.config_versions == {"Route": 1}

    # Its heartbeats now report version 1: nothing more is pushed to anyone.
    gateways.sees("gw-2", {"Route": 1})
    heartbeats_pass(bus, prefix, "gw-2")
    [(_, push)] = late.received
    assert (push.distribution_id, push.version, push.config_data) == (record.id, 1, ROUTE)
    assert len(first.received) == 1
    assert reconciliations(event_log, "gw-2") == [event]
    assert client.get_distribution(dist_id).origin == "distribute"
    # No version was taken: the next distribution is version 2.
    again = client.distribute("Route", ROUTE_V2).distribution_id
    assert client.get_distribution(again).version == 2
    finished(event_log, again)


def test_a_gateway_back_on_an_older_version_is_reconciled(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    agent = gateways.join("gw-1")
    run()
    for data in (ROUTE, ROUTE_V2):
        finished(event_log, client.distribute("Route", data).distribution_id)
    assert agent.config_versions == {"Route": 2}

    mark = event_log.mark()
    gateways.stop("gw-1", goodbye=False)  # it crashes...
    event_log.wait_for(lambda e: isinstance(e, GatewayDown), since=mark)
    back = gateways.join("gw-1", config_versions={"Route": 1})  # ...restarts on an old disk

    event = reconciliation(event_log, "gw-1", since=mark)
    assert (event.desired_version, event.reported_version) == (2, 1)
    assert event.reason == "reported 1, desired 2"
    assert finished(event_log, event.distribution_id).details["status"] == "completed"
    assert back.config_versions == {"Route": 2}
    [(_, push)] = back.received
    assert (push.version, push.config_data) == (2, ROUTE_V2)


def test_a_rejected_version_is_not_pushed_again_until_asked(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    gateways.join("good")
    picky = gateways.join("picky")
    gateways.reject.add("picky")
    run()
    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["status"] == "partially_failed"

    report = reconciliation(event_log, "picky", pushed=False)
    assert report.reason == "out of sync: rejected version 1"
    assert (report.desired_version, report.reported_version) == (1, None)
    # Its reported versions change (each change is a check): still not pushed.
    picky.config_versions["Tls"] = 1
    gateways.sees("picky", {"Tls": 1})
    heartbeats_pass(bus, prefix, "picky")
    assert len(picky.received) == 1
    assert reconciliations(event_log, "picky") == [report]

    # The operator asks; this time it accepts.
    gateways.reject.discard("picky")
    reply = gateways.reconcile("picky", "Route")
    [forced] = reply.distributions
    assert reply.skipped == {}
    assert finished(event_log, forced).details["status"] == "completed"
    assert picky.config_versions == {"Route": 1, "Tls": 1}
    event = reconciliation(event_log, "picky")
    assert (event.distribution_id, event.reason) == (
        forced,
        "operator request: reported nothing, desired 1",
    )
    assert len(picky.received) == 2

    in_sync = gateways.reconcile("good")
    assert in_sync == ReconcileReply(
        distributions=[], skipped={"Route": "in sync: runs version 1, desired 1"}
    )
    ghost = gateways.raw_call("reconcile", b'{"gateway_id": "ghost"}')
    assert ghost["error"]["code"] == "not_found"
    no_tls = gateways.raw_call("reconcile", b'{"gateway_id": "good", "config_type": "Tls"}')
    assert no_tls["error"]["code"] == "not_found"
    bad = gateways.raw_call("reconcile", b'{"gateway_id": "a.b"}')
    assert bad["error"]["code"] == "bad_request"


def test_what_a_gateway_rejected_is_remembered_across_a_restart(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    picky = gateways.join("picky")
    gateways.reject.add("picky")
    orchestrator = run()
    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["status"] == "failed"
    reconciliation(event_log, "picky", pushed=False)

    orchestrator.stop()
    mark = event_log.mark()
    run()  # a new process on the same buckets
    report = reconciliation(event_log, "picky", pushed=False, since=mark)
    assert report.reason == "out of sync: rejected version 1"
    heartbeats_pass(bus, prefix, "picky")
    assert len(picky.received) == 1


def test_no_reconciliation_while_a_distribution_runs_for_the_gateway(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    slow = gateways.join("gw-1")
    slow.silent_config = True  # its first attempt goes unanswered: the distribution runs on
    run(distribution_ack_timeout_ms=1500)
    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: len(slow.received) == 1, what="the first push")

    # Desired is version 1 and it reports nothing: a change makes the distributor check it.
    slow.config_versions["Tls"] = 1
    gateways.sees("gw-1", {"Tls": 1})
    heartbeats_pass(bus, prefix, "gw-1", count=3)
    assert [d.id for d in client.list_distributions().distributions] == [dist_id]
    assert client.get_distribution(dist_id).status == "in_progress"

    slow.silent_config = False
    assert finished(event_log, dist_id).details["status"] == "completed"
    assert client.get_distribution(dist_id).gateways["gw-1"].attempts == 2
    # Acked before its heartbeats say so: in sync, nothing to reconcile then either.
    gateways.sees("gw-1", {"Route": 1, "Tls": 1})
    heartbeats_pass(bus, prefix, "gw-1", count=3)
    assert reconciliations(event_log, "gw-1") == []
    assert {push.distribution_id for _, push in slow.received} == {dist_id}


def test_ha_disabled_means_no_automatic_reconciliation(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    gateways.join("gw-1")
    run(ha_enabled=False)
    finished(event_log, client.distribute("Route", ROUTE).distribution_id)

    late = gateways.join("gw-2")
    wait_until(lambda: client.status().gateways_healthy == 2, what="gw-2 healthy")
    heartbeats_pass(bus, prefix, "gw-2")
    assert len(late.received) == 0
    assert event_log.of_type(Reconciliation) == []
    assert client.status().ha_enabled is False

    # An operator's request still works.
    [dist_id] = gateways.reconcile("gw-2").distributions
    assert finished(event_log, dist_id).details["status"] == "completed"
    assert late.config_versions == {"Route": 1}


def test_a_crashed_distribution_actor_is_restarted_and_finishes(
    run: Callable[..., Orchestrator],
    gateways: Gateways,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    agents = [gateways.join(f"gw-{n}") for n in (1, 2, 3)]
    agents[1].ack_delay_s = 0.5  # gw-2 applies at once and acks late
    run(distribution_ack_timeout_ms=2000)
    dist_id = client.distribute("Route", ROUTE).distribution_id

    def acked() -> set[str | None]:
        return {e.gateway_id for e in steps(event_log, dist_id, "gateway_acked")}

    wait_until(lambda: acked() == {"gw-1", "gw-3"}, what="gw-1 and gw-3 acked", show=acked)
    wait_until(lambda: len(gateways.applied["gw-2"]) == 1, what="gw-2 applied")

    [actor] = pykka.ActorRegistry.get_by_class(DistributionActor)
    actor.tell(CRASH)
    assert finished(event_log, dist_id).details["status"] == "completed"
    [resumed] = steps(event_log, dist_id, "resumed")
    assert resumed.details["resent"] == ["gw-2"]  # resumed from the newest record

    record = client.get_distribution(dist_id)
    assert sorted(record.successful_gateways) == ["gw-1", "gw-2", "gw-3"]
    assert {gw: len(applied) for gw, applied in gateways.applied.items()} == dict.fromkeys(
        gateways.agents, 1
    )
    assert [push.attempt for _, push in agents[1].received] == [1, 1]  # re-sent, same attempt
    assert client.status().actor_restarts == 1
    wait_until(
        lambda: not pykka.ActorRegistry.get_by_class(DistributionActor),
        what="the restarted actor stopped once finished",
    )
