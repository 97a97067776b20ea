"""Two gatefleet replicas on one NATS server and prefix (issue 16): one leads, the other
stands by; writes reach the leader wherever they arrive; a failure is acted on and
recorded once; a clean stop hands the lease over at once; the standby takes its probe
latencies from the leader, which alone pings."""

from __future__ import annotations

import itertools
import queue
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from actors.load_balancer import LoadBalancerActor
from actors.messages import Request
from bus.probes import Prober
from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.client import GatefleetClient
from schemas import endpoints as api
from schemas.api import (
    DistributeRequest,
    ErrorReply,
    GatewaySnapshot,
    GatewaysReply,
    GatewaysRequest,
    StatusReply,
)
from schemas.codec import decode, encode
from schemas.events import (
    DistributionEvent,
    Failback,
    Failover,
    OrchestratorLeader,
    OrchestratorStarted,
)
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet
from tests.test_ha import FALL, Redirects, add_pair, ha_settings, healthy

PROBING = {"probe_interval_ms": 200, "probe_timeout_ms": 200}


def pushed(fleet: Fleet, gateway_id: str) -> list[int]:
    """The versions of the pushes a gateway received, in order."""
    return [push.version for _, push in fleet.agents[gateway_id].received]


def replica_settings(
    make_settings: SettingsFactory,
    tmp_path: Path,
    replica_id: str,
    health: dict[str, int] | None = None,
    **orchestrator: Any,
) -> Settings:
    base = msgspec.to_builtins(ha_settings(make_settings))
    base["bus"]["data_dir"] = str(tmp_path / replica_id)
    base["cluster"] = {"replica_id": replica_id, "lease_ms": 5000}
    base["health"] |= health or {}
    base["orchestrator"].update(orchestrator)
    return msgspec.convert(base, Settings)


@pytest.fixture(params=[{}])
def replicas(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    tmp_path: Path,
    event_log: EventLog,
    request: pytest.FixtureRequest,
) -> tuple[Orchestrator, Orchestrator]:
    """Replica "a" starts first and leads; "b" joins as a standby (the event log is
    listening from before). Parametrized indirectly: health settings for both."""
    health: dict[str, int] = request.param
    first = start_orchestrator(replica_settings(make_settings, tmp_path, "a", health))
    second = start_orchestrator(replica_settings(make_settings, tmp_path, "b", health))
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
    add_pair(fleet, event_log)
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
    # ... and serving nothing more: alive, with its keeper gone, it would answer every
    # request the queue group gives it `unavailable` for good (it never learns who leads).
    a.stop()
    # Until b has waited out a's lease (5 s) it answers unavailable, with retry_after_ms:
    # the client asks again, and the write is done once.
    with GatefleetClient(nats_server.url, prefix=prefix, timeout=10.0) as client:
        reply = client.distribute("Route", {"routes": ["/v1"]}, ["primary"])
        assert b.lease.still_leader()
        wait_until(
            lambda: client.get_distribution(reply.distribution_id).status == "completed",
            what="the distribution completed",
        )
    assert len(pushed(fleet, "primary")) == 1


class Direct:
    """`gateways` asked of one replica's load balancer itself (the queue group would pick
    either replica), answered on one subscription of the test's."""

    def __init__(self, bus: Bus) -> None:
        self.base = f"_INBOX.replicas-test.{uuid.uuid4().hex}"
        self._replies: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._count = itertools.count()
        bus.subscribe(f"{self.base}.*", self._replies.put)

    def gateway(self, replica: Orchestrator, gateway_id: str) -> GatewaySnapshot | None:
        [load_balancer] = [r for r in replica._actors if r.actor_class is LoadBalancerActor]
        reply = f"{self.base}.{next(self._count)}"
        load_balancer.tell(Request(endpoint=api.GATEWAYS, body=GatewaysRequest(), reply=reply))
        answer = self._replies.get(timeout=5.0)
        assert answer.subject == reply
        rows = decode(answer.data, GatewaysReply).gateways
        return next((row for row in rows if row.gateway_id == gateway_id), None)

    def probe_latency(self, replica: Orchestrator, gateway_id: str) -> float | None:
        row = self.gateway(replica, gateway_id)
        return None if row is None else row.probe_latency_ms


@pytest.fixture
def direct(bus: Bus) -> Direct:
    return Direct(bus)


def prober_of(replica: Orchestrator) -> Prober:
    assert replica.runtime is not None
    assert replica.runtime.prober is not None
    return replica.runtime.prober


@pytest.mark.parametrize("replicas", [PROBING], indirect=True)
def test_the_standby_takes_probe_latencies_from_the_leader_which_alone_pings(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    direct: Direct,
) -> None:
    a, b = replicas
    agent = fleet.add("primary", "us-west")
    healthy(event_log, "primary")
    agent.pong_delay_s = 0.05  # from ~1 ms: the smoothed latency climbs towards 50

    def latencies() -> tuple[float | None, float | None]:
        return direct.probe_latency(a, "primary"), direct.probe_latency(b, "primary")

    wait_until(
        lambda: (direct.probe_latency(b, "primary") or 0.0) >= 45,
        what="the standby has the slow pongs' latency",
        show=latencies,
    )
    at_a, at_b = latencies()
    assert at_a is not None
    assert at_b is not None
    assert abs(at_a - at_b) < 10  # the same results, applied at most ~100 ms apart

    # Once per interval: over the next ten results the standby applied, the gateway was
    # pinged about ten times (twenty, were both replicas pinging).
    standby = prober_of(b)
    pings, applied = agent.pings, standby.stats().from_leader
    wait_until(lambda: standby.stats().from_leader >= applied + 10, what="ten more results")
    assert agent.pings - pings <= standby.stats().from_leader - applied + 3
    assert standby.stats().sent == 0
    assert prober_of(a).stats().shared >= standby.stats().from_leader


@pytest.mark.parametrize("replicas", [PROBING], indirect=True)
def test_after_a_hand_over_the_new_leader_probes_and_shares_its_results(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    direct: Direct,
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    tmp_path: Path,
) -> None:
    a, b = replicas
    agent = fleet.add("primary", "us-west")
    healthy(event_log, "primary")
    standby = prober_of(b)
    wait_until(lambda: standby.stats().from_leader >= 2, what="b applies a's results")
    assert standby.stats().sent == 0

    a.stop()
    wait_until(b.lease.still_leader, timeout=3.0, what="b leads")
    pings, answered = agent.pings, standby.stats().answered
    wait_until(
        lambda: standby.stats().answered >= answered + 3 and agent.pings >= pings + 3,
        what="b probes the gateway itself",
        show=standby.stats,
    )

    c = start_orchestrator(replica_settings(make_settings, tmp_path, "c", PROBING))
    joined = prober_of(c)
    wait_until(
        lambda: joined.stats().from_leader >= 3 and direct.probe_latency(c, "primary") is not None,
        what="c, a new standby, takes b's results",
        show=joined.stats,
    )
    assert joined.stats().sent == 0


def in_maintenance_at(bus: Bus, prefix: str, replica_id: str) -> int | None:
    """`gateways_in_maintenance` if `replica_id` answered a status (the queue group picks
    one), else None."""
    status = decode(bus.ask(f"{prefix}.api.status", b"{}", 5.0), StatusReply)
    return status.gateways_in_maintenance if status.replica_id == replica_id else None


def test_maintenance_reaches_the_standby_within_a_second_and_so_does_its_end(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    client: GatefleetClient,
    bus: Bus,
    prefix: str,
    direct: Direct,
) -> None:
    _, b = replicas
    for gateway_id in ("primary", "backup"):
        fleet.add(gateway_id, "us-west")
    healthy(event_log, "primary", "backup")

    def at_b() -> tuple[str, bool, str | None] | None:
        row = direct.gateway(b, "primary")
        return None if row is None else (row.status, row.maintenance, row.maintenance_reason)

    wait_until(lambda: at_b() == ("healthy", False, None), what="b sees primary healthy")
    redirects = Redirects(bus, prefix)

    client.set_maintenance("primary", True, "rack move")  # stored by the leader
    wait_until(
        lambda: (
            at_b() == ("healthy", True, "rack move") and in_maintenance_at(bus, prefix, "b") == 1
        ),
        timeout=1.0,
        what="the standby has primary in maintenance",
        show=at_b,
    )
    client.set_maintenance("primary", False)
    wait_until(  # after `rise` (2) good heartbeats, 100 ms apart
        lambda: at_b() == ("healthy", False, None) and in_maintenance_at(bus, prefix, "b") == 0,
        timeout=1.0,
        what="the standby has primary back in service",
        show=at_b,
    )
    # Both replicas planned the move and its return; the leader alone told the clients.
    event_log.wait_for(lambda e: isinstance(e, Failback))
    in_maintenance_at(bus, prefix, "b")  # one more round trip: anything sent has arrived
    assert [notice["to"] for _, notice, _ in redirects.notices] == ["backup", "primary"]


def test_each_replica_records_its_own_selections_and_replay_counts_them_apart(
    replicas: tuple[Orchestrator, Orchestrator],
    fleet: Fleet,
    client: GatefleetClient,
    tmp_path: Path,
    prefix: str,
    nats_server: EmbeddedServer,
) -> None:
    for gateway_id in ("edge-1", "edge-2"):
        fleet.add(gateway_id, "us-west")
    runs: dict[str, str] = {}  # run -> a selection id it made
    made = 0

    def both_select() -> bool:
        nonlocal made
        reply = client.select_optimal_gateway()
        made += 1
        if reply.gateway_id is not None and reply.selection_id is not None:
            runs.setdefault(reply.selection_id.rsplit("-", 1)[0], reply.selection_id)
        return len(runs) == 2

    wait_until(both_select, what="both replicas chose a gateway")
    config = tmp_path / "client.toml"
    config.write_text(f'[bus]\nurl = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n')

    def replayed() -> dict[str, dict[str, int]]:
        args = ["audit", "replay", "--json", "--config", str(config)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        answer = msgspec.json.decode(result.stdout_bytes)
        assert answer["reproduced"] == answer["selections"]
        counts: dict[str, dict[str, int]] = answer["replicas"]
        return counts if sum(c["selections"] for c in counts.values()) == made else {}

    wait_until(lambda: bool(replayed()), what="every selection stored")
    counts = replayed()
    assert set(counts) == {"a", "b"}
    assert all(c["reproduced"] == c["selections"] > 0 for c in counts.values())
    explained = set()
    for selection_id in runs.values():
        args = ["audit", "explain", "--json", "--config", str(config), selection_id]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        explained.add(msgspec.json.decode(result.stdout_bytes)["replica_id"])
    assert explained == {"a", "b"}


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
