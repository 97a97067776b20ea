"""Every client command end to end against a running orchestrator, human and --json."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bus.runtime import Bus
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from schemas.events import GatewayStatusChanged
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory
from tests.fleet import Fleet


@pytest.fixture
def config_file(tmp_path: Path, prefix: str, nats_server: EmbeddedServer) -> Path:
    url = nats_server.url
    path = tmp_path / "client.toml"
    path.write_text(f'[bus]\nurl = "{url}"\nsubject_prefix = "{prefix}"\n')
    return path


@pytest.fixture
def live(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
    event_log: EventLog,
) -> Iterator[Fleet]:
    start_orchestrator(make_settings(health={"heartbeat_interval_ms": 100}))
    fleet = Fleet(bus, prefix)
    fleet.add("edge-1", "us-west")
    fleet.add("edge-2", "eu-west")
    for gateway_id in ("edge-1", "edge-2"):
        event_log.wait_for(
            lambda e, g=gateway_id: (
                isinstance(e, GatewayStatusChanged)  # type: ignore[misc]
                and e.gateway_id == g
                and e.new_status == "healthy"
            )
        )
    yield fleet
    fleet.close()


def run(config_file: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, [*args, "--config", str(config_file)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_status(live: Fleet, config_file: Path) -> None:
    human = run(config_file, "status")
    assert human.exit_code == 0
    assert "gateways healthy" in human.output
    data = json.loads(run(config_file, "status", "--json").output)
    assert (data["gateways_managed"], data["gateways_healthy"]) == (2, 2)
    assert (data["role"], data["leader"]) == ("leader", data["replica_id"])
    assert f"{data['replica_id']} (leader; leader {data['replica_id']})" in human.output


def test_gateways_table_and_json(live: Fleet, config_file: Path) -> None:
    human = run(config_file, "gateways")
    assert human.exit_code == 0
    for heading in (
        "id",
        "region",
        "role",
        "status",
        "score",
        "CPU",
        "memory",
        "connections",
        "latency",
        "failures",
        "last seen",
    ):
        assert heading in human.output
    assert "edge-1" in human.output
    assert "eu-west" in human.output
    rows = json.loads(run(config_file, "gateways", "--json").output)["gateways"]
    assert {r["gateway_id"]: r["status"] for r in rows} == {
        "edge-1": "healthy",
        "edge-2": "healthy",
    }


def test_select(live: Fleet, config_file: Path) -> None:
    run(config_file, "strategy", "RegionAware")
    human = run(config_file, "select", "--region", "eu-west")
    assert human.exit_code == 0
    assert human.output.startswith("edge-2")
    data = json.loads(
        run(config_file, "select", "--region", "us-west", "--client-id", "c1", "--json").output
    )
    assert data["gateway_id"] == "edge-1"
    assert data["strategy"] == "RegionAware"


def test_strategy_show_and_set(live: Fleet, config_file: Path) -> None:
    assert "RoundRobin" in run(config_file, "strategy").output
    changed = json.loads(
        run(config_file, "strategy", "LatencyBased", "--threshold", "55", "--json").output
    )
    assert changed == {"strategy": "LatencyBased", "health_threshold": 55.0}
    assert json.loads(run(config_file, "strategy", "--json").output) == changed


def test_bad_arguments_are_one_line(live: Fleet, config_file: Path) -> None:
    result = run(config_file, "strategy", "Fastest")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    result = run(config_file, "strategy", "--threshold", "120")
    assert result.exit_code == 2


def test_unreachable_server(tmp_path: Path) -> None:
    config = tmp_path / "nowhere.toml"
    config.write_text('[bus]\nurl = "nats://127.0.0.1:1"\n')
    result = CliRunner().invoke(main, ["gateways", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.strip().startswith("gatefleet: unavailable: cannot connect")
    assert len(result.output.strip().splitlines()) == 1


def test_nats_flag_and_env_override_the_config(
    live: Fleet, config_file: Path, nats_server: EmbeddedServer, prefix: str
) -> None:
    url = nats_server.url
    wrong = config_file.parent / "wrong.toml"
    wrong.write_text(f'[bus]\nurl = "nats://127.0.0.1:1"\nsubject_prefix = "{prefix}"\n')
    by_flag = CliRunner().invoke(main, ["status", "--json", "--config", str(wrong), "--nats", url])
    assert by_flag.exit_code == 0, by_flag.output
    by_env = CliRunner().invoke(
        main, ["status", "--json", "--config", str(wrong)], env={"GATEFLEET_NATS_URL": url}
    )
    assert by_env.exit_code == 0, by_env.output


def test_distribute_with_wait_and_list(live: Fleet, config_file: Path, tmp_path: Path) -> None:
    source = tmp_path / "route.json"
    source.write_text('{"routes": ["10.0.0.0/8"]}')
    human = run(config_file, "distribute", "Route", str(source), "--wait")
    assert human.exit_code == 0, human.output
    assert "completed" in human.output
    assert "edge-1" in human.output
    assert "2 acked" in human.output  # the progress line
    assert all(a.config_versions.get("Route") == 1 for a in live.agents.values())

    listed = json.loads(run(config_file, "distributions", "--all", "--json").output)
    [record] = listed["distributions"]
    assert (record["status"], record["version"]) == ("completed", 1)
    assert json.loads(run(config_file, "distributions", "--json").output) == {
        "distributions": [],
        "next_cursor": None,
    }
    one = run(config_file, "distributions", record["id"])
    assert "Route v1" in one.output


def test_distribute_exit_status_says_whether_all_acked(
    live: Fleet, config_file: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main,
        [
            "distribute",
            "Route",
            "-",
            "--targets",
            "edge-1,ghost",
            "--wait",
            "--json",
            "--config",
            str(config_file),
        ],
        input='{"x": 1}',
    )
    assert result.exit_code == 1
    record = json.loads(result.output)
    assert record["status"] == "partially_failed"
    assert record["gateways"]["ghost"]["error"] == "unknown gateway"


def test_distribute_without_wait_and_bad_input(live: Fleet, config_file: Path) -> None:
    created = CliRunner().invoke(
        main, ["distribute", "Route", "-", "--json", "--config", str(config_file)], input="{}"
    )
    assert created.exit_code == 0
    assert json.loads(created.output)["distribution_id"].startswith("dist-")
    bad = CliRunner().invoke(
        main, ["distribute", "Route", "-", "--config", str(config_file)], input="[1, 2]"
    )
    assert bad.exit_code == 2
    assert "must be a JSON object" in bad.output
    missing = run(config_file, "distributions", "dist-00000000-0000-0000-0000-000000000000")
    assert missing.exit_code == 1
    assert missing.output.startswith("gatefleet: not found")
