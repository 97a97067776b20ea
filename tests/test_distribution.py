"""Configuration distribution end to end: a real nats-server, the orchestrator, and
GatewayAgents answering `P.gw.<id>.config`, driven through the public subjects
(PROTOCOL.md: `P.api.distribute`, `P.api.distributions.get|list`, `P.api.status`,
`P.events.>`). Timings are short (ack timeout 250 ms, retry delay 100 ms); tests wait on
events and conditions, never on bare sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.distribution import read_answer
from bus.edge import Drops
from bus.jetstream import KvStore, bucket_name
from bus.runtime import Bus, Inbound, Reply, RequestFailed
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.client import BadRequest, GatefleetClient, NotFound
from gatefleet.gateway import ConfigResult, GatewayAgent
from schemas.api import Rollout
from schemas.codec import decode, encode
from schemas.settings import Settings
from schemas.stored import DesiredConfig
from schemas.wire import ConfigAck, ConfigPush
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.distribution_events import finished, steps
from tests.fleet import Fleet
from tests.gatefleet_up import GatefleetUp

ACK_TIMEOUT_S = 0.25
RETRY_DELAY_S = 0.1
# The gap between two attempts as a gateway sees it: timeout + delay, less delivery jitter.
RETRY_GAP_S = ACK_TIMEOUT_S + RETRY_DELAY_S - 0.02
FAST = {
    "distribution_batch_size": 3,
    "distribution_retry_count": 2,
    "distribution_ack_timeout_ms": int(ACK_TIMEOUT_S * 1000),
    "distribution_retry_delay_ms": int(RETRY_DELAY_S * 1000),
}
ROUTE = {"routes": [{"path": "/api", "upstream": "svc-a"}]}
DIST_ID_RE = re.compile(r"^dist-[0-9a-f-]{36}$")


class ConfigFleet(Fleet):
    """The shared test fleet, each gateway recording what it applied (a push reaches
    `on_config` only the first time: re-sends are idempotent), with an application delay
    and rejections to inject."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        super().__init__(bus, prefix)
        # gateway id -> (applied at, done at, push), in order of application.
        self.applied: dict[str, list[tuple[float, float, ConfigPush]]] = {}
        self.apply_s = 0.0
        self.reject: set[str] = set()

    def add_many(self, *gateway_ids: str, **options: Any) -> list[GatewayAgent]:
        agents = []
        for gw in gateway_ids:
            self.applied[gw] = []
            agent = self.add(gw, "eu-west", interval_s=0.5, on_config=self._applier(gw), **options)
            agents.append(agent)
        return agents

    def _applier(self, gateway_id: str) -> Callable[[ConfigPush], Any]:
        async def apply(push: ConfigPush) -> ConfigResult | None:
            started = time.monotonic()
            if self.apply_s:
                await asyncio.sleep(self.apply_s)
            self.applied[gateway_id].append((started, time.monotonic(), push))
            if gateway_id in self.reject:
                return ConfigResult.reject(f"{gateway_id} cannot route to svc-a")
            return None

        return apply


@pytest.fixture
def fleet(bus: Bus, prefix: str) -> Iterator[ConfigFleet]:
    fleet = ConfigFleet(bus, prefix)
    yield fleet
    fleet.close()


@pytest.fixture
def run(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    client: GatefleetClient,
    fleet: ConfigFleet,
) -> Callable[..., Orchestrator]:
    """Starts an orchestrator (FAST timings, overridable), then waits for the fleet."""

    def start(
        gateways: list[dict[str, str]] | None = None,
        cluster: dict[str, Any] | None = None,
        **orchestrator: Any,
    ) -> Orchestrator:
        settings = make_settings(
            orchestrator={**FAST, **orchestrator},
            health={"heartbeat_interval_ms": 500},
            gateways=gateways or [],
            cluster=cluster or {},
        )
        started = start_orchestrator(settings)
        wait_until(
            lambda: client.status().gateways_healthy == len(fleet.agents),
            what=f"{len(fleet.agents)} healthy gateways",
        )
        return started

    return start


@pytest.fixture
def desired(bus: Bus, prefix: str) -> Callable[[str], DesiredConfig | None]:
    """Reads the `desired` bucket (opened on first use: the orchestrator creates it)."""

    def get(key: str) -> DesiredConfig | None:
        kv = bus.run(bus.js.key_value(bucket_name(prefix, "desired")))
        return KvStore(bus, kv, bucket_name(prefix, "desired")).get(key, DesiredConfig)

    return get


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, change in edges:
        current += change
        most = max(most, current)
    return most


# Deliveries --------------------------------------------------------------------------------


def test_every_gateway_acks(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    fleet.add_many("gw-1", "gw-2", "gw-3", "gw-4")
    run()

    reply = client.distribute("Route", ROUTE)
    assert reply.status == "pending"
    assert DIST_ID_RE.fullmatch(reply.distribution_id)
    assert finished(event_log, reply.distribution_id).details["status"] == "completed"

    record = client.get_distribution(reply.distribution_id)
    assert (record.status, record.config_type, record.version) == ("completed", "Route", 1)
    assert sorted(record.successful_gateways) == sorted(fleet.agents)
    assert record.failed_gateways == []
    assert {d.state for d in record.gateways.values()} == {"acked"}
    assert {d.attempts for d in record.gateways.values()} == {1}
    assert record.completed_at is not None
    for gw, applied in fleet.applied.items():
        [(_, _, push)] = applied
        assert (push.distribution_id, push.version, push.config_data) == (record.id, 1, ROUTE)
        assert fleet.agents[gw].config_versions == {"Route": 1}

    status = client.status()
    assert status.active_distributions == 0
    assert status.successfully_completed_distributions == 1
    assert status.failed_distributions == 0
    assert client.list_distributions(include_completed=False).distributions == []
    assert [d.id for d in client.list_distributions().distributions] == [record.id]
    fleet_wide = desired("Route")
    assert fleet_wide is not None
    assert (fleet_wide.version, fleet_wide.distribution_id) == (1, record.id)

    again = client.distribute("Route", ROUTE)
    finished(event_log, again.distribution_id)
    assert client.get_distribution(again.distribution_id).version == 2


def test_batch_size_is_never_exceeded(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    fleet.add_many(*(f"gw-{n}" for n in range(8)))
    fleet.apply_s = 0.08  # each gateway holds its push this long before it acks
    run(distribution_batch_size=3)

    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["status"] == "completed"

    # From the gateways' side: a push arrives only once the previous batch has answered.
    received = [(start, end) for applied in fleet.applied.values() for start, end, _ in applied]
    assert len(received) == 8
    assert max_overlap(received) == 3
    batches = [e.details["gateways"] for e in steps(event_log, dist_id, "batch_sent")]
    assert [len(b) for b in batches] == [3, 3, 2]


def test_flaky_gateway_succeeds_on_retry_after_the_delay(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    [flaky] = fleet.add_many("flaky")
    flaky.silent_config = True
    run()

    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: len(flaky.received) == 1, what="first push")
    flaky.silent_config = False  # it answers from the second attempt on
    assert finished(event_log, dist_id).details["status"] == "completed"

    record = client.get_distribution(dist_id)
    assert (record.gateways["flaky"].state, record.gateways["flaky"].attempts) == ("acked", 2)
    (first, push1), (second, push2) = flaky.received
    assert (push1.attempt, push2.attempt) == (1, 2)
    assert second - first >= RETRY_GAP_S
    [timed_out] = steps(event_log, dist_id, "gateway_timed_out")
    assert timed_out.details["final"] is False
    assert [e.details["attempt"] for e in steps(event_log, dist_id, "gateway_retried")] == [2]


def test_nack_is_final(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    fleet.add_many("good", "picky")
    fleet.reject.add("picky")
    run()

    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["status"] == "partially_failed"

    record = client.get_distribution(dist_id)
    picky = record.gateways["picky"]
    assert (picky.state, picky.attempts) == ("nacked", 1)
    assert picky.error == "picky cannot route to svc-a"
    assert (record.successful_gateways, record.failed_gateways) == (["good"], ["picky"])
    assert len(fleet.agents["picky"].received) == 1  # never retried
    assert steps(event_log, dist_id, "gateway_nacked")[0].gateway_id == "picky"
    assert client.status().failed_distributions == 1


def test_silent_gateway_times_out_after_retry_count_plus_one_attempts(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    [silent] = fleet.add_many("silent")
    silent.silent_config = True
    run(distribution_retry_count=2)

    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["status"] == "failed"

    delivery = client.get_distribution(dist_id).gateways["silent"]
    assert (delivery.state, delivery.attempts) == ("failed", 3)
    assert delivery.error == "no ack after 3 attempts: timeout"
    times = [at for at, _ in silent.received]
    assert [push.attempt for _, push in silent.received] == [1, 2, 3]
    assert all(b - a >= RETRY_GAP_S for a, b in itertools.pairwise(times))
    finals = [e.details["final"] for e in steps(event_log, dist_id, "gateway_timed_out")]
    assert finals == [False, False, True]


def test_targeted_subset(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    fleet.add_many("gw-a", "gw-b", "gw-c")
    run()

    dist_id = client.distribute("Route", ROUTE, target_gateways=["gw-c", "gw-a"]).distribution_id
    assert finished(event_log, dist_id).details["status"] == "completed"

    record = client.get_distribution(dist_id)
    assert record.target_gateways == ["gw-c", "gw-a"]
    assert sorted(record.successful_gateways) == ["gw-a", "gw-c"]
    assert fleet.applied["gw-b"] == []
    assert desired("Route") is None  # the fleet's desired version is untouched
    for gw in ("gw-a", "gw-c"):
        own = desired(f"Route.{gw}")
        assert own is not None
        assert (own.version, own.distribution_id) == (1, dist_id)
    assert desired("Route.gw-b") is None


def test_unknown_and_unreachable_targets_fail_with_a_reason(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    fleet.add_many("gw-a")
    # "listed" is known from the config file, but nothing answers for it.
    run(gateways=[{"id": "listed", "region": "eu-west"}])

    targets = ["gw-a", "ghost", "listed"]
    dist_id = client.distribute("Route", ROUTE, target_gateways=targets).distribution_id
    assert finished(event_log, dist_id).details["status"] == "partially_failed"

    record = client.get_distribution(dist_id)
    assert record.gateways["ghost"].state == "failed"
    assert record.gateways["ghost"].error == "unknown gateway"
    assert record.gateways["ghost"].attempts == 0
    listed = record.gateways["listed"]
    assert (listed.state, listed.attempts) == ("failed", 3)
    # Nothing listens on P.gw.listed.config: each attempt fails fast with no responders.
    assert listed.error == "no ack after 3 attempts: no_responders"
    assert record.successful_gateways == ["gw-a"]
    created = steps(event_log, dist_id, "created")[0]
    assert created.details["unknown_gateways"] == ["ghost"]


def test_empty_fleet_completes_with_a_reason(
    run: Callable[..., Orchestrator],
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    run()

    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["reason"] == "no target gateways"

    record = client.get_distribution(dist_id)
    assert (record.status, record.target_gateways) == ("completed", [])
    fleet_wide = desired("Route")
    assert fleet_wide is not None  # what gateways that join later should get
    assert fleet_wide.version == 1


def test_same_type_is_applied_in_order(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    [gw] = fleet.add_many("gw-1")
    fleet.apply_s = 0.1
    run()

    first = client.distribute("Route", {"v": 1}).distribution_id
    second = client.distribute("Route", {"v": 2}).distribution_id
    other = client.distribute("Tls", {"cert": "x"}).distribution_id  # another type: no wait
    for dist_id in (first, second, other):
        finished(event_log, dist_id)

    assert steps(event_log, second, "queued")[0].details["after"] == first
    assert steps(event_log, other, "queued") == []
    routes = [push.version for _, _, push in fleet.applied["gw-1"] if push.config_type == "Route"]
    assert routes == [1, 2]
    assert gw.config_versions == {"Route": 2, "Tls": 1}
    first_done = finished(event_log, first).ts
    assert steps(event_log, second, "created")[0].ts >= first_done
    wait_until(
        lambda: client.status().successfully_completed_distributions == 3,
        what="3 completed in the status",
    )
    assert client.status().active_distributions == 0


# A version counter behind the gateways -----------------------------------------------------


def test_a_gateway_holding_a_newer_version_moves_the_counter_past_it(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gatefleet's state is new (a fresh data dir) while gw-old holds Route version 7 from
    before: its stale_version nack is no failure; the distribution moves above 7."""
    [old] = fleet.add_many("gw-old", config_versions={"Route": 7})
    [new] = fleet.add_many("gw-new")
    run()

    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id).details["status"] == "completed"
    record = client.get_distribution(dist_id)
    assert (record.version, record.failed_gateways) == (8, [])
    assert {gw: d.state for gw, d in record.gateways.items()} == dict.fromkeys(
        fleet.agents, "acked"
    )
    assert old.config_versions == new.config_versions == {"Route": 8}
    assert [p.version for _, _, p in fleet.applied["gw-old"]] == [8]
    assert [p.version for _, _, p in fleet.applied["gw-new"]][-1] == 8  # after v1, likely
    assert all(p.config_data == ROUTE for applied in fleet.applied.values() for _, _, p in applied)
    [moved] = steps(event_log, dist_id, "version_moved")
    assert moved.details == {
        "from_version": 1,
        "to_version": 8,
        "held_version": 7,
        "gateways": ["gw-old"],
    }
    assert steps(event_log, dist_id, "gateway_nacked") == []
    assert "the version counter of Route was behind: a gateway holds version 7" in caplog.text
    assert client.status().failed_distributions == 0
    fleet_wide = desired("Route")
    assert fleet_wide is not None
    assert (fleet_wide.version, fleet_wide.distribution_id) == (8, dist_id)

    # The counter goes on from there, and a rollback to the moved version works.
    newer = client.distribute("Route", {"v": 9}).distribution_id
    assert finished(event_log, newer).details["status"] == "completed"
    assert client.get_distribution(newer).version == 9
    rollback = client.rollback("Route").distribution_id
    assert finished(event_log, rollback).details["status"] == "completed"
    assert client.get_distribution(rollback).version == 10
    assert old.config_versions == new.config_versions == {"Route": 10}
    _, _, last = fleet.applied["gw-old"][-1]
    assert (last.version, last.config_data) == (10, ROUTE)


def test_after_a_restart_a_moved_distribution_still_runs_before_those_queued_behind_it(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
) -> None:
    """Queues are rebuilt in the order of the versions distributions were created with:
    one that moved above a later one is not overtaken by it (gw-3 would end on the older
    content)."""
    fleet.add_many("gw-1", config_versions={"Route": 7})
    [slow] = fleet.add_many("gw-2")
    fleet.add_many("gw-3")
    slow.silent_config = True
    orchestrator = run(distribution_ack_timeout_ms=60_000, distribution_batch_size=1)
    first = client.distribute("Route", ROUTE).distribution_id  # gw-1 moves it to 8
    second = client.distribute("Route", {"v": 2}, ["gw-3"]).distribution_id  # version 2
    wait_until(lambda: any(p.version == 8 for _, p in slow.received), what="gw-2 pushed version 8")
    orchestrator.stop()

    slow.silent_config = False
    run(distribution_ack_timeout_ms=60_000, distribution_batch_size=1)

    def both_completed() -> bool:
        return all(client.get_distribution(d).status == "completed" for d in (first, second))

    wait_until(both_completed, timeout=10, what="both completed after the restart")
    assert (client.get_distribution(first).version, client.get_distribution(second).version) == (
        8,
        9,
    )
    assert [(p.version, p.config_data) for _, _, p in fleet.applied["gw-3"]] == [
        (8, ROUTE),
        (9, {"v": 2}),
    ]


def test_a_rollout_that_moves_keeps_the_version_after_it_for_its_rollback(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    fleet.add_many("gw-1", "gw-2", config_versions={"Route": 4})
    run()
    rollout = Rollout(canary=1, auto_rollback=True)
    dist_id = client.distribute("Route", ROUTE, rollout=rollout).distribution_id
    assert finished(event_log, dist_id).details["status"] == "completed"
    assert client.get_distribution(dist_id).version == 5
    [moved] = steps(event_log, dist_id, "version_moved")
    assert (moved.details["from_version"], moved.details["to_version"]) == (1, 5)
    [canary, rest] = steps(event_log, dist_id, "batch_sent")[-2:]
    assert (canary.details["canary"], canary.version, rest.version) == (True, 5, 5)
    later = client.distribute("Route", ROUTE).distribution_id
    finished(event_log, later)
    assert client.get_distribution(later).version == 7  # 6 is kept for its rollback


# Requests ----------------------------------------------------------------------------------


def test_bad_requests_and_unknown_ids(
    run: Callable[..., Orchestrator], client: GatefleetClient, bus: Bus, prefix: str
) -> None:
    run(max_config_bytes=100)

    with pytest.raises(BadRequest, match="over the limit of 100"):
        client.distribute("Route", {"blob": "x" * 100})
    with pytest.raises(BadRequest, match="config_type"):
        client.distribute("Not a type!", ROUTE)
    not_an_object = b'{"config_type": "Route", "config_data": [1, 2]}'
    reply = bus.ask(f"{prefix}.api.distribute", not_an_object, timeout=5)
    assert b'"bad_request"' in reply
    with pytest.raises(NotFound):
        client.get_distribution("dist-00000000-0000-0000-0000-000000000000")
    with pytest.raises(BadRequest):
        client.get_distribution("not-a-distribution")


def test_malformed_ack_is_dropped_counted_and_retried(
    run: Callable[..., Orchestrator], client: GatefleetClient, event_log: EventLog, bus: Bus
) -> None:
    """A gateway whose first answer is garbage: not an ack, so the attempt times out."""
    orchestrator = run(gateways=[{"id": "odd", "region": "eu-west"}])
    answers = [b'{"nonsense": true}']

    def respond(msg: Inbound) -> None:
        if answers:
            bus.publish(msg.reply, answers.pop())
            return
        push = decode(msg.data, ConfigPush)
        ack = ConfigAck(
            distribution_id=push.distribution_id, gateway_id="odd", ok=True, version=push.version
        )
        bus.publish(msg.reply, ack)

    bus.subscribe(orchestrator.subjects.config("odd"), respond)
    dist_id = client.distribute("Route", ROUTE, target_gateways=["odd"]).distribution_id
    assert finished(event_log, dist_id).details["status"] == "completed"

    assert client.get_distribution(dist_id).gateways["odd"].attempts == 2
    [timed_out] = steps(event_log, dist_id, "gateway_timed_out")
    assert timed_out.details["reason"] == "malformed ack"
    assert sum(client.status().malformed_messages.values()) >= 1


@pytest.mark.parametrize(
    ("ack", "expected"),
    [
        ({"ok": True}, ("ack", None)),
        ({"ok": False, "error": "bad route"}, ("nack", "bad route")),
        ({"ok": False}, ("nack", "rejected")),
        ({"ok": False, "error": "stale_version", "held_version": 7}, ("stale", None)),
        ({"ok": False, "error": "stale_version"}, ("nack", "stale_version")),  # holding what?
        ({"ok": True, "version": 7}, ("no_answer", "mismatched ack")),
        ({"ok": True, "gateway_id": "gw-2"}, ("no_answer", "mismatched ack")),
        ({"ok": True, "distribution_id": "dist-other"}, ("no_answer", "mismatched ack")),
        ({"ok": "yes"}, ("no_answer", "malformed ack")),
    ],
)
def test_reading_an_answer(ack: dict[str, Any], expected: tuple[str, str | None]) -> None:
    push = ConfigPush(distribution_id="dist-1", config_type="Route", version=1, config_data={})
    body = {"distribution_id": "dist-1", "gateway_id": "gw-1", "version": 1, **ack}
    drops = Drops()
    answer = read_answer(Reply(encode(body), None), push, "gw-1", drops, "p.gw.gw-1.config")
    assert (answer.outcome, answer.detail) == expected
    assert answer.held_version == (7 if expected[0] == "stale" else None)
    assert sum(drops.counts().values()) == (expected[0] == "no_answer")
    failed = read_answer(RequestFailed("no_responders"), push, "gw-1", drops, "p.gw.gw-1.config")
    assert (failed.outcome, failed.detail) == ("no_answer", "no_responders")


# Scale and durability ----------------------------------------------------------------------


def test_two_hundred_gateways(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    fleet.add_many(*(f"gw-{n:03}" for n in range(200)))
    run(distribution_batch_size=50, distribution_ack_timeout_ms=2000)

    started = time.monotonic()
    dist_id = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, dist_id, timeout=20).details["status"] == "completed"
    elapsed = time.monotonic() - started

    record = client.get_distribution(dist_id)
    assert len(record.successful_gateways) == 200
    assert all(len(applied) == 1 for applied in fleet.applied.values())
    assert len(steps(event_log, dist_id, "batch_sent")) == 4
    print(f"200 gateways, batches of 50: {elapsed * 1000:.0f} ms")


@pytest.fixture
def up_config(nats_server: EmbeddedServer, prefix: str, tmp_path: Path) -> Path:
    """A config file for `gatefleet up` on the test server: one gateway per batch."""
    config = tmp_path / "gatefleet.toml"
    config.write_text(
        f'[bus]\nurl = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n'
        f'data_dir = "{tmp_path}"\n'
        "[orchestrator]\ndistribution_batch_size = 1\ndistribution_ack_timeout_ms = 3000\n"
        "distribution_retry_delay_ms = 100\n"
        "[health]\nheartbeat_interval_ms = 500\nprobe_interval_ms = 0\n"
        # A killed run's lease is waited out before the next one leads: kept short.
        "[cluster]\nlease_ms = 2000\n"
    )
    return config


def test_sigkill_mid_distribution_resumes_without_reapplying(
    up_config: Path, fleet: ConfigFleet, client: GatefleetClient, event_log: EventLog
) -> None:
    runs = [GatefleetUp(up_config)]
    try:
        runs[0].wait_ready()
        agents = fleet.add_many("gw-1", "gw-2", "gw-3", "gw-4")
        agents[1].ack_delay_s = 0.6  # gw-2 applies at once and acks late, each time
        wait_until(lambda: client.status().gateways_healthy == 4, what="4 healthy gateways")
        dist_id = client.distribute("Route", ROUTE).distribution_id

        # gw-2 has applied the push and not yet acked it: the orchestrator dies now.
        wait_until(lambda: len(fleet.applied["gw-2"]) == 1, what="gw-2 applied")
        runs[0].kill(signal.SIGKILL)
        runs.append(GatefleetUp(up_config))
        runs[1].wait_ready()
        assert finished(event_log, dist_id, timeout=15).details["status"] == "completed"

        record = client.get_distribution(dist_id)
        assert record.status == "completed"
        assert sorted(record.successful_gateways) == ["gw-1", "gw-2", "gw-3", "gw-4"]
        assert {gw: len(applied) for gw, applied in fleet.applied.items()} == dict.fromkeys(
            fleet.agents, 1
        )
        assert [push.attempt for _, push in agents[1].received] == [1, 1]  # re-sent, same attempt
        [resumed] = steps(event_log, dist_id, "resumed")
        assert resumed.details["resent"] == ["gw-2"]
        assert client.status().successfully_completed_distributions == 1
    finally:
        for up in reversed(runs):
            up.kill(signal.SIGTERM)


def test_a_queued_distribution_survives_a_restart_from_its_spec_alone(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    bus: Bus,
    prefix: str,
) -> None:
    """`distribute` answers once the spec is stored; a distribution waiting behind another
    of its type has no record yet (its actor writes that) and is rebuilt from its spec."""
    silent, other = fleet.add_many("gw-silent", "gw-other")
    silent.silent_config = True
    orchestrator = run(distribution_ack_timeout_ms=60_000)
    first = client.distribute("Route", ROUTE, ["gw-silent"]).distribution_id
    queued = client.distribute("Route", ROUTE, ["gw-other"]).distribution_id
    name = bucket_name(prefix, "distributions")
    kv = KvStore(bus, bus.run(bus.js.key_value(name)), name)
    keys = set(kv.entries())
    assert {f"{first}.spec", f"{queued}.spec"} <= keys
    assert queued not in keys  # not started: its record is its actor's to write
    assert client.get_distribution(queued).status == "pending"
    wait_until(lambda: bool(silent.received), what="the first push sent")
    orchestrator.stop()

    silent.silent_config = False
    run(distribution_ack_timeout_ms=60_000)

    def both_completed() -> bool:
        return all(client.get_distribution(d).status == "completed" for d in (first, queued))

    wait_until(both_completed, timeout=10, what="both completed after the restart")
    assert [p.distribution_id for _, _, p in fleet.applied["gw-other"]] == [queued]
    assert other.config_versions["Route"] == 2


def test_the_same_request_id_answers_the_same_distribution_also_after_a_restart(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    prefix: str,
    bus: Bus,
) -> None:
    fleet.add_many("gw-1", "gw-2")
    orchestrator = run()
    body = encode({"config_type": "Route", "config_data": ROUTE, "request_id": "deploy-42"})
    first = fleet.raw_call("distribute", body)["distribution_id"]
    again = fleet.raw_call("distribute", body)["distribution_id"]
    assert again == first
    other = fleet.raw_call("distribute", encode({"config_type": "Route", "config_data": ROUTE}))
    assert other["distribution_id"] != first
    wait_until(
        lambda: client.get_distribution(other["distribution_id"]).status == "completed",
        what="both done",
    )
    record = client.get_distribution(first)
    assert (record.request_id, record.version) == ("deploy-42", 1)
    assert len(client.list_distributions().distributions) == 2
    orchestrator.stop()

    run()
    assert fleet.raw_call("distribute", body)["distribution_id"] == first
    assert len(client.list_distributions().distributions) == 2
    assert [p.version for _, _, p in fleet.applied["gw-1"]] == [1, 2]
