"""`gatefleet audit replay` and `audit whatif` against a real orchestrator (issue 15):
every selection of a seeded mix of strategies, threshold changes, a gateway going down
and coming back and sticky clients replays exactly from the stream."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

from bus.jetstream import stream_name
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.audit import audit
from gatefleet.gateway import Metrics
from schemas.api import (
    LoadBalancingConfig,
    LoadBalancingUpdate,
    SelectReply,
    SelectRequest,
)
from schemas.events import GatewayDown, GatewayStatusChanged
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet, MutableMetrics
from tests.selections import recorded

GATEWAYS = {"edge-1": "eu-west", "edge-2": "eu-west", "edge-3": "us-east", "edge-4": "us-east"}


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        health={"heartbeat_interval_ms": 100, "fall": 3, "rise": 2},
        load_balancing={"random_seed": 11},
        regions={"eu-west": ["us-east"], "us-east": ["eu-west"]},
    )


@pytest.fixture
def config_file(settings: Settings, tmp_path: Path) -> str:
    path = tmp_path / "audit.toml"
    path.write_text(
        f'[bus]\nurl = "{settings.bus.url}"\nsubject_prefix = "{settings.bus.subject_prefix}"\n'
    )
    return str(path)


@pytest.fixture
def gatefleet(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator], event_log: EventLog
) -> Orchestrator:
    return start_orchestrator(settings)


def run_audit(config_file: str, *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(audit, ["--config", config_file, *args], catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


def as_json(config_file: str, *args: str) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(run_audit(config_file, *args, "--json").stdout)
    return decoded


def status_is(event_log: EventLog, gateway_id: str, status: str, since: int) -> None:
    event_log.wait_for(
        lambda e: (
            isinstance(e, GatewayStatusChanged | GatewayDown)
            and e.gateway_id == gateway_id
            and (isinstance(e, GatewayDown) or e.new_status == status)
        ),
        since=since,
    )


def all_stored(bus: Bus, prefix: str, event_log: EventLog) -> None:
    def stored() -> int:
        return int(bus.run(bus.js.stream_info(stream_name(prefix))).state.messages)

    wait_until(lambda: stored() == event_log.mark(), what="every event stored")


def test_every_selection_replays_and_whatif_with_the_recorded_settings_changes_nothing(
    gatefleet: Orchestrator,
    fleet: Fleet,
    bus: Bus,
    prefix: str,
    event_log: EventLog,
    config_file: str,
) -> None:
    rng = random.Random(5)
    for gateway_id, region in GATEWAYS.items():
        metrics = Metrics(
            cpu_percent=rng.uniform(5, 40),
            memory_percent=rng.uniform(10, 50),
            active_connections=rng.randrange(0, 500),
            max_connections=1000,
            latency_ms=rng.uniform(1, 30),
        )
        fleet.add(gateway_id, region, metrics=MutableMetrics(metrics))
    for gateway_id in GATEWAYS:
        status_is(event_log, gateway_id, "healthy", 0)

    replies: list[SelectReply] = []

    def select(n: int) -> None:
        for _ in range(n):
            request = SelectRequest(
                region=rng.choice([None, "eu-west", "us-east"]),
                client_id=rng.choice([None, None, "client-a", "client-b", "client-c"]),
            )
            replies.append(fleet.call("select-gateway", request, SelectReply))

    def lb(**update: Any) -> None:
        fleet.call("load-balancing.set", LoadBalancingUpdate(**update), LoadBalancingConfig)

    select(40)
    lb(strategy="LeastConnections", health_threshold=40.0)
    select(40)
    mark = event_log.mark()
    fleet.agents["edge-2"].pause_heartbeats()
    status_is(event_log, "edge-2", "down", mark)
    select(30)
    lb(strategy="WeightedRandom")
    select(40)
    mark = event_log.mark()
    fleet.agents["edge-2"].resume_heartbeats()
    status_is(event_log, "edge-2", "healthy", mark)
    lb(strategy="RegionAware", health_threshold=30.0)
    last_change = datetime.now(UTC)
    select(40)
    assert replies[-1].selection_id is not None
    recorded(event_log, replies[-1].selection_id)
    all_stored(bus, prefix, event_log)

    assert {r.strategy for r in replies} == {
        "RoundRobin",
        "LeastConnections",
        "WeightedRandom",
        "RegionAware",
    }
    assert any(r.reason == "sticky client" for r in replies)

    report = as_json(config_file, "replay")
    replica = gatefleet.lease.replica_id
    assert report == {
        "selections": 190,
        "reproduced": 190,
        "differed": [],
        "in_gap": 0,
        "replicas": {replica: {"selections": 190, "reproduced": 190}},
    }
    assert "190 reproduced exactly, 0 differed" in run_audit(config_file, "replay").stdout

    # A window: the selections stored since the last change, replayed from the snapshot.
    since = ("--since", last_change.isoformat())
    assert as_json(config_file, "replay", *since)["reproduced"] == 40
    same = as_json(config_file, "whatif", "--strategy", "RegionAware", *since)
    assert (same["selections"], same["changed"], same["no_gateway"]) == (40, 0, 0)
    counted = {gw: c["recorded"] for gw, c in same["per_gateway"].items()}
    assert counted == {gw: c["whatif"] for gw, c in same["per_gateway"].items()}
    assert sum(counted.values()) == 40

    # Another strategy and a threshold no gateway reaches: nobody would have been picked.
    none = as_json(config_file, "whatif", "--strategy", "RoundRobin", "--threshold", "100")
    assert (none["selections"], none["no_gateway"], none["changed"]) == (190, 190, 190)
    text = run_audit(config_file, "whatif", "--strategy", "LatencyBased").stdout
    assert "190 selections re-run under LatencyBased" in text
    assert "Busiest gateway, what-if" in text


def test_whatif_needs_a_known_strategy(config_file: str) -> None:
    result = CliRunner().invoke(audit, ["--config", config_file, "whatif", "--strategy", "Best"])
    assert result.exit_code == 2
    assert "'Best' is not one of" in result.stderr
