"""compose.yaml is for users (no container runs here): it must parse, name commands the
package has, and agree with itself and with config/default.toml on ports and URLs."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml

from gatefleet.cli import main
from gatefleet.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def option_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    pairs = (str(p).split(":") for p in service.get("ports", []))
    return {int(container): int(host) for host, container in pairs}


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"nats", "gatefleet", "fleet"}


@pytest.mark.parametrize("service", ["gatefleet", "fleet"])
def test_commands_exist_with_their_options(compose: dict[str, Any], service: str) -> None:
    command: list[str] = compose["services"][service]["command"]
    assert isinstance(main, click.Group)
    cli_command = main.commands[command[0]]
    known = {opt for param in cli_command.params for opt in getattr(param, "opts", [])}
    flags = [arg for arg in command[1:] if arg.startswith("--")]
    assert flags
    assert set(flags) <= known, set(flags) - known
    ctx = cli_command.make_context(command[0], command[1:], resilient_parsing=True)
    assert ctx.params  # parses without error


def test_nats_has_jetstream_and_monitoring(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    command: list[str] = nats["command"]
    assert "--jetstream" in command
    client_port = int(option_value(command, "--port"))
    monitoring_port = int(option_value(command, "--http_port"))
    assert published(nats) == {client_port: client_port, monitoring_port: monitoring_port}


def test_urls_and_ports_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    client_port = int(option_value(services["nats"]["command"], "--port"))
    for name in ("gatefleet", "fleet"):
        url = urlparse(option_value(services[name]["command"], "--nats"))
        assert (url.hostname, url.port) == ("nats", client_port)
    assert services["gatefleet"]["depends_on"] == ["nats"]
    assert services["fleet"]["depends_on"] == ["gatefleet"]
    http = option_value(services["gatefleet"]["command"], "--http")
    http_port = int(http.rsplit(":", 1)[1])
    assert published(services["gatefleet"]) == {http_port: http_port}


def test_config_file_it_names_is_the_shipped_default(compose: dict[str, Any]) -> None:
    command = compose["services"]["gatefleet"]["command"]
    path = option_value(command, "--config")
    assert path == "/app/config/default.toml"
    assert (ROOT / "Dockerfile").read_text().count("COPY config config") == 1
    settings = load_settings(ROOT / "config" / "default.toml", env={})
    assert settings.bus.subject_prefix == "gatefleet"  # the simulator's default prefix too
