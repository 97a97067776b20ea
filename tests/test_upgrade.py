"""Upgrades keep state: a JetStream store written by an earlier release starts under this one.

`tests/data/store-0.1.0.tar.gz` is the `jetstream` directory of an embedded nats-server
that gatefleet 0.1.0 (commit 6d7094b, distributions store layout 1) ran on: gateways gw-a
and gw-b in region r1; Route v1 to every gateway (completed); Route v2 to gw-a and the
unknown "ghost" (partially failed); load balancing set to LeastConnections at 60; Acl v1
to gw-b, which never answered, so the orchestrator stopped with it in progress.

`tests/data/store-layout2.tar.gz` is the same for commit 25da961 (layout 2, one record
per distribution holding every gateway's state): gateways gw-a and gw-b in region r1;
load balancing LatencyBased at 55; Route v1 to every gateway (completed); Route v2 to gw-a
and "ghost" with request_id "deploy-7" (partially failed); Tls v1 to every gateway, which
gw-b rejected ("gw-b has no key for this certificate"); Acl v1 to gw-b, which never
answered (in progress when the orchestrator stopped), and Acl v2 to both, queued behind
it (never started: a spec and no record).

`tests/data/store-layout3.tar.gz` is the same for commit 0fedfe7 (layout 3, before
progressive delivery added optional fields to its values): gateways gw-a and gw-b in
region r1; Route v1 `{"routes": ["/v1"]}` to every gateway (completed); Acl v1 to gw-b,
which never answered (in progress when the orchestrator stopped).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from actors.distribution_store import LAYOUT_KEY
from bus.jetstream import KvStore, bucket_name
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from gatefleet.gateway import GatewayAgent
from schemas.api import GatewayDelivery, Rollout
from schemas.codec import encode
from schemas.settings import Settings
from schemas.stored import LAYOUT_VERSION, Layout
from tests.conftest import SettingsFactory, wait_until
from tests.fleet import BUSY, MutableMetrics

DATA = Path(__file__).parent / "data"


def start_on(fixture: Path, tmp_path: Path) -> Iterator[tuple[Orchestrator, Bus]]:
    data = tmp_path / "data"
    with tarfile.open(fixture) as tar:
        tar.extractall(data, filter="data")
    settings = msgspec.convert(
        {
            "bus": {"port": 0, "data_dir": str(data)},
            "health": {"probe_interval_ms": 0, "heartbeat_interval_ms": 100},
        },
        Settings,
    )
    orchestrator = Orchestrator(settings)
    orchestrator.start()
    bus = Bus(orchestrator.url, auth=orchestrator.client_auth)
    bus.start()
    try:
        yield orchestrator, bus
    finally:
        bus.stop()
        orchestrator.stop()


@pytest.fixture
def upgraded(tmp_path: Path) -> Iterator[tuple[Orchestrator, Bus]]:
    yield from start_on(DATA / "store-0.1.0.tar.gz", tmp_path)


@pytest.fixture
def upgraded_from_layout3(tmp_path: Path) -> Iterator[tuple[Orchestrator, Bus]]:
    yield from start_on(DATA / "store-layout3.tar.gz", tmp_path)


@pytest.fixture
def upgraded_from_layout2(tmp_path: Path) -> Iterator[tuple[Orchestrator, Bus]]:
    yield from start_on(DATA / "store-layout2.tar.gz", tmp_path)


def stored(bus: Bus) -> dict[str, bytes]:
    """Every entry of the distributions bucket."""
    name = bucket_name("gatefleet", "distributions")
    kv = KvStore(bus, bus.run(bus.js.key_value(name)), name)
    return kv.entries()


def test_a_store_written_by_0_1_0_starts_resumes_and_keeps_counting(
    upgraded: tuple[Orchestrator, Bus],
) -> None:
    orchestrator, bus = upgraded
    agents = [GatewayAgent(bus.nc, gw, "r1", interval_s=0.1) for gw in ("gw-a", "gw-b")]
    for agent in agents:
        bus.run(agent.start())
    with GatefleetClient(orchestrator.url, auth=orchestrator.client_auth) as client:
        # The settings stored by 0.1.0 are in force.
        in_force = client.get_load_balancing_config()
        assert (in_force.strategy, in_force.health_threshold) == ("LeastConnections", 60.0)
        listed = client.list_distributions().distributions
        records = {(r.config_type, r.version): r for r in listed if r.origin == "distribute"}
        assert records[("Route", 1)].status == "completed"
        route_v2 = records[("Route", 2)]
        assert route_v2.status == "partially_failed"
        assert route_v2.gateways["ghost"].error == "unknown gateway"
        acl = records[("Acl", 1)]

        # The distribution 0.1.0 left in progress resumes, and gw-b applies it.
        def acl_done() -> bool:
            return client.get_distribution(acl.id).status == "completed"

        wait_until(acl_done, timeout=10, what="Acl v1 resumed and completed")
        assert [p.version for _, p in agents[1].received if p.config_type == "Acl"] == [1]

        # Versions go on from the stored counter.
        wait_until(lambda: client.status().gateways_healthy == 2, what="both gateways healthy")
        created = client.distribute("Route", {"v": 3})
        assert client.get_distribution(created.distribution_id).version == 3

    # The store is stamped with the current layout.
    assert msgspec.json.decode(stored(bus)["layout"]) == {"version": 3}
    for agent in agents:
        bus.run(agent.stop(goodbye=False))


def test_a_store_of_layout_2_is_split_into_chunks_and_everything_goes_on(
    upgraded_from_layout2: tuple[Orchestrator, Bus],
) -> None:
    orchestrator, bus = upgraded_from_layout2
    entries = stored(bus)
    assert msgspec.json.decode(entries["layout"]) == {"version": 3}
    records = {
        key: value for key, value in entries.items() if re.fullmatch(r"dist-[0-9a-f-]+", key)
    }
    assert len(records) == 4  # Acl v2 never started: it has no progress
    for value in records.values():  # progress only: the states are in chunks
        progress = msgspec.json.decode(value)
        assert {"status", "batch", "completed_at", "reason"} <= set(progress)
        assert not {"gateways", "target_gateways"} & set(progress)
    assert sum(".gw." in key for key in entries) == 5
    assert {key for key in entries if key.startswith("content.")} == {
        "content.Route.1",
        "content.Route.2",
        "content.Tls.1",
        "content.Acl.1",
        "content.Acl.2",
    }

    agents = [GatewayAgent(bus.nc, gw, "r1", interval_s=0.1) for gw in ("gw-a", "gw-b")]
    for agent in agents:
        bus.run(agent.start())
    a, b = agents
    with GatefleetClient(orchestrator.url, auth=orchestrator.client_auth) as client:
        in_force = client.get_load_balancing_config()
        assert (in_force.strategy, in_force.health_threshold) == ("LatencyBased", 55.0)
        listed = client.list_distributions().distributions
        by_version = {(r.config_type, r.version): r for r in listed if r.origin == "distribute"}
        route_v2 = by_version[("Route", 2)]
        assert (route_v2.status, route_v2.request_id) == ("partially_failed", "deploy-7")
        assert route_v2.gateways["ghost"].error == "unknown gateway"
        tls = client.get_distribution(by_version[("Tls", 1)].id)
        assert tls.gateways["gw-b"] == GatewayDelivery(
            state="nacked", attempts=1, error="gw-b has no key for this certificate"
        )
        assert (tls.successful_count, tls.failed_count, tls.target_count) == (1, 1, 2)

        # Acl v1 resumes; Acl v2, which never started, follows it.
        def acl_done() -> bool:
            acl = [by_version[("Acl", v)].id for v in (1, 2)]
            return all(client.get_distribution(d).status == "completed" for d in acl)

        wait_until(acl_done, timeout=10, what="Acl v1 and v2 completed")
        assert [p.version for _, p in b.received if p.config_type == "Acl"] == [1, 2]
        # Reconciliation pushes each gateway its desired versions, from the migrated
        # contents; gw-b rejected Tls v1 before the upgrade, so it is not pushed again.
        wait_until(
            lambda: (
                (a.config_versions, b.config_versions)
                == ({"Route": 2, "Tls": 1, "Acl": 2}, {"Route": 1, "Acl": 2})
            ),
            timeout=10,
            what="every gateway at its desired versions",
            show=lambda: (a.config_versions, b.config_versions),
        )
        routes = [p.config_data for _, p in a.received if p.config_type == "Route"]
        assert routes == [{"routes": []}]
        # A retried distribute is still known; versions go on from the stored ones.
        retried = encode(
            {"config_type": "Route", "config_data": {"routes": []}, "request_id": "deploy-7"}
        )
        answer = msgspec.json.decode(bus.ask("gatefleet.api.distribute", retried, 5))
        assert answer["distribution_id"] == route_v2.id
        created = client.distribute("Route", {"v": 3})
        assert client.get_distribution(created.distribution_id).version == 3
    for agent in agents:
        bus.run(agent.stop(goodbye=False))


def test_a_layout_3_store_from_before_rollouts_resumes_and_is_rolled_back_to(
    upgraded_from_layout3: tuple[Orchestrator, Bus],
) -> None:
    orchestrator, bus = upgraded_from_layout3
    metrics = MutableMetrics()
    a = GatewayAgent(bus.nc, "gw-a", "r1", interval_s=0.1, metrics=metrics)
    b = GatewayAgent(bus.nc, "gw-b", "r1", interval_s=0.1)
    for agent in (a, b):
        bus.run(agent.start())
    with GatefleetClient(orchestrator.url, auth=orchestrator.client_auth) as client:
        distributions = client.list_distributions().distributions
        listed = {r.config_type: r for r in distributions if r.origin == "distribute"}
        assert (listed["Route"].status, listed["Route"].rollout) == ("completed", None)

        def acl_done() -> bool:
            return client.get_distribution(listed["Acl"].id).status == "completed"

        wait_until(acl_done, timeout=10, what="Acl v1 resumed and completed")
        wait_until(lambda: client.status().gateways_healthy == 2, what="both gateways healthy")

        # A rollout rolls gw-a back to the content Route v1 has in the old store.
        rollout = Rollout(canary=1, health_gate_s=5.0, auto_rollback=True)
        dist_id = client.distribute("Route", {"routes": ["/v2"]}, rollout=rollout).distribution_id
        wait_until(lambda: client.get_distribution(dist_id).gate_until is not None, what="its gate")
        metrics.metrics = BUSY
        wait_until(
            lambda: client.get_distribution(dist_id).status == "rolled_back",
            timeout=10,
            what="rolled back",
        )
        routes = [(p.version, p.config_data) for _, p in a.received if p.config_type == "Route"]
        assert routes[-2:] == [(2, {"routes": ["/v2"]}), (3, {"routes": ["/v1"]})]
        assert (1, {"routes": ["/v1"]}) in routes  # reconciled from the old store at first
    assert msgspec.json.decode(stored(bus)["layout"]) == {"version": 3}
    for agent in (a, b):
        bus.run(agent.stop(goodbye=False))


def test_a_new_store_starts_at_the_current_layout_without_a_migration(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_orchestrator(make_settings())
    name = bucket_name(prefix, "distributions")
    kv = KvStore(bus, bus.run(bus.js.key_value(name)), name)
    assert kv.get(LAYOUT_KEY, Layout) == Layout(version=LAYOUT_VERSION)
    assert not [r for r in caplog.records if "migrated" in r.getMessage()]
