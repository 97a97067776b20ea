"""Upgrades keep state: a JetStream store written by an earlier release starts under this one.

`tests/data/store-0.1.0.tar.gz` is the `jetstream` directory of an embedded nats-server
that gatefleet 0.1.0 (commit 6d7094b, distributions store layout 1) ran on: gateways gw-a
and gw-b in region r1; Route v1 to every gateway (completed); Route v2 to gw-a and the
unknown "ghost" (partially failed); load balancing set to LeastConnections at 60; Acl v1
to gw-b, which never answered, so the orchestrator stopped with it in progress.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from bus.jetstream import bucket_name
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from gatefleet.gateway import GatewayAgent
from schemas.settings import Settings
from tests.conftest import wait_until

FIXTURE = Path(__file__).parent / "data" / "store-0.1.0.tar.gz"


@pytest.fixture
def upgraded(tmp_path: Path) -> Iterator[tuple[Orchestrator, Bus]]:
    data = tmp_path / "data"
    with tarfile.open(FIXTURE) as tar:
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
    async def layout() -> bytes:
        kv = await bus.js.key_value(bucket_name("gatefleet", "distributions"))
        return (await kv.get("layout")).value or b""

    assert msgspec.json.decode(bus.run(layout())) == {"version": 2}
    for agent in agents:
        bus.run(agent.stop(goodbye=False))
