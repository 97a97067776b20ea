"""Two gatefleet replicas on one NATS server and prefix (issue 16): one leads, the other
stands by; writes reach the leader wherever they arrive; a failure is acted on and
recorded once; a clean stop hands the lease over at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from bus.runtime import Bus
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.client import GatefleetClient
from schemas.api import DistributeRequest, ErrorReply, StatusReply
from schemas.codec import decode, encode
from schemas.events import DistributionEvent, Failover, OrchestratorLeader, OrchestratorStarted
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet
from tests.test_ha import FALL, Redirects, ha_settings, healthy


def pushed(fleet: Fleet, gateway_id: str) -> list[int]:
    """The versions of the pushes a gateway received, in order."""
    return [push.version for _, push in fleet.agents[gateway_id].received]


def replica_settings(
    make_settings: SettingsFactory, tmp_path: Path, replica_id: str, **orchestrator: Any
) -> Settings:
    base = msgspec.to_builtins(ha_settings(make_settings))
    base["bus"]["data_dir"] = str(tmp_path / replica_id)
    base["cluster"] = {"replica_id": replica_id, "lease_ms": 5000}
    base["orchestrator"].update(orchestrator)
    return msgspec.convert(base, Settings)


@pytest.fixture
def replicas(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    tmp_path: Path,
    event_log: EventLog,
) -> tuple[Orchestrator, Orchestrator]:
    """Replica "a" starts first and leads; "b" joins as a standby (the event log is
    listening from before)."""
    first = start_orchestrator(replica_settings(make_settings, tmp_path, "a"))
    second = start_orchestrator(replica_settings(make_settings, tmp_path, "b"))
    wait_until(lambda: second.lease.view.leader == "a", what="b knows that a leads")
    return first, second


def test_one_leads_the_other_stands_by_and_both_say_so(
    replicas: tuple[Orchestrator, Orchestrator], event_log: EventLog
) -> None:
    a, b = replicas
    assert a.lease.still_leader()
    assert not b.lease.still_leader()
    assert (a.lease.view.role, b.lease.view.role) == ("leader", "standby")
    assert a.lease.view.epoch == b.lease.view.epoch
    starts = {e.replica_id: (e.role, e.leader) for e in event_log.of_type(OrchestratorStarted)}
    assert starts == {"a": ("leader", "a"), "b": ("standby", "a")}


def test_status_names_the_replica_that_answered_and_the_leader(
    replicas: tuple[Orchestrator, Orchestrator], bus: Bus, prefix: str
) -> None:
    answered = set()
    for _ in range(40):  # the queue group spreads requests over both replicas
        status = decode(bus.ask(f"{prefix}.api.status", b"{}", 5.0), StatusReply)
        assert status.leader == "a"
        assert status.role == ("leader" if status.replica_id == "a" else "standby")
        answered.add(status.replica_id)
        if answered == {"a", "b"}:
            break
    assert answered == {"a", "b"}


def test_a_write_reaching_the_standby_is_forwarded_to_the_leader(
    replicas: tuple[Orchestrator, Orchestrator], fleet: Fleet, client: GatefleetClient
) -> None:
    fleet.add("primary", "us-west")
    reply = client.distribute("Route", {"routes": ["/v1"]}, ["primary"])
    wait_until(
        lambda: client.get_distribution(reply.distribution_id).status == "completed",
        what="the distribution completed",
    )
    version = client.get_distribution(reply.distribution_id).version
    assert pushed(fleet, "primary") == [version]  # once: one replica pushed it


def test_the_standby_own_subject_refuses_while_it_does_not_lead(
    replicas: tuple[Orchestrator, Orchestrator], bus: Bus, prefix: str
) -> None:
    body = encode(DistributeRequest(config_type="Route", config_data={}))
    answer = decode(bus.ask(f"{prefix}.replica.b.api.distribute", body, 5.0), ErrorReply)
    assert answer.error.code == "unavailable"
    assert answer.error.retry_after_ms


def test_a_failure_is_redirected_and_recorded_once_with_two_replicas(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    bus: Bus,
    prefix: str,
    event_log: EventLog,
) -> None:
    for gateway_id, region in (("primary", "us-west"), ("backup", "us-west"), ("other", "eu-west")):
        fleet.add(gateway_id, region)
    healthy(event_log, "primary", "backup", "other")
    redirects = Redirects(bus, prefix)
    fleet.agents["primary"].pause_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, Failover))
    # The standby too has seen it go down (and would have redirected in the same turn).
    wait_until(lambda: sees_down(bus, prefix, "b"), what="the standby sees primary down")
    sees_down(bus, prefix, "b")  # one more round trip: anything it sent has arrived
    assert len(event_log.of_type(Failover)) == 1
    assert [notice for _, notice, _ in redirects.notices] == [
        {"from": "primary", "to": "backup", "reason": "backup of primary"}
    ]


def sees_down(bus: Bus, prefix: str, replica_id: str) -> bool:
    """Whether `replica_id` answered a status (the queue group picks one) counting a
    gateway down."""
    status = decode(bus.ask(f"{prefix}.api.status", b"{}", 5.0), StatusReply)
    return status.replica_id == replica_id and status.gateways_by_status.get("down", 0) >= 1


def test_a_clean_stop_of_the_leader_hands_over_at_once_and_distributions_go_on(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    a, b = replicas
    fleet.add("primary", "us-west")
    first = client.distribute("Route", {"routes": ["/v1"]}, ["primary"])
    wait_until(
        lambda: client.get_distribution(first.distribution_id).status == "completed",
        what="the first distribution completed",
    )
    old_epoch = a.lease.view.epoch
    assert old_epoch is not None
    a.stop()
    # Released, not waited out (lease_ms is 5 s): within a second or so.
    wait_until(b.lease.still_leader, timeout=3.0, what="b leads")
    event_log.wait_for(
        lambda e: isinstance(e, OrchestratorLeader) and e.replica_id == "b" and e.role == "leader"
    )
    new_epoch = b.lease.view.epoch
    assert new_epoch is not None
    assert new_epoch > old_epoch
    second = client.distribute("Route", {"routes": ["/v2"]}, ["primary"])
    wait_until(
        lambda: client.get_distribution(second.distribution_id).status == "completed",
        what="the second distribution completed",
        show=lambda: client.get_distribution(second.distribution_id),
    )
    versions = [client.get_distribution(d.distribution_id).version for d in (first, second)]
    assert versions[1] == versions[0] + 1  # b continues the stored counter
    assert pushed(fleet, "primary") == versions
    steps = [
        e
        for e in event_log.of_type(DistributionEvent)
        if e.distribution_id == first.distribution_id
    ]
    assert len({(e.step, e.gateway_id) for e in steps}) == len(steps)  # each fact once


def test_gatefleet_replicas_lists_each_replica_with_its_role(
    replicas: tuple[Orchestrator, Orchestrator],
    client: GatefleetClient,
    tmp_path: Path,
    prefix: str,
    nats_server: EmbeddedServer,
) -> None:
    a, _ = replicas
    found = client.replicas()
    assert [(r.replica_id, r.role, r.leader) for r in found] == [
        ("a", "leader", "a"),
        ("b", "standby", "a"),
    ]
    assert {r.epoch for r in found} == {a.lease.view.epoch}
    assert found[0].lease_renewed_at is not None

    config = tmp_path / "client.toml"
    config.write_text(f'[bus]\nurl = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n')
    result = CliRunner().invoke(main, ["replicas", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    listed = msgspec.json.decode(result.output)
    assert [(r["replica_id"], r["role"]) for r in listed] == [("a", "leader"), ("b", "standby")]
    human = CliRunner().invoke(main, ["replicas", "--config", str(config)])
    assert human.exit_code == 0
    assert "2 replicas" in human.output


def test_a_settings_change_reaches_the_standby_within_a_second(
    replicas: tuple[Orchestrator, Orchestrator], client: GatefleetClient, bus: Bus, prefix: str
) -> None:
    client.update_load_balancing_config("LatencyBased", 55.0)  # stored by the leader
    wait_until(
        lambda: settings_at(bus, prefix, "b") == ("LatencyBased", 55.0),
        timeout=1.0,
        what="the standby's load balancer has the new settings",
    )


def settings_at(bus: Bus, prefix: str, replica_id: str) -> tuple[str, float] | None:
    """The settings in force at `replica_id` if it answered a status (the queue group
    picks one), else None."""
    status = decode(bus.ask(f"{prefix}.api.status", b"{}", 5.0), StatusReply)
    if status.replica_id != replica_id:
        return None
    return status.load_balancing_strategy, status.health_check_threshold


def test_a_replica_whose_deciding_settings_differ_says_which_at_start(
    replicas: tuple[Orchestrator, Orchestrator],
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = msgspec.to_builtins(ha_settings(make_settings))
    base["bus"]["data_dir"] = str(tmp_path / "c")
    base["cluster"] = {"replica_id": "c"}
    base["health"]["fall"] = FALL + 2
    base["orchestrator"]["load_balancing_strategy"] = "RoundRobin"
    start_orchestrator(msgspec.convert(base, Settings))
    [line] = [r.getMessage() for r in caplog.records if "differ from the leader" in r.getMessage()]
    assert "leader a's in 2 keys" in line
    assert f"health.fall: {FALL + 2} here, {FALL} at the leader" in line
    assert 'orchestrator.load_balancing_strategy: "RoundRobin" here, "RegionAware"' in line


def test_a_write_while_no_replica_leads_is_retried_by_the_client_until_one_does(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    nats_server: EmbeddedServer,
    prefix: str,
) -> None:
    a, b = replicas
    fleet.add("primary", "us-west")
    keeper = a._lease_keeper  # "a" dies as a leader dies: renewing no more, releasing nothing
    assert keeper is not None
    keeper.stop(release=False)
    a.lease.step_down()
    # Until b has waited out a's lease (5 s) every replica answers unavailable, with
    # retry_after_ms: the client asks again, and the write is done once.
    with GatefleetClient(nats_server.url, prefix=prefix, timeout=10.0) as client:
        reply = client.distribute("Route", {"routes": ["/v1"]}, ["primary"])
        assert b.lease.still_leader()
        wait_until(
            lambda: client.get_distribution(reply.distribution_id).status == "completed",
            what="the distribution completed",
        )
    assert len(pushed(fleet, "primary")) == 1


Counts = tuple[int, int, int, dict[str, int]]


def counts_at(bus: Bus, prefix: str, replica_id: str) -> Counts:
    """The distribution counts in `replica_id`'s status (asked until it is the one that
    answers: the queue group picks one)."""
    for _ in range(100):
        status = decode(bus.ask(f"{prefix}.api.status", b"{}", 5.0), StatusReply)
        if status.replica_id == replica_id:
            return (
                status.active_distributions,
                status.successfully_completed_distributions,
                status.failed_distributions,
                status.distributions_by_state,
            )
    raise AssertionError(f"{replica_id} answered none of 100 statuses")


def test_a_standby_counts_the_stored_distributions_as_the_leader_does(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    tmp_path: Path,
    fleet: Fleet,
    client: GatefleetClient,
    bus: Bus,
    prefix: str,
) -> None:
    """The standby's counts come from the stored records: after each distribution ends
    they equal the leader's, also once the leader deletes the oldest finished ones
    (`distribution_history` = 2), and at a replica that joins later."""

    def start(replica_id: str) -> Orchestrator:
        settings = replica_settings(make_settings, tmp_path, replica_id, distribution_history=2)
        return start_orchestrator(settings)

    start("a")
    standby = start("b")
    wait_until(lambda: standby.lease.view.leader == "a", what="b knows that a leads")
    fleet.add("primary", "us-west")
    wait_until(lambda: client.status().gateways_healthy >= 1, what="primary healthy")

    def same_counts(*replicas: str) -> bool:
        leaders = counts_at(bus, prefix, "a")
        return all(counts_at(bus, prefix, r) == leaders for r in replicas)

    def ended(dist_id: str) -> Callable[[], bool]:
        return lambda: client.get_distribution(dist_id).completed_at is not None

    for targets in (["primary"], ["primary"], ["primary"], ["ghost"]):  # ghost: unknown
        reply = client.distribute("Route", {"routes": ["/v1"]}, targets)
        wait_until(ended(reply.distribution_id), what="the distribution ended")
        wait_until(lambda: same_counts("b"), what="b counts as a does")
    start("c")
    wait_until(lambda: same_counts("b", "c"), what="c counts as a does")
    # The two newest finished are kept: the last completed, and the failed one.
    assert counts_at(bus, prefix, "b") == (0, 1, 1, {"completed": 1, "failed": 1})
