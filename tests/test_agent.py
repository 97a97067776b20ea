"""GatewayAgent against a real nats-server, observed with plain nats-py."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.connection import BusError
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from gatefleet.gateway import ConfigResult, GatewayAgent, Metrics
from gatefleet.gateway import agent as agent_module
from schemas.codec import decode, encode
from schemas.wire import ConfigAck, ConfigPush, Goodbye, Heartbeat, Pong

FAST = 0.05  # heartbeat interval in these tests
WAIT = 5.0  # generous ceiling for anything we wait on
_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(Path(tmp_path_factory.mktemp("nats")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def subjects() -> Subjects:
    """A fresh prefix per test, so no test sees another's traffic."""
    return Subjects(f"t{next(_prefixes)}")


@pytest.fixture
async def nc(server: EmbeddedServer) -> AsyncIterator[Client]:
    client = await nats.connect(server.url)
    yield client
    await client.close()


async def listen(nc: Client, subject: str) -> asyncio.Queue[Msg]:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        queue.put_nowait(msg)

    await nc.subscribe(subject, cb=put)
    await nc.flush()
    return queue


async def next_msg(queue: asyncio.Queue[Msg]) -> Msg:
    return await asyncio.wait_for(queue.get(), WAIT)


async def next_beat(queue: asyncio.Queue[Msg]) -> Heartbeat:
    return decode((await next_msg(queue)).data, Heartbeat)


async def push(nc: Client, subjects: Subjects, gw: str, version: int, **kw: Any) -> ConfigAck:
    body = ConfigPush(
        distribution_id=kw.pop("distribution_id", "dist-1"),
        config_type=kw.pop("config_type", "Route"),
        version=version,
        config_data=kw.pop("config_data", {"routes": []}),
        **kw,
    )
    reply = await nc.request(subjects.config(gw), encode(body), timeout=WAIT)
    return decode(reply.data, ConfigAck)


def make_agent(nc: Client, subjects: Subjects, gw: str = "edge-1", **kw: Any) -> GatewayAgent:
    kw.setdefault("metrics", lambda: Metrics(35.5, 61.0, 120, 12.5, 1000))
    return GatewayAgent(nc, gw, "us-west", prefix=subjects.prefix, interval_s=FAST, **kw)


@pytest.fixture
async def running(nc: Client, subjects: Subjects) -> AsyncIterator[GatewayAgent]:
    agent = make_agent(nc, subjects, role="primary", labels={"az": "a"})
    await agent.start()
    yield agent
    await agent.stop()


def pending_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if not t.done() and t is not asyncio.current_task()}


# Heartbeats -------------------------------------------------------------------------------


async def test_heartbeats_have_increasing_seq_and_valid_schema(
    nc: Client, subjects: Subjects
) -> None:
    beats = await listen(nc, subjects.all_heartbeats)
    agent = make_agent(nc, subjects, role="primary", labels={"az": "a"})
    await agent.start()
    try:
        msgs = [await next_msg(beats) for _ in range(3)]
    finally:
        await agent.stop()
    assert {m.subject for m in msgs} == {subjects.heartbeat("edge-1")}
    decoded = [decode(m.data, Heartbeat) for m in msgs]
    assert [b.seq for b in decoded] == [1, 2, 3]
    first = decoded[0]
    assert (first.gateway_id, first.region, first.role, first.labels) == (
        "edge-1",
        "us-west",
        "primary",
        {"az": "a"},
    )
    assert (first.cpu_percent, first.memory_percent, first.active_connections) == (35.5, 61.0, 120)
    assert (first.latency_ms, first.max_connections) == (12.5, 1000)
    assert abs(datetime.now(UTC) - first.ts) < timedelta(seconds=WAIT)


async def test_out_of_range_metrics_are_clamped(nc: Client, subjects: Subjects) -> None:
    beats = await listen(nc, subjects.all_heartbeats)
    agent = make_agent(nc, subjects, metrics=lambda: Metrics(130.0, -4.0, -1, -2.0))
    await agent.start()
    try:
        beat = await next_beat(beats)
    finally:
        await agent.stop()
    assert (beat.cpu_percent, beat.memory_percent, beat.active_connections) == (100.0, 0.0, 0)
    assert beat.latency_ms == 0.0


async def test_pause_and_resume_heartbeats(
    nc: Client, subjects: Subjects, running: GatewayAgent
) -> None:
    beats = await listen(nc, subjects.heartbeat("edge-1"))
    await next_beat(beats)
    running.pause_heartbeats()
    sent = running.beats_sent
    await asyncio.sleep(FAST * 4)  # asserting an absence needs some time to pass
    assert running.beats_sent == sent
    pong = await nc.request(subjects.ping("edge-1"), b"{}", timeout=WAIT)  # still answering
    assert decode(pong.data, Pong).gateway_id == "edge-1"
    running.resume_heartbeats()
    while (beat := await next_beat(beats)).seq <= sent:
        pass  # beats published before the pause
    assert beat.seq == sent + 1


async def test_restart_starts_seq_over(
    nc: Client, subjects: Subjects, running: GatewayAgent
) -> None:
    beats = await listen(nc, subjects.heartbeat("edge-1"))
    while (await next_beat(beats)).seq < 3:
        pass
    await running.restart()
    previous = 3
    while (beat := await next_beat(beats)).seq > previous:
        previous = beat.seq  # beats from before the restart
    assert beat.seq == 1
    assert (await next_beat(beats)).seq == 2


# Ping and config --------------------------------------------------------------------------


async def test_ping_answered_with_gateway_id(
    nc: Client, subjects: Subjects, running: GatewayAgent
) -> None:
    reply = await nc.request(subjects.ping("edge-1"), b"{}", timeout=WAIT)
    assert decode(reply.data, Pong) == Pong(gateway_id="edge-1")


async def test_config_acked_and_version_reported_in_heartbeats(
    nc: Client, subjects: Subjects
) -> None:
    applied: list[ConfigPush] = []

    async def on_config(p: ConfigPush) -> None:
        applied.append(p)

    agent = make_agent(nc, subjects, on_config=on_config, config_versions={"Route": 7})
    await agent.start()
    try:
        beats = await listen(nc, subjects.heartbeat("edge-1"))
        ack = await push(nc, subjects, "edge-1", 8, config_data={"routes": ["a"]})
        assert ack == ConfigAck(
            distribution_id="dist-1", gateway_id="edge-1", ok=True, version=8, error=None
        )
        while (await next_beat(beats)).config_versions != {"Route": 8}:
            pass
    finally:
        await agent.stop()
    assert [p.config_data for p in applied] == [{"routes": ["a"]}]


async def test_a_version_lower_than_the_one_held_is_refused_as_stale(
    nc: Client, subjects: Subjects
) -> None:
    applied: list[ConfigPush] = []
    agent = make_agent(nc, subjects, on_config=applied.append, config_versions={"Route": 7})
    await agent.start()
    try:
        older = await push(nc, subjects, "edge-1", 5, distribution_id="dist-old")
        again = await push(nc, subjects, "edge-1", 5, distribution_id="dist-old", attempt=2)
        other_type = await push(nc, subjects, "edge-1", 5, config_type="Firewall")
        same = await push(nc, subjects, "edge-1", 7, distribution_id="dist-same")
    finally:
        await agent.stop()
    stale = ConfigAck(
        distribution_id="dist-old",
        gateway_id="edge-1",
        ok=False,
        version=5,
        error="stale_version",
        held_version=7,
    )
    assert older == again == stale
    assert (other_type.ok, other_type.held_version) == (True, None)
    assert (same.ok, same.held_version) == (True, None)  # not lower: applied
    assert [(p.config_type, p.version) for p in applied] == [("Firewall", 5), ("Route", 7)]
    assert agent.config_versions == {"Route": 7, "Firewall": 5}  # never goes backwards


async def test_an_epoch_lower_than_the_highest_seen_is_refused_as_stale(
    nc: Client, subjects: Subjects
) -> None:
    """Fencing: the highest epoch of any type's push wins; equal and higher ones are
    answered as ever, a push without an epoch is not fenced, and a restart forgets nothing."""
    applied: list[ConfigPush] = []
    agent = make_agent(nc, subjects, on_config=applied.append)
    await agent.start()
    try:
        first = await push(nc, subjects, "edge-1", 1, distribution_id="dist-a", epoch=10)
        lower = await push(
            nc, subjects, "edge-1", 1, distribution_id="dist-b", epoch=5, config_type="Firewall"
        )
        repeat = await push(nc, subjects, "edge-1", 1, distribution_id="dist-a", epoch=5)
        equal = await push(nc, subjects, "edge-1", 2, distribution_id="dist-c", epoch=10)
        higher = await push(
            nc, subjects, "edge-1", 1, distribution_id="dist-b", epoch=11, config_type="Firewall"
        )
        unfenced = await push(nc, subjects, "edge-1", 3, distribution_id="dist-d")
        await agent.restart()
        after_restart = await push(nc, subjects, "edge-1", 4, distribution_id="dist-e", epoch=10)
    finally:
        await agent.stop()
    assert [a.ok for a in (first, equal, higher, unfenced)] == [True] * 4
    assert {a.held_epoch for a in (first, equal, higher, unfenced)} == {None}
    assert lower == ConfigAck(
        distribution_id="dist-b",
        gateway_id="edge-1",
        ok=False,
        version=1,
        error="stale_epoch",
        held_epoch=10,
    )
    assert (repeat.ok, repeat.error, repeat.held_epoch) == (False, "stale_epoch", 10)
    assert (after_restart.ok, after_restart.error, after_restart.held_epoch) == (
        False,
        "stale_epoch",
        11,
    )
    assert [(p.distribution_id, p.epoch) for p in applied] == [
        ("dist-a", 10),
        ("dist-c", 10),
        ("dist-b", 11),
        ("dist-d", None),
    ]
    assert agent.highest_epoch == 11
    assert agent.config_versions == {"Route": 3, "Firewall": 1}


async def test_rejection_from_on_config_is_a_nack(nc: Client, subjects: Subjects) -> None:
    agent = make_agent(nc, subjects, on_config=lambda p: ConfigResult.reject("bad route"))
    await agent.start()
    try:
        ack = await push(nc, subjects, "edge-1", 3)
    finally:
        await agent.stop()
    assert (ack.ok, ack.error, ack.version) == (False, "bad route", 3)
    assert agent.config_versions == {}


async def test_exception_in_on_config_is_a_nack(nc: Client, subjects: Subjects) -> None:
    def broken(p: ConfigPush) -> None:
        raise ValueError("no such upstream")

    agent = make_agent(nc, subjects, on_config=broken)
    await agent.start()
    try:
        ack = await push(nc, subjects, "edge-1", 3)
    finally:
        await agent.stop()
    assert (ack.ok, ack.error) == (False, "ValueError: no such upstream")


async def test_fail_acks_nacks_without_applying(nc: Client, subjects: Subjects) -> None:
    calls: list[ConfigPush] = []
    agent = make_agent(nc, subjects, on_config=calls.append)
    agent.fail_acks = True
    await agent.start()
    try:
        nack = await push(nc, subjects, "edge-1", 2)
        agent.fail_acks = False  # an injected failure is not remembered
        ack = await push(nc, subjects, "edge-1", 2, attempt=2)
    finally:
        await agent.stop()
    assert not nack.ok
    assert nack.error
    assert ack.ok
    assert len(calls) == 1


async def test_repeated_push_is_acked_again_without_reapplying(
    nc: Client, subjects: Subjects
) -> None:
    calls: list[ConfigPush] = []
    agent = make_agent(nc, subjects, on_config=calls.append)
    await agent.start()
    try:
        first = await push(nc, subjects, "edge-1", 4)
        again = await push(nc, subjects, "edge-1", 4, attempt=2)
    finally:
        await agent.stop()
    assert first == again
    assert first.ok
    assert len(calls) == 1
    assert [p.attempt for _, p in agent.received] == [1, 2]


async def test_silent_config_never_answers(
    nc: Client, subjects: Subjects, running: GatewayAgent
) -> None:
    running.silent_config = True
    body = ConfigPush(distribution_id="dist-1", config_type="Route", version=1, config_data={})
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subjects.config("edge-1"), encode(body), timeout=0.3)
    assert len(running.received) == 1


async def test_malformed_push_gets_no_answer(
    nc: Client, subjects: Subjects, running: GatewayAgent
) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subjects.config("edge-1"), b'{"version": "x"}', timeout=0.3)
    assert running.malformed_pushes == 1
    assert (await push(nc, subjects, "edge-1", 1)).ok  # and it still works


async def test_slow_acks_wait_ack_delay(
    nc: Client, subjects: Subjects, running: GatewayAgent
) -> None:
    running.ack_delay_s = 0.2
    started = time.monotonic()
    assert (await push(nc, subjects, "edge-1", 1)).ok
    assert time.monotonic() - started >= 0.2


# Life cycle -------------------------------------------------------------------------------


async def test_stop_says_goodbye_and_leaves_no_tasks(nc: Client, subjects: Subjects) -> None:
    goodbyes = await listen(nc, subjects.all_goodbyes)
    before = pending_tasks()
    agent = make_agent(nc, subjects)
    await agent.start()
    assert agent.running
    await agent.stop()
    msg = await next_msg(goodbyes)
    assert msg.subject == subjects.goodbye("edge-1")
    assert decode(msg.data, Goodbye) == Goodbye(gateway_id="edge-1")
    assert pending_tasks() == before
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(subjects.ping("edge-1"), b"{}", timeout=WAIT)


async def test_crash_sends_no_goodbye(nc: Client, subjects: Subjects) -> None:
    goodbyes = await listen(nc, subjects.all_goodbyes)
    agent = make_agent(nc, subjects)
    await agent.start()
    await agent.crash()
    # Same connection, so a goodbye published by the crash would arrive before this marker.
    await nc.publish(subjects.goodbye("marker"), b"{}")
    assert (await next_msg(goodbyes)).subject == subjects.goodbye("marker")
    assert not agent.running


async def test_agent_with_its_own_connection(
    server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    goodbyes = await listen(nc, subjects.all_goodbyes)
    agent = await GatewayAgent.connect(
        server.url, "own-1", "eu-west", prefix=subjects.prefix, interval_s=FAST
    )
    own = agent.connection
    assert own is not None
    assert own is not nc
    reply = await nc.request(subjects.ping("own-1"), b"{}", timeout=WAIT)
    assert decode(reply.data, Pong).gateway_id == "own-1"
    await agent.stop()
    assert decode((await next_msg(goodbyes)).data, Goodbye).gateway_id == "own-1"
    assert own.is_closed


async def test_connect_failure_is_a_bus_error() -> None:
    with pytest.raises(BusError):
        await agent_module.connect("nats://127.0.0.1:1", connect_timeout_s=0.5)


def test_invalid_ids_are_refused(nc: Client) -> None:
    with pytest.raises(ValueError, match="invalid gateway id"):
        GatewayAgent(nc, "edge.1", "us-west")
    with pytest.raises(ValueError, match="invalid gateway id"):
        GatewayAgent(nc, "edge-1", "us-west", backup_for="a>")


def test_the_documented_old_import_path_still_works() -> None:
    """0.1.0's README documented `bus.agent.GatewayAgent`; the library moved."""
    from bus import agent as old  # noqa: PLC0415 - the path under test

    assert old.GatewayAgent is GatewayAgent
    assert old.ConfigResult is ConfigResult
