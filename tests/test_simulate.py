"""The fleet simulator against a real nats-server, observed with plain nats-py clients."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from gatefleet import simulate
from gatefleet.gateway import agent as agent_module
from gatefleet.simulate import (
    Faults,
    GatewayPlan,
    MetricsWalk,
    PushRecord,
    SimulationSummary,
    assign_faults,
    plan_gateways,
    run_simulation,
    run_simulation_blocking,
)
from schemas.codec import decode, encode
from schemas.wire import ConfigAck, ConfigPush, Heartbeat, Pong

FAST = 0.05  # heartbeat interval in most of these tests
WAIT = 5.0  # generous ceiling for anything we wait on
NO_ANSWER = 0.3  # how long a request waits to conclude that nobody answers


@pytest.fixture
def subjects(prefix: str) -> Subjects:
    return Subjects(prefix)


@pytest.fixture
async def nc(nats_server: EmbeddedServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


class Watcher:
    """Heartbeats (or goodbyes) seen per gateway id; tests wait on it, never sleep."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[bytes]] = defaultdict(list)
        self.messages = 0
        self._changed = asyncio.Event()

    @property
    def ids(self) -> set[str]:
        return set(self.by_id)

    async def on_msg(self, msg: Msg) -> None:
        self.messages += 1
        self.by_id[msg.subject.split(".")[2]].append(msg.data)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], within: float = WAIT) -> None:
        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), within)

    async def reached(self, n: int) -> None:
        await self.until(lambda: len(self.by_id) >= n)

    def beats(self, gateway_id: str) -> list[Heartbeat]:
        return [decode(data, Heartbeat) for data in self.by_id[gateway_id]]

    async def next_beat(self, gateway_id: str) -> Heartbeat:
        seen = len(self.by_id[gateway_id])
        await self.until(lambda: len(self.by_id[gateway_id]) > seen)
        return decode(self.by_id[gateway_id][seen], Heartbeat)


async def watch(nc: Client, subject: str) -> Watcher:
    watcher = Watcher()
    await nc.subscribe(subject, cb=watcher.on_msg)
    await nc.flush()
    return watcher


class Running:
    """A simulation running in the test's loop, stopped (with goodbyes) on exit."""

    def __init__(self, url: str, count: int, regions: list[str], **kw: Any) -> None:
        kw.setdefault("interval_s", FAST)
        self.stop, self.ready = asyncio.Event(), asyncio.Event()
        self._call = run_simulation(
            url, count, regions, stop_event=self.stop, ready=self.ready, **kw
        )
        self.summary: SimulationSummary | None = None

    async def __aenter__(self) -> Running:
        self._task = asyncio.create_task(self._call)
        await asyncio.wait_for(self.ready.wait(), WAIT)
        return self

    async def finish(self) -> SimulationSummary:
        self.stop.set()
        self.summary = await asyncio.wait_for(self._task, WAIT)
        return self.summary

    async def __aexit__(self, *exc: object) -> None:
        if self.summary is None:
            await self.finish()


async def push(
    nc: Client, subjects: Subjects, gw: str, version: int, within: float = WAIT, **kw: Any
) -> ConfigAck:
    body = ConfigPush(
        distribution_id=kw.pop("distribution_id", "dist-1"),
        config_type=kw.pop("config_type", "Route"),
        version=version,
        config_data=kw.pop("config_data", {"routes": []}),
        **kw,
    )
    reply = await nc.request(subjects.config(gw), encode(body), timeout=within)
    return decode(reply.data, ConfigAck)


async def ping(nc: Client, subjects: Subjects, gw: str, within: float = WAIT) -> Pong:
    reply = await nc.request(subjects.ping(gw), b"{}", timeout=within)
    return decode(reply.data, Pong)


# Planning (no server) ---------------------------------------------------------------------


def test_plan_is_deterministic_with_backups_per_region() -> None:
    plans = plan_gateways(30, ["us-west", "us-east", "eu west"], seed=3)
    assert plans == plan_gateways(30, ["us-west", "us-east", "eu west"], seed=3)
    assert len({p.gateway_id for p in plans}) == 30
    assert plans[0].gateway_id == "sim-us-west-1"
    assert plans[2].gateway_id == "sim-eu-west-1"
    backups = [p for p in plans if p.role == "backup"]
    assert [(b.gateway_id, b.backup_for) for b in backups if b.region == "us-west"] == [
        ("sim-us-west-5", "sim-us-west-4"),
        ("sim-us-west-10", "sim-us-west-9"),
    ]
    assert all(p.max_connections in (500, 750, 1000) for p in plans)


def test_metrics_walk_is_seeded_and_bounded() -> None:
    walk, same = MetricsWalk(1, "gw", 1000), MetricsWalk(1, "gw", 1000)
    samples = [walk() for _ in range(500)]
    assert samples == [same() for _ in range(500)]
    assert all(5 <= m.cpu_percent <= 95 and 20 <= m.memory_percent <= 90 for m in samples)
    assert all(0 <= m.active_connections <= 1000 for m in samples)
    assert all(m.latency_ms is not None and 1 <= m.latency_ms <= 80 for m in samples)
    assert len({m.cpu_percent for m in samples}) > 50  # it does move
    other = MetricsWalk(1, "gw2", 1000)
    assert [other() for _ in range(500)] != samples  # each gateway walks its own way


def test_fault_shares_are_exact_and_seeded() -> None:
    ids = [f"g{i}" for i in range(50)]
    chosen = assign_faults(ids, Faults(fail_acks=0.2, crash=0.1), seed=5)
    assert chosen == assign_faults(ids, Faults(fail_acks=0.2, crash=0.1), seed=5)
    assert (len(chosen["fail_acks"]), len(chosen["crash"])) == (10, 5)
    assert "silent" not in chosen
    with pytest.raises(ValueError, match="within 0-1"):
        Faults(flap=1.5)


def test_spliced_heartbeat_bytes_are_a_valid_heartbeat() -> None:
    plan = GatewayPlan("sim-eu-west-5", 'eu "west"', "backup", "sim-eu-west-4", 750)
    gw = simulate._Gateway(plan, "p", seed=2, nc=Client())  # never connected: not used
    walk = MetricsWalk(2, plan.gateway_id, 750)  # the same seeded walk, stepped alongside
    first = decode(gw.heartbeat(b"2026-11-28T07:00:00.123Z"), Heartbeat)
    metrics = walk()
    assert first == Heartbeat(
        gateway_id="sim-eu-west-5",
        region='eu "west"',
        seq=1,
        ts=datetime(2026, 11, 28, 7, 0, 0, 123000, tzinfo=UTC),
        cpu_percent=metrics.cpu_percent,
        memory_percent=metrics.memory_percent,
        active_connections=metrics.active_connections,
        latency_ms=metrics.latency_ms,
        max_connections=750,
        role="backup",
        backup_for="sim-eu-west-4",
        config_versions={},
        labels={"simulated": "true"},
    )
    push_body = ConfigPush(distribution_id="dist-a", config_type="Route", version=3, config_data={})
    assert simulate._answer(gw, push_body).applied
    ts = simulate._rfc3339(time.time())
    second = decode(gw.heartbeat(ts), Heartbeat)
    assert (second.seq, second.config_versions) == (2, {"Route": 3})
    assert abs(second.ts - datetime.now(UTC)) < timedelta(seconds=5)


# A running fleet --------------------------------------------------------------------------


@pytest.fixture
def count_connections(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    opened: list[str] = []
    real_connect = agent_module.connect

    async def counting(url: str, **kw: Any) -> Client:
        opened.append(url)
        return await real_connect(url, **kw)

    monkeypatch.setattr("gatefleet.simulate.connect", counting)
    return lambda: len(opened)


async def test_simulation_of_50_gateways_on_one_connection(
    nats_server: EmbeddedServer,
    nc: Client,
    subjects: Subjects,
    count_connections: Callable[[], int],
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    goodbyes = await watch(nc, subjects.all_goodbyes)
    regions = ["us-west", "us-east", "eu-west"]
    async with Running(nats_server.url, 50, regions, prefix=subjects.prefix, seed=7) as sim:
        await beats.reached(50)
        summary = await sim.finish()
    await goodbyes.reached(50)
    assert count_connections() == 1
    assert beats.ids == {p.gateway_id for p in plan_gateways(50, regions, seed=7)}
    assert goodbyes.ids == beats.ids
    assert all(decode(g[0], Pong).gateway_id == gid for gid, g in goodbyes.by_id.items())
    assert (summary.gateways, summary.backups) == (50, 9)  # 17 + 17 + 16 per region
    await nc.flush()
    assert summary.heartbeats_sent == beats.messages >= 50
    assert summary.cpu_s > 0


async def test_heartbeats_decode_with_the_right_ids_and_increasing_seq(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    plans = {p.gateway_id: p for p in plan_gateways(10, ["r1", "r2"], seed=3)}
    async with Running(nats_server.url, 10, ["r1", "r2"], prefix=subjects.prefix, seed=3):
        await beats.until(lambda: len(beats.ids) == 10 and min(map(len, beats.by_id.values())) >= 3)
    for gid, plan in plans.items():
        got = beats.beats(gid)
        assert [b.seq for b in got] == list(range(1, len(got) + 1))
        assert {(b.gateway_id, b.region, b.role, b.backup_for, b.max_connections) for b in got} == {
            (gid, plan.region, plan.role, plan.backup_for, plan.max_connections)
        }
        assert all(b.labels == {"simulated": "true"} for b in got)
        assert all(abs(b.ts - datetime.now(UTC)) < timedelta(seconds=WAIT) for b in got)


async def test_pings_answered_for_simulated_ids_only(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    faults = Faults(crash=0.5, after_s=0.0)
    async with Running(nats_server.url, 4, ["r1"], prefix=subjects.prefix, faults=faults) as sim:
        await beats.reached(2)  # the survivors
        chosen = assign_faults([f"sim-r1-{n}" for n in range(1, 5)], faults, 0)["crash"]
        alive = sorted({f"sim-r1-{n}" for n in range(1, 5)} - set(chosen))
        for gid in alive:
            assert (await ping(nc, subjects, gid)).gateway_id == gid
        for gid in [*chosen, "sim-r1-99", "edge-1"]:
            with pytest.raises(nats.errors.TimeoutError):
                await ping(nc, subjects, gid, within=NO_ANSWER)
        summary = await sim.finish()
    assert summary.pings_answered == 2
    assert beats.ids == set(alive)


async def test_config_push_acked_applied_once_and_reported_in_heartbeats(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    records: list[PushRecord] = []
    async with Running(
        nats_server.url, 2, ["r1"], prefix=subjects.prefix, record=records.append
    ) as sim:
        ack = await push(nc, subjects, "sim-r1-1", 7, distribution_id="dist-a")
        assert ack == ConfigAck(distribution_id="dist-a", gateway_id="sim-r1-1", ok=True, version=7)
        # A repeat (even with another body) is acked again and not applied again.
        again = await push(nc, subjects, "sim-r1-1", 7, distribution_id="dist-a", config_type="Acl")
        assert again == ack
        beat = await beats.next_beat("sim-r1-1")
        assert beat.config_versions == {"Route": 7}
        # An older version is refused as stale, with the version held, and not applied.
        stale = await push(nc, subjects, "sim-r1-1", 3, distribution_id="dist-b")
        assert stale == ConfigAck(
            distribution_id="dist-b",
            gateway_id="sim-r1-1",
            ok=False,
            version=3,
            error="stale_version",
            held_version=7,
        )
        assert (await beats.next_beat("sim-r1-1")).config_versions == {"Route": 7}
        assert (await beats.next_beat("sim-r1-2")).config_versions == {}
        summary = await sim.finish()
    assert summary.config_pushes == 3
    # Each push answered is recorded: applied only the first time per distribution.
    assert [(r.distribution_id, r.version, r.applied, r.ok, r.sent) for r in records] == [
        ("dist-a", 7, True, True, True),
        ("dist-a", 7, False, True, True),
        ("dist-b", 3, False, False, True),
    ]


async def test_a_push_of_an_epoch_below_the_highest_seen_is_refused_as_stale(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    """As GatewayAgent: the highest epoch of any type's push fences the lower ones; a push
    without an epoch is not fenced; each gateway keeps its own."""
    records: list[PushRecord] = []
    async with Running(
        nats_server.url, 2, ["r1"], prefix=subjects.prefix, record=records.append
    ) as sim:
        high = await push(nc, subjects, "sim-r1-1", 1, distribution_id="dist-a", epoch=20)
        lower = await push(
            nc, subjects, "sim-r1-1", 1, distribution_id="dist-b", config_type="Acl", epoch=19
        )
        equal = await push(nc, subjects, "sim-r1-1", 2, distribution_id="dist-c", epoch=20)
        unfenced = await push(nc, subjects, "sim-r1-1", 3, distribution_id="dist-d")
        elsewhere = await push(nc, subjects, "sim-r1-2", 1, distribution_id="dist-b", epoch=19)
        await sim.finish()
    assert lower == ConfigAck(
        distribution_id="dist-b",
        gateway_id="sim-r1-1",
        ok=False,
        version=1,
        error="stale_epoch",
        held_epoch=20,
    )
    assert [(a.ok, a.held_epoch) for a in (high, equal, unfenced, elsewhere)] == [(True, None)] * 4
    assert [(r.gateway_id, r.distribution_id, r.applied) for r in records] == [
        ("sim-r1-1", "dist-a", True),
        ("sim-r1-1", "dist-b", False),
        ("sim-r1-1", "dist-c", True),
        ("sim-r1-1", "dist-d", True),
        ("sim-r1-2", "dist-b", True),
    ]


async def test_fail_silent_and_slow_acks(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    ids = [f"sim-r1-{n}" for n in range(1, 11)]
    faults = Faults(fail_acks=0.2, silent=0.2, slow_acks=0.2, slow_ack_s=0.4)
    chosen = assign_faults(ids, faults, seed=1)
    assert chosen == {
        "slow_acks": ["sim-r1-3", "sim-r1-4"],
        "fail_acks": ["sim-r1-5", "sim-r1-7"],
        "silent": ["sim-r1-4", "sim-r1-8"],  # silent wins over slow on sim-r1-4
    }
    failing, silent, slow, healthy = "sim-r1-5", "sim-r1-8", "sim-r1-3", "sim-r1-1"
    beats = await watch(nc, subjects.all_heartbeats)
    async with Running(nats_server.url, 10, ["r1"], prefix=subjects.prefix, faults=faults, seed=1):
        nack = await push(nc, subjects, failing, 2)
        assert (nack.ok, nack.error, nack.version) == (False, "injected failure (fail_acks)", 2)
        with pytest.raises(nats.errors.TimeoutError):
            await push(nc, subjects, silent, 2, within=NO_ANSWER)
        started = time.monotonic()
        slow_ack = asyncio.create_task(push(nc, subjects, slow, 2))
        # A slow gateway holds up nobody else's answers.
        assert (await push(nc, subjects, healthy, 2)).ok
        assert time.monotonic() - started < 0.3
        assert (await slow_ack).ok
        assert time.monotonic() - started >= 0.4
        assert (await beats.next_beat(failing)).config_versions == {}
        assert (await beats.next_beat(slow)).config_versions == {"Route": 2}


async def test_simulated_crashes_send_no_goodbye(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    goodbyes = await watch(nc, subjects.all_goodbyes)
    faults = Faults(crash=0.3, after_s=0.0)
    summary = await run_simulation(
        nats_server.url,
        10,
        ["r1"],
        prefix=subjects.prefix,
        interval_s=0.1,
        seed=1,
        faults=faults,
        duration_s=0.5,
    )
    crashed = set(summary.faulty["crash"])
    assert len(crashed) == 3
    await goodbyes.reached(7)
    await nc.flush()
    assert goodbyes.ids.isdisjoint(crashed)


async def test_crashed_restart_from_seq_1_and_stopped_beat_again(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    ids = [f"sim-r1-{n}" for n in range(1, 5)]
    faults = Faults(crash=0.25, stop_beating=0.25, after_s=0.3, recover_after_s=0.3)
    chosen = assign_faults(ids, faults, 0)
    (crasher,), (stopper,) = chosen["crash"], chosen["stop_beating"]
    beats = await watch(nc, subjects.all_heartbeats)
    async with Running(nats_server.url, 4, ["r1"], prefix=subjects.prefix, faults=faults):
        await beats.until(lambda: any(b.seq == 1 for b in beats.beats(crasher)[1:]))
        await beats.until(lambda: len(beats.by_id[stopper]) >= 12)
    crashed = [b.seq for b in beats.beats(crasher)]
    restart = crashed.index(1, 1)
    assert crashed == [*range(1, restart + 1), *range(1, len(crashed) - restart + 1)]
    stopped = beats.beats(stopper)
    assert [b.seq for b in stopped] == list(range(1, len(stopped) + 1))
    gaps = [(b.ts - a.ts).total_seconds() for a, b in itertools.pairwise(stopped)]
    assert max(gaps) >= 0.25  # it did stop for a while


async def test_flapping_gateway_pauses_and_resumes(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    faults = Faults(flap=0.5, flap_period_s=0.25)
    (flapper,) = assign_faults(["sim-r1-1", "sim-r1-2"], faults, 0)["flap"]
    beats = await watch(nc, subjects.all_heartbeats)
    async with Running(nats_server.url, 2, ["r1"], prefix=subjects.prefix, faults=faults):
        await beats.until(lambda: len(beats.by_id[flapper]) >= 8)  # 2 periods on, 1 off
        got = beats.beats(flapper)
    gaps = [(b.ts - a.ts).total_seconds() for a, b in itertools.pairwise(got)]
    assert max(gaps) >= 0.2
    assert [b.seq for b in got] == list(range(1, len(got) + 1))


async def test_a_stalled_loop_skips_beats_instead_of_bursting(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    async with Running(nats_server.url, 20, ["r1"], prefix=subjects.prefix, interval_s=0.1) as s:
        await beats.reached(20)
        time.sleep(0.35)  # noqa: ASYNC251 - on purpose: a stalled loop, 3.5 intervals
        before = beats.messages
        await beats.until(lambda: beats.messages >= before + 20)
        summary = await s.finish()
    assert summary.heartbeats_skipped >= 40
    # The beats that were due during the stall were not sent late in a burst.
    per_id = [len(v) for v in beats.by_id.values()]
    assert max(per_id) - min(per_id) <= 2


async def test_2000_gateways_each_beat_once_per_interval(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    summary = await run_simulation(
        nats_server.url, 2000, ["r1", "r2", "r3"], prefix=subjects.prefix, duration_s=3.2
    )
    await nc.flush()
    assert len(beats.ids) == 2000
    counts = sorted(len(v) for v in beats.by_id.values())
    assert counts[0] >= 2, counts[:5]
    assert counts[-1] <= 4, counts[-5:]
    assert sum(counts) / len(counts) == pytest.approx(3.2, abs=0.3)
    assert summary.heartbeats_sent == beats.messages
    # Every beat that fell due was sent or, on a loop that stalled (a busy machine), skipped
    # and counted: none is lost unaccounted (the last slots may still be running at the end).
    due = 2000 * 3.2
    assert summary.heartbeats_sent + summary.heartbeats_skipped == pytest.approx(due, rel=0.05)


async def test_blocking_simulation_in_a_thread_stops_cleanly(
    nats_server: EmbeddedServer, nc: Client, subjects: Subjects
) -> None:
    beats = await watch(nc, subjects.all_heartbeats)
    goodbyes = await watch(nc, subjects.all_goodbyes)
    stop = threading.Event()
    result: list[SimulationSummary] = []

    def run() -> None:
        result.append(
            run_simulation_blocking(
                nats_server.url, 5, ["r1", "r2"], stop=stop, prefix=subjects.prefix, interval_s=0.1
            )
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        await beats.reached(5)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, WAIT)
    assert not thread.is_alive()
    await goodbyes.reached(5)
    assert result[0].gateways == 5
    assert result[0].cpu_s > 0


def test_a_server_gone_while_the_simulation_stops_ends_it_without_a_traceback(
    tmp_path: Path,
) -> None:
    """`gatefleet up --simulate` stopped by a signal that also reaches the nats-server:
    closing a connection whose server just died must not raise (nats-py can, with uvloop)."""
    server = EmbeddedServer(tmp_path, port=0)
    server.start()
    stop, ran = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            run_simulation_blocking(server.url, 20, ["r1"], stop=stop, interval_s=0.05)
        except BaseException as exc:
            failures.append(exc)
        finally:
            ran.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        bus = Bus(server.url, use_uvloop=False)
        bus.start()
        seen = threading.Event()
        bus.subscribe("gatefleet.gw.*.heartbeat", lambda _msg: seen.set())
        assert seen.wait(WAIT), "the simulation never beat"
        bus.stop()
        server.kill()
        stop.set()
        assert ran.wait(WAIT)
    finally:
        stop.set()
        thread.join(WAIT)
        server.stop()
    assert failures == []
