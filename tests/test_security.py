"""The authenticated bus (issue 14) on a real nats-server in operator mode.

One server for the module, with the keys of one `Authority`; each test connects plain
nats-py clients with credentials issued from it and watches what the server refuses.
NATS tells only the offending client of a permission violation: an asynchronous error
on its connection, which `Conn.violation` waits for.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from click.testing import CliRunner
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from bus.claims import push_account
from bus.connection import AccessRefused, ClientAuth, close_connection, open_connection
from bus.jetstream import stream_name
from bus.server import EmbeddedServer, find_nats_server
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.client import GatefleetClient, Refused
from gatefleet.config import ConfigError, load_settings
from gatefleet.gateway import GatewayAgent
from gatefleet.http import HttpApi
from gatefleet.security.access import gateway_auths
from gatefleet.security.authority import Authority, AuthorityError
from gatefleet.security.jwt import CredsError, KeyPair, creds_text, encode_jwt, read_creds
from gatefleet.security.permissions import Kind, read_only_endpoints
from gatefleet.simulate import run_simulation
from schemas.settings import Settings
from tests.conftest import wait_until
from tests.test_http import Http

PREFIX = "sec"
WAIT = 5.0
STREAM = stream_name(PREFIX)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("secure"))


@pytest.fixture(scope="module")
def server(authority: Authority) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(authority.dir.parent, port=0, auth=authority.server_auth())
    srv.start()
    yield srv
    srv.stop()


class Conn:
    """A nats-py connection that keeps the asynchronous errors the server sends it."""

    def __init__(self) -> None:
        self.nc = Client()
        self.errors: asyncio.Queue[str] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def connect(self, url: str, creds: Path | str) -> Conn:
        async def on_error(exc: Exception) -> None:
            self.errors.put_nowait(str(exc))

        async def on_closed() -> None:
            self.closed.set()

        await self.nc.connect(
            url,
            user_credentials=str(creds),
            allow_reconnect=False,
            error_cb=on_error,
            closed_cb=on_closed,
        )
        return self

    async def violation(self, subject: str) -> str:
        """The server's complaint about `subject` (any other error fails the test)."""
        error = await asyncio.wait_for(self.errors.get(), WAIT)
        assert "permissions violation" in error.lower(), error
        assert subject.lower() in error.lower(), error
        return error

    async def no_error(self) -> None:
        await self.nc.flush()
        assert self.errors.empty(), self.errors.get_nowait()


@pytest.fixture
async def conns() -> AsyncIterator[list[Conn]]:
    opened: list[Conn] = []
    yield opened
    for conn in opened:
        await close_connection(conn.nc)


Connect = Callable[[Path | str], Awaitable[Conn]]


@pytest.fixture
def connect(server: EmbeddedServer, conns: list[Conn]) -> Connect:
    async def open_one(creds: Path | str) -> Conn:
        conn = await Conn().connect(server.url, creds)
        conns.append(conn)
        return conn

    return open_one


@pytest.fixture
async def admin(connect: Connect, authority: Authority) -> Conn:
    return await connect(authority.admin_creds)


async def inbox(conn: Conn, subject: str) -> asyncio.Queue[Msg]:
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        got.put_nowait(msg)

    await conn.nc.subscribe(subject, cb=put)
    await conn.nc.flush()
    return got


def issue(authority: Authority, kind: Kind, name: str, tmp_path: Path) -> Path:
    return authority.issue(kind, name, PREFIX, tmp_path / f"{kind}-{name}.creds")


# --- who may connect ----------------------------------------------------------------------


async def test_a_connection_without_credentials_is_refused(server: EmbeddedServer) -> None:
    nc = Client()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nc.connect(server.url, allow_reconnect=False, connect_timeout=2)
    await nc.close()
    with pytest.raises(AccessRefused, match="refused the credentials"):
        await open_connection(server.url, name="anonymous", connect_timeout_s=2)


async def test_admin_has_jetstream_and_the_keys_are_private(
    admin: Conn, authority: Authority
) -> None:
    js = admin.nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.events.>"]))
    await js.publish(f"{PREFIX}.events.test", b"{}")
    assert (await js.stream_info(STREAM)).state.messages >= 1
    assert stat.S_IMODE(authority.dir.stat().st_mode) == 0o700
    secrets = [p for p in authority.dir.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {"operator.nk", "fleet.nk", "system.nk", "admin.creds"} <= {p.name for p in secrets}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets), secrets
    again = Authority(authority.dir.parent)  # a restart keeps the keys
    assert again.fleet_account == authority.fleet_account
    assert again.operator_jwt == authority.operator_jwt


# --- a gateway's credential ---------------------------------------------------------------


async def test_a_gateway_publishes_only_its_own_heartbeat_and_goodbye(
    connect: Connect, admin: Conn, authority: Authority, tmp_path: Path
) -> None:
    seen = await inbox(admin, f"{PREFIX}.gw.>")
    gw = await connect(issue(authority, "gateway", "gw-a", tmp_path))
    await gw.nc.publish(f"{PREFIX}.gw.gw-b.heartbeat", b"forged")
    await gw.violation(f"{PREFIX}.gw.gw-b.heartbeat")
    await gw.nc.publish(f"{PREFIX}.gw.gw-b.goodbye", b"forged")
    await gw.violation(f"{PREFIX}.gw.gw-b.goodbye")
    await gw.nc.publish(f"{PREFIX}.gw.gw-a.heartbeat", b"mine")
    await gw.nc.publish(f"{PREFIX}.gw.gw-a.goodbye", b"mine")
    await gw.no_error()
    first = await asyncio.wait_for(seen.get(), WAIT)
    second = await asyncio.wait_for(seen.get(), WAIT)
    assert [first.subject, second.subject] == [
        f"{PREFIX}.gw.gw-a.heartbeat",
        f"{PREFIX}.gw.gw-a.goodbye",
    ]  # nothing forged came through before them


async def test_a_gateway_subscribes_only_to_its_own_config_and_ping_and_answers(
    connect: Connect, admin: Conn, authority: Authority, tmp_path: Path
) -> None:
    gw = await connect(issue(authority, "gateway", "gw-a", tmp_path))
    await gw.nc.subscribe(f"{PREFIX}.gw.gw-b.config")
    await gw.violation(f"{PREFIX}.gw.gw-b.config")
    await gw.nc.subscribe(f"{PREFIX}.gw.>")
    await gw.violation(f"{PREFIX}.gw.>")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ack:" + msg.data)

    await gw.nc.subscribe(f"{PREFIX}.gw.gw-a.config", cb=answer)
    await gw.nc.subscribe(f"{PREFIX}.gw.gw-a.ping", cb=answer)
    redirects = await inbox(gw, f"{PREFIX}.redirect.>")
    await gw.no_error()
    reply = await admin.nc.request(f"{PREFIX}.gw.gw-a.config", b"push", timeout=WAIT)
    assert reply.data == b"ack:push"  # a reply to a request it received is allowed
    assert (await admin.nc.request(f"{PREFIX}.gw.gw-a.ping", b"p", timeout=WAIT)).data == b"ack:p"
    await admin.nc.publish(f"{PREFIX}.redirect.gw-z", b"moved")
    assert (await asyncio.wait_for(redirects.get(), WAIT)).data == b"moved"


async def test_a_gateway_cannot_call_the_api_events_or_jetstream(
    connect: Connect, admin: Conn, authority: Authority, tmp_path: Path
) -> None:
    js = admin.nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.events.>"]))
    gw = await connect(issue(authority, "gateway", "gw-a", tmp_path))
    for subject in (
        f"{PREFIX}.api.status",
        f"{PREFIX}.api.distribute",
        f"{PREFIX}.events.gateway.registered",
        f"$JS.API.STREAM.DELETE.{STREAM}",
        "$SYS.REQ.CLAIMS.UPDATE",
    ):
        await gw.nc.publish(subject, b"{}")
        await gw.violation(subject)
    assert (await js.stream_info(STREAM)).config.name == STREAM  # still there


# --- operators ----------------------------------------------------------------------------


def test_read_only_means_the_endpoints_the_issue_lists() -> None:
    assert sorted(read_only_endpoints()) == sorted(
        [
            "status",
            "gateways",
            "select-gateway",
            "load-balancing.get",
            "distributions.get",
            "distributions.list",
        ]
    )


async def serve_api(admin: Conn) -> None:
    """An echo on every API subject, standing in for gatefleet."""

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.subject.encode())

    await admin.nc.subscribe(f"{PREFIX}.api.>", cb=echo)
    await admin.nc.flush()


async def read_events(conn: Conn) -> int:
    """What `gatefleet audit` does: an ordered consumer on the event stream."""
    js = conn.nc.jetstream()
    info = await js.stream_info(STREAM)
    sub = await js.subscribe(f"{PREFIX}.events.>", stream=STREAM, ordered_consumer=True)
    msg = await sub.next_msg(timeout=WAIT)
    assert msg.subject.startswith(f"{PREFIX}.events.")
    await sub.unsubscribe()
    return info.state.messages


@pytest.mark.parametrize("read_only", [True, False])
async def test_an_operator_calls_the_api_reads_events_and_deletes_nothing(
    read_only: bool, connect: Connect, admin: Conn, authority: Authority, tmp_path: Path
) -> None:
    js = admin.nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.events.>"]))
    await js.publish(f"{PREFIX}.events.lb.changed", b"{}")
    await js.create_key_value(bucket=f"{PREFIX}_settings")
    await serve_api(admin)
    kind: Kind = "read-only" if read_only else "operator"
    op = await connect(issue(authority, kind, "alice", tmp_path))
    for name in read_only_endpoints():
        reply = await op.nc.request(f"{PREFIX}.api.{name}", b"{}", timeout=WAIT)
        assert reply.data == f"{PREFIX}.api.{name}".encode()
    assert await read_events(op) >= 1
    if read_only:
        for name in ("distribute", "load-balancing.set", "maintenance"):
            await op.nc.publish(f"{PREFIX}.api.{name}", b"{}")
            await op.violation(f"{PREFIX}.api.{name}")
    else:
        reply = await op.nc.request(f"{PREFIX}.api.distribute", b"{}", timeout=WAIT)
        assert reply.data == f"{PREFIX}.api.distribute".encode()
    for subject in (
        f"$JS.API.STREAM.DELETE.{STREAM}",
        f"$JS.API.STREAM.PURGE.{STREAM}",
        f"$JS.API.STREAM.DELETE.KV_{PREFIX}_settings",
        f"{PREFIX}.gw.gw-a.heartbeat",
    ):
        await op.nc.publish(subject, b"")
        await op.violation(subject)
    await op.no_error()
    assert (await js.stream_info(STREAM)).state.messages >= 1


async def test_a_simulator_credential_speaks_for_every_gateway_and_no_more(
    connect: Connect, admin: Conn, authority: Authority, tmp_path: Path
) -> None:
    seen = await inbox(admin, f"{PREFIX}.gw.*.heartbeat")
    sim = await connect(issue(authority, "simulator", "lab", tmp_path))
    await sim.nc.subscribe(f"{PREFIX}.gw.*.config")
    await sim.nc.subscribe(f"{PREFIX}.gw.*.ping")
    for gw in ("a", "b"):
        await sim.nc.publish(f"{PREFIX}.gw.{gw}.heartbeat", b"{}")
    await sim.no_error()
    got = {(await asyncio.wait_for(seen.get(), WAIT)).subject for _ in range(2)}
    assert got == {f"{PREFIX}.gw.a.heartbeat", f"{PREFIX}.gw.b.heartbeat"}
    await sim.nc.publish(f"{PREFIX}.api.status", b"{}")
    await sim.violation(f"{PREFIX}.api.status")
    claims = read_creds(tmp_path / "simulator-lab.creds").claims
    assert "gatefleet:test-credential" in claims["nats"]["tags"]


@pytest.mark.parametrize("kind", ["gateway", "simulator", "operator", "read-only"])
async def test_no_credential_handed_out_speaks_or_listens_as_a_replica(
    kind: Kind, connect: Connect, authority: Authority, tmp_path: Path
) -> None:
    """The leader's probe results (a forged one would set every standby's latencies) and
    the forwarded writes are gatefleet's own."""
    user = await connect(issue(authority, kind, "x", tmp_path))
    for subject in (f"{PREFIX}.replica.probes", f"{PREFIX}.replica.a.api.distribute"):
        await user.nc.publish(subject, b"{}")
        await user.violation(subject)
    await user.nc.subscribe(f"{PREFIX}.replica.probes")
    await user.violation(f"{PREFIX}.replica.probes")


# --- revocation ---------------------------------------------------------------------------


async def test_revoking_closes_a_live_connection_and_refuses_the_next(
    server: EmbeddedServer, connect: Connect, authority: Authority, tmp_path: Path
) -> None:
    creds = issue(authority, "gateway", "gw-revoked", tmp_path)
    keep = issue(authority, "gateway", "gw-kept", tmp_path)
    live = await connect(creds)
    other = await connect(keep)
    [user] = authority.revoke("gw-revoked")
    assert user.revoked_at is not None
    system = ClientAuth(creds=str(authority.system_creds))
    await push_account(server.url, system, authority.fleet_jwt)
    await asyncio.wait_for(live.closed.wait(), WAIT)
    with pytest.raises(AccessRefused):
        await open_connection(
            server.url, name="revoked", connect_timeout_s=2, user_credentials=str(creds)
        )
    assert not other.closed.is_set()
    assert other.nc.is_connected
    with pytest.raises(AuthorityError, match="no credential named 'gw-revoked'"):
        authority.revoke("gw-revoked")


async def test_a_revocation_made_while_the_server_was_down_holds_after_its_start(
    tmp_path: Path,
) -> None:
    authority = Authority(tmp_path)
    creds = authority.issue("gateway", "gw-1", PREFIX)
    authority.revoke("gw-1")
    with (
        EmbeddedServer(tmp_path, port=0, auth=authority.server_auth()) as srv,
        pytest.raises(AccessRefused),
    ):
        await open_connection(srv.url, name="r", connect_timeout_s=2, user_credentials=str(creds))


# --- bad credentials ----------------------------------------------------------------------


def test_unusable_creds_files_are_one_line_naming_the_file_and_cause(
    tmp_path: Path, authority: Authority
) -> None:
    missing = tmp_path / "missing.creds"
    garbage = tmp_path / "garbage.creds"
    garbage.write_text("not a creds file\n")
    stranger = KeyPair.generate("user")
    good = read_creds(authority.admin_creds)
    mismatch = tmp_path / "mismatch.creds"
    mismatch.write_text(creds_text(good.jwt, stranger.seed))
    expired = tmp_path / "expired.creds"
    account = KeyPair.generate("account")
    token = encode_jwt(
        {"type": "user"},
        subject=stranger.public_key,
        name="old",
        issuer=account,
        expires_at=int(time.time()) - 60,
    )
    expired.write_text(creds_text(token, stranger.seed))
    cases = {
        missing: "cannot read it: No such file or directory",
        garbage: "not a NATS .creds file",
        mismatch: "the seed does not belong to its user JWT",
        expired: "the credential expired at",
    }
    for path, reason in cases.items():
        with pytest.raises(CredsError) as caught:
            read_creds(path)
        message = str(caught.value)
        assert str(path) in message, message
        assert reason in message, message
        assert "\n" not in message


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatefleet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_a_command_with_bad_or_refused_creds_says_so_in_one_line_exit_2(
    server: EmbeddedServer, authority: Authority, tmp_path: Path
) -> None:
    bad = run_cli("status", "--nats", server.url, "--creds", str(tmp_path / "nope.creds"))
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "nope.creds" in bad.stderr
    anonymous = run_cli("status", "--nats", server.url)
    assert anonymous.returncode == 2
    assert "refused the credentials" in anonymous.stderr, anonymous.stderr
    assert anonymous.stderr.count("\n") == 1
    creds = issue(authority, "gateway", "gw-env", tmp_path)
    authority.revoke("gw-env")
    system = ClientAuth(creds=str(authority.system_creds))
    asyncio.run(push_account(server.url, system, authority.fleet_jwt))
    revoked = run_cli("status", "--nats", server.url, env={"GATEFLEET_CREDS": str(creds)})
    assert revoked.returncode == 2, revoked.stderr


# --- gatefleet with auth: its own connections, the agent, the simulator, the CLI ----------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Orchestrator]:
    settings = msgspec.convert(
        {
            "bus": {"port": 0, "data_dir": str(tmp_path / "data"), "subject_prefix": PREFIX},
            "health": {"probe_interval_ms": 0, "heartbeat_interval_ms": 100},
        },
        Settings,
    )
    orchestrator = Orchestrator(settings)
    orchestrator.start()
    yield orchestrator
    orchestrator.stop()


async def test_the_agent_and_the_simulator_work_with_their_credentials(
    secured: Orchestrator, tmp_path: Path
) -> None:
    assert secured.authority is not None
    gw_creds = secured.authority.issue("gateway", "edge-1", PREFIX)
    agent = await GatewayAgent.connect(
        secured.url, "edge-1", "eu-west", prefix=PREFIX, interval_s=0.1, creds=str(gw_creds)
    )
    sim_creds = secured.authority.issue("simulator", "lab", PREFIX)
    stop = asyncio.Event()
    ready = asyncio.Event()
    simulation = asyncio.create_task(
        run_simulation(
            secured.url,
            3,
            ["eu-west"],
            prefix=PREFIX,
            interval_s=0.1,
            stop_event=stop,
            ready=ready,
            auth=ClientAuth(creds=str(sim_creds)),
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), WAIT)
        with GatefleetClient(secured.url, prefix=PREFIX, auth=secured.client_auth) as client:

            def healthy() -> int:
                return client.status().gateways_healthy

            await asyncio.to_thread(
                wait_until, lambda: healthy() == 4, 10, "4 gateways healthy", healthy
            )
    finally:
        stop.set()
        summary = await simulation
        await agent.stop()
    assert summary.publish_errors == 0
    assert summary.heartbeats_sent > 0
    assert agent.publish_errors == 0


async def test_per_gateway_creds_give_each_simulated_gateway_a_connection_for_itself_alone(
    secured: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: dict[str, Client] = {}

    async def connect_and_keep(url: str, *, name: str, **options: Any) -> Client:
        opened[name] = await open_connection(url, name=name, **options)
        return opened[name]

    monkeypatch.setattr("gatefleet.simulate.connect", connect_and_keep)
    stop, ready = asyncio.Event(), asyncio.Event()
    simulation = asyncio.create_task(
        run_simulation(
            secured.url,
            3,
            ["eu-west"],
            prefix=PREFIX,
            interval_s=0.1,
            stop_event=stop,
            ready=ready,
            gateway_auth=gateway_auths(secured.settings, secured.data_dir),
        )
    )
    ids = [f"sim-eu-west-{n}" for n in (1, 2, 3)]
    try:
        await asyncio.wait_for(ready.wait(), WAIT)
        assert sorted(opened) == [f"gatefleet-simulator-{gid}" for gid in ids]
        with GatefleetClient(secured.url, prefix=PREFIX, auth=secured.client_auth) as client:

            def healthy() -> int:
                return client.status().gateways_healthy

            await asyncio.to_thread(
                wait_until, lambda: healthy() == 3, 10, "3 gateways healthy", healthy
            )
            # Each gateway's connection speaks for the next gateway: refused, and counted.
            for gid, other in zip(ids, [*ids[1:], ids[0]], strict=True):
                await opened[f"gatefleet-simulator-{gid}"].publish(
                    f"{PREFIX}.gw.{other}.heartbeat", b"{}"
                )

            def counted() -> dict[str, int]:
                return client.status().permission_violations

            every = {f"gateway:{gid}": 1 for gid in ids}
            await asyncio.to_thread(wait_until, lambda: counted() == every, 5, "3", counted)
            status = client.status()
            assert status.malformed_messages == {}  # none of the forged beats came through
            assert status.test_credentials == []  # no simulator credential was made
    finally:
        stop.set()
        summary = await simulation
    assert summary.publish_errors == 0
    assert secured.authority is not None
    issued = {u.name: u.kind for u in secured.authority.users()}
    assert issued == dict.fromkeys(ids, "gateway")


def test_simulate_per_gateway_creds_runs_three_gateways_on_their_own_credentials(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "gatefleet.toml"
    config.write_text(
        f'[bus]\nport = 0\ndata_dir = "{data}"\n[health]\nheartbeat_interval_ms = 200\n'
    )
    up = subprocess.Popen(
        [sys.executable, "-m", "gatefleet", "up", "--config", str(config)],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    simulate = None
    try:

        def managed() -> int:
            result = run_cli("status", "--config", str(config), "--json")
            return json.loads(result.stdout)["gateways_managed"] if result.returncode == 0 else -1

        wait_until(lambda: managed() == 0, timeout=30, what="gatefleet up", show=managed)
        command = ["simulate", "--config", str(config), "--count", "3", "--per-gateway-creds"]
        simulate = subprocess.Popen(
            [sys.executable, "-m", "gatefleet", *command],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        wait_until(lambda: managed() == 3, timeout=30, what="3 simulated gateways", show=managed)
        users = {u.name: u.kind for u in Authority(data).users()}
        assert users == {f"sim-{r}-1": "gateway" for r in ("us-west", "us-east", "eu-west")}
    finally:
        if simulate is not None:
            simulate.terminate()
            _, stderr = simulate.communicate(timeout=15)
            assert simulate.returncode == 0, stderr
        up.terminate()
        up.wait(timeout=15)


def test_simulate_per_gateway_creds_refuses_creds_and_needs_local_keys(tmp_path: Path) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\nauth = false\ndata_dir = "{tmp_path}"\n')
    no_keys = CliRunner().invoke(
        main, ["simulate", "--config", str(config), "--count", "1", "--per-gateway-creds"]
    )
    assert no_keys.exit_code == 2
    assert no_keys.output.strip() == (
        f"gatefleet: no gatefleet keys under {tmp_path} to issue gateway credentials from: "
        "run it on gatefleet's machine, with its --config"
    )
    with_creds = CliRunner().invoke(
        main,
        ["simulate", "--config", str(config), "--per-gateway-creds", "--creds", "x.creds"],
    )
    assert with_creds.exit_code == 2
    assert with_creds.output.strip() == (
        "gatefleet: --per-gateway-creds takes no --creds (nor GATEFLEET_CREDS)"
    )


def test_up_with_auth_serves_the_cli_with_the_admin_creds_it_finds(tmp_path: Path) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\nport = 0\ndata_dir = "{tmp_path / "data"}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "gatefleet", "up", "--config", str(config), "--simulate", "3"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:

        def managed() -> int:
            result = run_cli("status", "--config", str(config), "--json")
            return json.loads(result.stdout)["gateways_managed"] if result.returncode == 0 else -1

        wait_until(lambda: managed() == 3, timeout=30, what="3 simulated gateways", show=managed)
        url = (tmp_path / "data" / "nats.url").read_text().strip()
        assert run_cli("status", "--nats", url).returncode == 2  # no creds: refused
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert "auth = false" not in stderr


def test_up_with_auth_off_warns_once_and_refuses_a_public_listen(tmp_path: Path) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\nport = 0\nauth = false\ndata_dir = "{tmp_path}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "gatefleet", "up", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_until((tmp_path / "nats.url").exists, timeout=20, what="gatefleet up")
        url = (tmp_path / "nats.url").read_text().strip()
        # Open: no creds needed (the URL is written before the actors answer).
        wait_until(lambda: run_cli("status", "--nats", url).returncode == 0, 20, "status")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    assert [line for line in stderr.splitlines() if "WARNING" in line] == [
        line for line in stderr.splitlines() if "[bus] auth = false" in line
    ]
    assert stderr.count("[bus] auth = false") == 1
    config.write_text(
        f'[bus]\nport = 0\nauth = false\nlisten = "0.0.0.0"\ndata_dir = "{tmp_path}"\n'
    )
    result = run_cli("up", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "gatefleet: [bus] listen = '0.0.0.0' is not loopback: that needs [bus] auth = true"
    )
    config.write_text(f'[http]\nlisten = "0.0.0.0:0"\n[bus]\ndata_dir = "{tmp_path}"\n')
    result = run_cli("up", "--config", str(config))
    assert result.returncode == 2
    assert "not loopback: that needs [http] token" in result.stderr


# --- TLS ----------------------------------------------------------------------------------


def test_a_public_listen_gets_tls_from_a_generated_ca_that_clients_check(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    # Beyond loopback is what gets TLS; the test still connects on loopback only.
    public = "0.0.0.0"  # noqa: S104
    settings = msgspec.convert(
        {"bus": {"port": 0, "data_dir": str(data), "listen": public}}, Settings
    )
    orchestrator = Orchestrator(settings)
    orchestrator.start()  # its own connections check the server with the generated CA
    try:
        ca = data / "auth" / "tls" / "ca.pem"
        assert orchestrator.client_auth.tls_ca == str(ca)
        assert stat.S_IMODE((data / "auth" / "tls" / "server-key.pem").stat().st_mode) == 0o600
        admin = str(data / "auth" / "admin.creds")
        with GatefleetClient(orchestrator.url, auth=ClientAuth(admin, str(ca))) as client:
            assert client.status().status == "ok"
        unchecked = GatefleetClient(orchestrator.url, auth=ClientAuth(admin))
        with pytest.raises(Refused, match="TLS failed: CERTIFICATE_VERIFY_FAILED"):
            unchecked.connect()
        unchecked.close()
        config = tmp_path / "gatefleet.toml"
        config.write_text(f'[bus]\ndata_dir = "{data}"\nlisten = "0.0.0.0"\n')
        found = run_cli("status", "--config", str(config), "--json")  # finds creds and CA
        assert found.returncode == 0, found.stderr
        wrong_ca = run_cli(
            "status", "--nats", orchestrator.url, "--creds", admin, "--tls-ca", str(tmp_path)
        )
        assert wrong_ca.returncode == 2
        assert f"TLS CA file {tmp_path}: cannot use it" in wrong_ca.stderr
    finally:
        orchestrator.stop()


def test_a_tls_certificate_needs_its_key(tmp_path: Path) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text('[bus]\ntls_cert = "server.pem"\n')
    with pytest.raises(ConfigError, match=r"bus\.tls_key: needed with \[bus\] tls_cert"):
        load_settings(config)


# --- an external server set up with `gatefleet nats-config` -------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def external(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A nats-server configured as the README says: (its URL, the gatefleet config)."""
    out, state = tmp_path / "nats", tmp_path / "state"
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\ndata_dir = "{state}"\n')
    written = CliRunner().invoke(main, ["nats-config", "--config", str(config), "--out", str(out)])
    assert written.exit_code == 0, written.output
    port = free_port()
    (out / "server.conf").write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{\n  store_dir: "{tmp_path / "js"}"\n  sync_interval: always\n}}\n'
        "include gatefleet-auth.conf\n"
    )
    process = subprocess.Popen(
        [find_nats_server(), "-c", str(out / "server.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    config.write_text(
        f'[bus]\nurl = "{url}"\ncreds = "{out / "gatefleet.creds"}"\ndata_dir = "{state}"\n'
        'subject_prefix = "ext"\n[health]\nprobe_interval_ms = 0\n'
    )
    try:
        yield url, config
    finally:
        process.terminate()
        process.wait(10)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    def accepts() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(accepts, timeout, f"a server on port {port}")


async def test_an_external_server_from_nats_config_takes_the_same_credentials_and_revocations(
    external: tuple[str, Path], tmp_path: Path
) -> None:
    url, config = external
    await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]))
    orchestrator = Orchestrator(load_settings(config))
    await asyncio.to_thread(orchestrator.start)  # [bus] creds: the admin of nats-config
    try:
        creds = Authority(tmp_path / "state").issue("gateway", "edge-1", "ext")
        agent = await GatewayAgent.connect(url, "edge-1", "r1", prefix="ext", creds=str(creds))
        with GatefleetClient(url, prefix="ext", auth=orchestrator.client_auth) as client:
            await asyncio.to_thread(
                wait_until, lambda: client.status().gateways_managed == 1, 5, "edge-1 known"
            )
        revoke = ["credentials", "revoke", "edge-1", "--config", str(config)]
        revoked = await asyncio.to_thread(CliRunner().invoke, main, revoke)
        assert revoked.exit_code == 0, revoked.output
        assert "closed their connections" in revoked.output
        connection = agent.connection
        assert connection is not None
        await asyncio.to_thread(
            wait_until, lambda: not connection.is_connected, 5, "the revoked gateway cut off"
        )
        await agent.crash()
    finally:
        await asyncio.to_thread(orchestrator.stop)


# --- violations made visible ----------------------------------------------------------------


async def test_violations_are_counted_per_user_and_reported_once_in_a_while(
    secured: Orchestrator,
) -> None:
    assert secured.authority is not None
    events: asyncio.Queue[Msg] = asyncio.Queue()
    admin = await Conn().connect(secured.url, secured.authority.admin_creds)
    gw = await Conn().connect(secured.url, secured.authority.issue("gateway", "edge-1", PREFIX))
    try:
        await admin.nc.subscribe(f"{PREFIX}.events.security.violation", cb=events.put)
        await admin.nc.flush()
        for _ in range(3):
            await gw.nc.publish(f"{PREFIX}.gw.edge-2.heartbeat", b"{}")
            await gw.violation(f"{PREFIX}.gw.edge-2.heartbeat")
        event = json.loads((await asyncio.wait_for(events.get(), WAIT)).data)
        assert (event["user"], event["gateway_id"], event["count"]) == (
            "gateway:edge-1",
            "edge-1",
            1,
        )
        assert (event["operation"], event["subject"]) == (
            "publish",
            f"{PREFIX}.gw.edge-2.heartbeat",
        )
        secured.authority.issue("simulator", "lab", PREFIX)
        with GatefleetClient(secured.url, prefix=PREFIX, auth=secured.client_auth) as client:

            def counted() -> dict[str, int]:
                return client.status().permission_violations

            await asyncio.to_thread(
                wait_until, lambda: counted() == {"gateway:edge-1": 3}, 5, "3 counted", counted
            )
            assert client.status().test_credentials == ["simulator:lab"]
        api = HttpApi(access_log=False)
        address = await asyncio.to_thread(
            api.start, secured.url, PREFIX, "127.0.0.1", 0, "", auth=secured.client_auth
        )
        try:
            metrics = await asyncio.to_thread(Http(address).get, "/metrics")
        finally:
            await asyncio.to_thread(api.stop)
        line = 'gatefleet_permission_violations_total{user="gateway:edge-1"} 3'
        assert line in metrics.body.decode()
        await asyncio.sleep(0.2)
        assert events.empty()  # rate-limited: one event for the three
    finally:
        await close_connection(gw.nc)
        await close_connection(admin.nc)
