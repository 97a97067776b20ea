"""Load balancing through `P.api.*` with a real server, real agents and the Python client."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from bus.jetstream import bucket_name
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.client import BadRequest, GatefleetClient, InternalError, Unavailable
from gatefleet.gateway import Metrics
from schemas.api import ErrorReply, LoadBalancingConfig, SelectReply, SelectRequest
from schemas.codec import decode
from schemas.events import Alarm, GatewayStatusChanged, LoadBalancingChanged
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet, MutableMetrics
from tests.selections import recorded
from tests.tenures import hold_settings_key, lead_again, settings_store


def load(cpu: float, connections: int, latency: float) -> MutableMetrics:
    return MutableMetrics(
        Metrics(
            cpu_percent=cpu,
            memory_percent=20.0,
            active_connections=connections,
            max_connections=1000,
            latency_ms=latency,
        )
    )


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        health={"heartbeat_interval_ms": 100},
        load_balancing={"random_seed": 1},
        regions={"eu-central": ["eu-west", "us-east"]},
    )


@pytest.fixture
def gatefleet(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Orchestrator:
    return start_orchestrator(settings)


@pytest.fixture
def client(gatefleet: Orchestrator, prefix: str) -> Iterator[GatefleetClient]:
    with GatefleetClient(gatefleet.url, prefix=prefix) as client:
        yield client


def healthy(event_log: EventLog, *ids: str) -> None:
    for gateway_id in ids:
        event_log.wait_for(
            lambda e, g=gateway_id: (
                isinstance(e, GatewayStatusChanged)  # type: ignore[misc]
                and e.gateway_id == g
                and e.new_status == "healthy"
            )
        )


@pytest.fixture
def three(gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog) -> Fleet:
    """edge-a busy with many connections and slow; edge-b idle and fast; edge-c in eu-west."""
    fleet.add("edge-a", "us-west", metrics=load(cpu=30, connections=500, latency=30))
    fleet.add("edge-b", "us-west", metrics=load(cpu=10, connections=100, latency=5))
    fleet.add("edge-c", "eu-west", metrics=load(cpu=20, connections=300, latency=20))
    healthy(event_log, "edge-a", "edge-b", "edge-c")
    return fleet


def picks(client: GatefleetClient, n: int, **request: Any) -> Counter[str | None]:
    return Counter(client.select_optimal_gateway(**request).gateway_id for _ in range(n))


def test_round_robin_is_fair(three: Fleet, client: GatefleetClient) -> None:
    assert client.get_load_balancing_config().strategy == "RoundRobin"
    assert picks(client, 300) == {"edge-a": 100, "edge-b": 100, "edge-c": 100}


def test_strategy_change_applies_to_the_next_selection(
    three: Fleet, client: GatefleetClient, event_log: EventLog
) -> None:
    config = client.update_load_balancing_config("LeastConnections")
    assert (config.strategy, config.health_threshold) == ("LeastConnections", 70.0)
    reply = client.select_optimal_gateway()
    assert (reply.gateway_id, reply.strategy) == ("edge-b", "LeastConnections")
    changed = event_log.wait_for(lambda e: isinstance(e, LoadBalancingChanged))
    assert isinstance(changed, LoadBalancingChanged)
    assert (changed.old_strategy, changed.new_strategy) == ("RoundRobin", "LeastConnections")

    client.update_load_balancing_config("LatencyBased")
    assert picks(client, 20) == {"edge-b": 20}

    client.update_load_balancing_config("RegionAware")
    assert picks(client, 10, region="eu-west") == {"edge-c": 10}
    assert picks(client, 10, region="us-west") == {"edge-b": 10}  # inner: LeastConnections
    # Nobody serves eu-central: the proximity table sends it to eu-west first.
    reply = client.select_optimal_gateway("eu-central")
    assert reply.gateway_id == "edge-c"
    assert "eu-west" in reply.reason
    # A region with no table entry falls back to any eligible gateway.
    assert client.select_optimal_gateway("ap-south").gateway_id in {"edge-a", "edge-b", "edge-c"}

    client.update_load_balancing_config("WeightedRandom")
    counts = picks(client, 300)
    assert set(counts) == {"edge-a", "edge-b", "edge-c"}
    assert counts["edge-b"] > counts["edge-a"]  # healthier, so more likely


def test_threshold_excludes_and_includes(three: Fleet, client: GatefleetClient) -> None:
    scores = {g.gateway_id: g.score for g in client.gateways().gateways}
    # Exactly at edge-c's score: edge-c is still selectable, edge-a (lower) is not.
    threshold = scores["edge-c"]
    assert scores["edge-a"] < threshold <= scores["edge-b"]
    client.update_load_balancing_config("RoundRobin", threshold)
    wait_until(
        lambda: set(picks(client, 4)) == {"edge-b", "edge-c"},
        what="edge-a excluded",
        show=lambda: picks(client, 4),
    )
    client.update_load_balancing_config(health_threshold=100.0)
    reply = client.select_optimal_gateway()
    assert reply.gateway_id is None
    assert "no eligible gateway" in reply.reason


def test_down_gateway_is_never_selected(
    three: Fleet, client: GatefleetClient, event_log: EventLog
) -> None:
    three.agents["edge-b"].pause_heartbeats()
    event_log.wait_for(
        lambda e: (
            isinstance(e, GatewayStatusChanged)
            and e.gateway_id == "edge-b"
            and e.new_status in ("degraded", "down")
        )
    )
    assert "edge-b" not in picks(client, 30)


def test_sticky_clients(three: Fleet, client: GatefleetClient, event_log: EventLog) -> None:
    first = client.select_optimal_gateway(client_id="alice").gateway_id
    assert first is not None
    assert picks(client, 10, client_id="alice") == {first: 10}
    three.agents[first].pause_heartbeats()
    event_log.wait_for(
        lambda e: (
            isinstance(e, GatewayStatusChanged)
            and e.gateway_id == first
            and e.new_status in ("degraded", "down")
        )
    )
    moved = client.select_optimal_gateway(client_id="alice").gateway_id
    assert moved not in (None, first)
    assert picks(client, 5, client_id="alice") == {moved: 5}


def test_empty_pool_answers_null_not_an_error(
    gatefleet: Orchestrator, client: GatefleetClient
) -> None:
    reply = client.select_optimal_gateway("us-west")
    assert reply.gateway_id is None
    assert reply.strategy == "RoundRobin"
    assert reply.reason


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"strategy": "Fastest"}',
        b'{"health_threshold": 101}',
        b'{"health_threshold": -0.5}',
        b'{"health_threshold": "high"}',
        b"[]",
    ],
)
def test_bad_load_balancing_requests_change_nothing(
    gatefleet: Orchestrator, fleet: Fleet, body: bytes
) -> None:
    reply = fleet.raw_call("load-balancing.set", body)
    assert reply["error"]["code"] == "bad_request"
    assert reply["error"]["message"]
    assert fleet.raw_call("load-balancing.get", b"{}") == {
        "strategy": "RoundRobin",
        "health_threshold": 70.0,
    }


@pytest.mark.parametrize("body", [b"{oops", b'{"region": 5}', b'{"client_id": ""}'])
def test_bad_select_requests_get_bad_request(
    gatefleet: Orchestrator, fleet: Fleet, body: bytes
) -> None:
    assert fleet.raw_call("select-gateway", body)["error"]["code"] == "bad_request"


def test_client_raises_typed_errors(gatefleet: Orchestrator, client: GatefleetClient) -> None:
    with pytest.raises(BadRequest, match="health_threshold"):
        client.update_load_balancing_config(health_threshold=150.0)
    with (
        GatefleetClient(gatefleet.url, prefix="nobody-home", timeout=1) as lonely,
        pytest.raises(Unavailable, match="nobody answers"),
    ):
        lonely.get_load_balancing_config()


def test_settings_survive_a_restart(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator], prefix: str
) -> None:
    first = start_orchestrator(settings)
    with GatefleetClient(first.url, prefix=prefix) as client:
        client.update_load_balancing_config("LatencyBased", 80.0)
    first.stop()
    second = start_orchestrator(settings)
    with GatefleetClient(second.url, prefix=prefix) as client:
        config = client.get_load_balancing_config()
        status = client.status()
    assert (config.strategy, config.health_threshold) == ("LatencyBased", 80.0)
    assert (status.load_balancing_strategy, status.health_check_threshold) == ("LatencyBased", 80.0)


def test_settings_that_cannot_be_stored_are_an_internal_error_and_change_nothing(
    gatefleet: Orchestrator, client: GatefleetClient, bus: Bus, prefix: str
) -> None:
    """The load balancer stores its settings without waiting (it runs on the API lane's
    loop): a write that fails is answered `internal`, and the old settings stay in force."""
    bus.run(bus.js.delete_key_value(bucket_name(prefix, "settings")))
    with pytest.raises(InternalError, match="internal error, id err-"):
        client.update_load_balancing_config("LatencyBased", 80.0)
    config = client.get_load_balancing_config()
    assert (config.strategy, config.health_threshold) == ("RoundRobin", 70.0)
    assert client.select_optimal_gateway().strategy == "RoundRobin"


def test_settings_asked_in_a_row_build_on_each_other(
    gatefleet: Orchestrator, fleet: Fleet, bus: Bus, prefix: str
) -> None:
    """Two updates sent back to back (the first not stored yet when the second comes):
    the second keeps what the first set."""
    subject = f"{prefix}.api.load-balancing.set"
    first = bus.submit(bus.nc.request(subject, b'{"strategy": "LatencyBased"}', timeout=5))
    second = bus.submit(bus.nc.request(subject, b'{"health_threshold": 80}', timeout=5))
    assert msgspec.json.decode(first.result(5).data) == {
        "strategy": "LatencyBased",
        "health_threshold": 70.0,
    }
    assert msgspec.json.decode(second.result(5).data) == {
        "strategy": "LatencyBased",
        "health_threshold": 80.0,
    }


def test_a_settings_write_after_another_replica_wrote_them_steps_the_leader_down(
    gatefleet: Orchestrator, client: GatefleetClient, bus: Bus, prefix: str
) -> None:
    """The leader stored settings; another replica (a newer leader the old one does not
    know of yet) stores others since: the old leader's next write is refused, it steps
    down and answers `unavailable`, and the other's settings stay stored and come into
    force here as on any standby."""
    client.update_load_balancing_config("LatencyBased")
    settings_kv = settings_store(bus, prefix)
    newer = LoadBalancingConfig(strategy="LeastConnections", health_threshold=60.0)
    settings_kv.put("load_balancing", newer)

    answer = bus.ask(f"{prefix}.api.load-balancing.set", b'{"health_threshold": 80}', 5.0)
    error = decode(answer, ErrorReply).error
    assert (error.code, error.retry_after_ms is not None) == ("unavailable", True)
    assert not gatefleet.lease.still_leader()
    assert settings_kv.get("load_balancing", LoadBalancingConfig) == newer
    wait_until(
        lambda: client.get_load_balancing_config() == newer,
        what="the stored settings in force",
        show=client.get_load_balancing_config,
    )


def test_a_settings_write_of_an_earlier_tenure_refused_late_leaves_the_present_one_leading(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
) -> None:
    """A settings write is held on its way while this replica steps down and leads
    again; another writer stores the settings meanwhile, so the write comes back refused.
    It was the earlier tenure's: it is answered `unavailable`, and the present tenure
    leads on."""
    gatefleet = start_orchestrator(make_settings(cluster={"lease_ms": 2000}))
    held = hold_settings_key("load_balancing")
    held.hold()
    body = b'{"strategy": "LatencyBased"}'
    asked = bus.submit(bus.nc.request(f"{prefix}.api.load-balancing.set", body, timeout=30))
    assert held.waiting.wait(5)
    epoch = lead_again(gatefleet.lease)
    settings_kv = settings_store(bus, prefix)
    newer = LoadBalancingConfig(strategy="LeastConnections", health_threshold=60.0)
    settings_kv.put("load_balancing", newer)

    bus.run(held.release())
    error = decode(asked.result(10).data, ErrorReply).error
    assert error.code == "unavailable"
    assert gatefleet.lease.still_leader()
    assert gatefleet.lease.view.epoch == epoch
    assert settings_kv.get("load_balancing", LoadBalancingConfig) == newer


def test_an_unreadable_stored_setting_is_alarmed_and_the_configured_one_used(
    settings: Settings,
    start_orchestrator: Callable[[Settings], Orchestrator],
    prefix: str,
    bus: Bus,
    event_log: EventLog,
) -> None:
    """No stored value can stop start-up: garbage under the settings key is logged,
    alarmed (`ha.alarm` kind bad_stored_value) and replaced by the configuration."""
    first = start_orchestrator(settings)
    first.stop()

    async def corrupt() -> None:
        kv = await bus.js.key_value(bucket_name(prefix, "settings"))
        await kv.put("load_balancing", b'{"strategy": "Fastest", "health_threshold": 900}')

    bus.run(corrupt())
    second = start_orchestrator(settings)
    with GatefleetClient(second.url, prefix=prefix) as client:
        config = client.get_load_balancing_config()
    assert (config.strategy, config.health_threshold) == ("RoundRobin", 70.0)
    alarm = event_log.wait_for(lambda e: isinstance(e, Alarm))
    assert isinstance(alarm, Alarm)
    assert alarm.kind == "bad_stored_value"


def test_selection_reply_links_to_its_audit_event(
    three: Fleet, fleet: Fleet, event_log: EventLog
) -> None:
    reply = fleet.call("select-gateway", SelectRequest(region="us-west"), SelectReply)
    assert reply.selection_id is not None
    batch, record = recorded(event_log, reply.selection_id)
    assert batch.type == "lb.selections"
    assert (record.region, record.gateway_id) == ("us-west", reply.gateway_id)
