"""Gateway health monitoring end to end: real nats-server, real agents, real actors."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pykka
import pytest

from actors.gateway import GatewayActor
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from schemas.api import SelectReply, SelectRequest
from schemas.events import (
    GatewayDown,
    GatewayForgotten,
    GatewayLeft,
    GatewayRecovered,
    GatewayRegistered,
    GatewayStatusChanged,
)
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import BUSY, IDLE, ArrivalClock, Fleet, MutableMetrics

INTERVAL_S = 0.1
FALL = 3
RISE = 2


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    # Flap detection off: these tests walk a gateway through every status within a second
    # (tests/test_flapping.py has it on).
    return make_settings(
        health={"heartbeat_interval_ms": 100, "fall": FALL, "rise": RISE, "flap_threshold": 0}
    )


@pytest.fixture
def gatefleet(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Orchestrator:
    return start_orchestrator(settings)


def status_of(
    event_log: EventLog, gateway_id: str, new_status: str, timeout: float = 5.0, since: int = 0
) -> Any:
    return event_log.wait_for(
        lambda e: (
            isinstance(e, GatewayStatusChanged)
            and e.gateway_id == gateway_id
            and e.new_status == new_status
        ),
        timeout,
        since,
    )


def select(fleet: Fleet, **request: Any) -> SelectReply:
    return fleet.call("select-gateway", SelectRequest(**request), SelectReply)


def test_first_heartbeat_registers_and_makes_selectable(
    gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog
) -> None:
    fleet.add("edge-1", labels={"az": "a"}, config_versions={"Route": 3})
    registered = event_log.wait_for(lambda e: isinstance(e, GatewayRegistered))
    assert isinstance(registered, GatewayRegistered)
    assert (registered.gateway_id, registered.source) == ("edge-1", "heartbeat")
    changed = status_of(event_log, "edge-1", "healthy")
    assert changed.old_status == "unknown"
    row = fleet.gateways()["edge-1"]
    assert row.region == "us-west"
    assert row.cpu_percent == IDLE.cpu_percent
    assert row.active_connections == IDLE.active_connections
    assert row.labels == {"az": "a"}
    assert row.config_versions == {"Route": 3}
    assert row.last_seen is not None
    assert select(fleet).gateway_id == "edge-1"
    assert fleet.status().gateways_healthy == 1


def test_config_listed_gateway_is_unknown_until_it_beats(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    settings = make_settings(
        health={"heartbeat_interval_ms": 100},
        gateways=[{"id": "edge-9", "region": "eu-west", "role": "backup", "backup_for": "edge-1"}],
    )
    start_orchestrator(settings)
    row = fleet.gateways()["edge-9"]
    assert (row.status, row.role, row.backup_for) == ("unknown", "backup", "edge-1")
    assert fleet.status().gateways_managed == 1
    assert select(fleet).gateway_id is None
    fleet.add("edge-9", "eu-west")
    status_of(event_log, "edge-9", "healthy")
    row = fleet.gateways()["edge-9"]
    assert row.role == "backup"  # the heartbeat did not say, so the config stands


def test_every_status_transition(
    gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog, bus: Bus, prefix: str
) -> None:
    metrics = MutableMetrics(IDLE)
    agent = fleet.add("edge-1", metrics=metrics)
    status_of(event_log, "edge-1", "healthy")

    metrics.metrics = BUSY
    degraded = status_of(event_log, "edge-1", "degraded")
    assert degraded.score < 70
    assert select(fleet).gateway_id is None  # degraded is never selected

    # Rise hysteresis: healthy only after RISE good heartbeats, counted from the receiver.
    arrivals = ArrivalClock(bus, f"{prefix}.gw.edge-1.heartbeat")
    mark = event_log.mark()
    metrics.metrics = IDLE
    seen_before = arrivals.count
    healthy = status_of(event_log, "edge-1", "healthy", since=mark)
    assert healthy.old_status == "degraded"
    assert arrivals.count - seen_before >= RISE

    # Detection: down within (fall + 1) intervals of the last heartbeat.
    agent.pause_heartbeats()
    down = event_log.wait_for(lambda e: isinstance(e, GatewayDown), timeout=5)
    detected_at = time.monotonic()
    assert arrivals.last is not None
    assert detected_at - arrivals.last <= (FALL + 1) * INTERVAL_S
    assert isinstance(down, GatewayDown)
    assert down.missed_heartbeats >= FALL
    assert fleet.gateways()["edge-1"].score == 0
    assert select(fleet).gateway_id is None

    mark = event_log.mark()
    agent.resume_heartbeats()
    recovered = event_log.wait_for(lambda e: isinstance(e, GatewayRecovered), since=mark)
    assert isinstance(recovered, GatewayRecovered)
    assert select(fleet).gateway_id == "edge-1"


def test_down_gateway_with_bad_metrics_comes_back_degraded(
    gatefleet: Orchestrator,
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    metrics = MutableMetrics(IDLE)
    agent = fleet.add("edge-1", metrics=metrics)
    status_of(event_log, "edge-1", "healthy")
    agent.pause_heartbeats()
    status_of(event_log, "edge-1", "down")
    mark = event_log.mark()
    metrics.metrics = BUSY
    agent.resume_heartbeats()
    back = status_of(event_log, "edge-1", "degraded", since=mark)
    assert back.old_status == "down"


def test_goodbye_removes_the_gateway(
    gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog
) -> None:
    fleet.add("edge-1")
    status_of(event_log, "edge-1", "healthy")
    actors_before = len(pykka.ActorRegistry.get_all())
    fleet.stop("edge-1", goodbye=True)
    left = event_log.wait_for(lambda e: isinstance(e, GatewayLeft))
    assert isinstance(left, GatewayLeft)
    assert left.gateway_id == "edge-1"
    wait_until(lambda: "edge-1" not in fleet.gateways(), what="edge-1 gone from the table")
    assert fleet.status().gateways_managed == 0
    assert len(pykka.ActorRegistry.get_all()) == actors_before - 1


def heartbeat_body(gateway_id: str, seq: int, **changes: Any) -> bytes:
    body = {
        "gateway_id": gateway_id,
        "region": "us-west",
        "seq": seq,
        "ts": "2026-11-28T07:00:00Z",
        "cpu_percent": 10.0,
        "memory_percent": 10.0,
        "active_connections": 1,
        **changes,
    }
    return msgspec.json.encode(body)


def test_spoofed_and_replayed_heartbeats_are_rejected(
    gatefleet: Orchestrator,
    fleet: Fleet,
    event_log: EventLog,
    prefix: str,
) -> None:
    fleet.add("edge-1", interval_s=0.1)
    status_of(event_log, "edge-1", "healthy")
    wait_until(lambda: (fleet.gateways()["edge-1"].last_seq or 0) >= 5, what="five heartbeats")
    # edge-2 tries to speak for edge-1 (and edge-1's subject carries someone else's id).
    fleet.publish_raw(f"{prefix}.gw.edge-2.heartbeat", heartbeat_body("edge-1", 10_000))
    fleet.publish_raw(f"{prefix}.gw.edge-1.heartbeat", heartbeat_body("edge-3", 10_000))
    # A replay of an old heartbeat of edge-1.
    fleet.publish_raw(f"{prefix}.gw.edge-1.heartbeat", heartbeat_body("edge-1", 1))
    expected = {"id_mismatch": 2, "replay": 1}
    wait_until(
        lambda: fleet.status().malformed_messages == expected,
        what=f"drops {expected}",
        show=lambda: fleet.status().malformed_messages,
    )
    assert set(fleet.gateways()) == {"edge-1"}
    assert fleet.gateways()["edge-1"].last_seq != 10_000


def test_a_heartbeat_sent_twice_is_counted_as_a_replay(
    gatefleet: Orchestrator, fleet: Fleet, prefix: str
) -> None:
    """Found by the fuzz: the second of two heartbeats with the same seq was dropped
    without being counted anywhere."""
    body = heartbeat_body("edge-1", 5)
    fleet.publish_raw(f"{prefix}.gw.edge-1.heartbeat", body)
    fleet.publish_raw(f"{prefix}.gw.edge-1.heartbeat", body)
    wait_until(
        lambda: fleet.status().malformed_messages == {"replay": 1},
        what="one replay counted",
        show=lambda: fleet.status().malformed_messages,
    )
    assert fleet.gateways()["edge-1"].heartbeats == 1


def test_restarted_gateway_is_recognised(
    gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog
) -> None:
    agent = fleet.add("edge-1")
    status_of(event_log, "edge-1", "healthy")
    wait_until(lambda: (fleet.gateways()["edge-1"].last_seq or 0) >= 10, what="ten heartbeats")
    before = fleet.gateways()["edge-1"].heartbeats
    fleet.bus.run(agent.restart())  # seq starts over at 1
    wait_until(
        lambda: fleet.gateways()["edge-1"].heartbeats >= before + 3,
        what="heartbeats after the restart accepted",
    )
    assert (fleet.gateways()["edge-1"].last_seq or 0) < 10


MALFORMED_BODIES: list[bytes] = [
    b"",
    b"not json at all",
    b'{"gateway_id": "edge-1"',
    heartbeat_body("edge-1", 5, cpu_percent="high"),
    heartbeat_body("edge-1", 5, cpu_percent=250.0),
    heartbeat_body("edge-1", 5, active_connections=-3),
    heartbeat_body("edge-1", 5, region=None),
    heartbeat_body("edge.1", 5),
    heartbeat_body("edge*", 5),
    heartbeat_body("edge>", 5),
    heartbeat_body("edge 1", 5),
    b"[1, 2, 3]",
]


BAD_GOODBYES: list[bytes] = [b"", b"{}", b'{"gateway_id": "edge 1"}', b'{"gateway_id": 7}', b"bye"]


def test_burst_of_malformed_messages_changes_nothing(
    gatefleet: Orchestrator,
    fleet: Fleet,
    event_log: EventLog,
    prefix: str,
) -> None:
    agent = fleet.add("edge-1", interval_s=0.5)
    status_of(event_log, "edge-1", "healthy")
    agent.pause_heartbeats()
    actors_before = {ref.actor_urn for ref in pykka.ActorRegistry.get_all()}
    before = fleet.gateways()["edge-1"]
    rng = random.Random(7)
    subjects = [
        f"{prefix}.gw.edge-1.heartbeat",
        f"{prefix}.gw.newcomer.heartbeat",
        f"{prefix}.gw.edge-1.goodbye",
        f"{prefix}.gw.edge.1.heartbeat",  # an id with a dot: more tokens than allowed
    ]
    burst = 10_000
    shed_before = fleet.status().shed.get("heartbeats", 0)
    for i in range(burst):
        subject = subjects[i % len(subjects)]
        if i % 5 == 0:
            body = os.urandom(rng.randint(1, 64))
        elif subject.endswith(".goodbye"):
            body = BAD_GOODBYES[i % len(BAD_GOODBYES)]
        else:
            body = MALFORMED_BODIES[i % len(MALFORMED_BODIES)]
        fleet.publish_raw(subject, body)

    def dropped() -> int:
        """Counted malformed, or shed undecoded: while gatefleet lags far behind (a loaded
        machine), a known gateway's heartbeats are shed before they are read."""
        status = fleet.status()
        shed = status.shed.get("heartbeats", 0) - shed_before
        return sum(status.malformed_messages.values()) + shed

    wait_until(
        lambda: dropped() >= burst,
        timeout=20,
        what="every malformed message counted",
        show=lambda: fleet.status().malformed_messages,
    )
    # A valid heartbeat right after is still processed: once gatefleet sees again (on a
    # loaded machine the burst can leave it lagging, and then it sheds heartbeats unread).
    wait_until(
        lambda: not fleet.status().detection_suspended,
        timeout=20,
        what="gatefleet seeing again after the burst",
    )
    fleet.publish_raw(
        f"{prefix}.gw.edge-1.heartbeat",
        heartbeat_body("edge-1", (before.last_seq or 0) + 1, cpu_percent=42.0),
    )
    wait_until(
        lambda: fleet.gateways()["edge-1"].cpu_percent == 42.0,
        what="the valid heartbeat processed",
        show=lambda: (fleet.status().shed, fleet.status().detection_suspended),
    )
    after = fleet.gateways()
    assert set(after) == {"edge-1"}
    assert after["edge-1"].heartbeats == before.heartbeats + 1
    assert {ref.actor_urn for ref in pykka.ActorRegistry.get_all()} == actors_before
    assert dropped() == burst


def test_probes_measure_response_latency(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    start_orchestrator(
        make_settings(health={"heartbeat_interval_ms": 100, "probe_interval_ms": 50})
    )
    fleet.add("edge-1")
    status_of(event_log, "edge-1", "healthy")
    wait_until(
        lambda: fleet.gateways()["edge-1"].probe_latency_ms is not None, what="a probe answered"
    )
    latency = fleet.gateways()["edge-1"].probe_latency_ms
    assert latency is not None
    assert 0 < latency < 1000


def test_a_burst_from_one_gateway_is_coalesced_and_counted_whole(
    gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog, prefix: str
) -> None:
    """Far faster than its actor can take them: each heartbeat is either counted or, once
    more than MAX_PENDING_HEARTBEATS wait for the actor, shed (the oldest go, counted in
    `status`); the newest always reaches it."""
    subject = f"{prefix}.gw.edge-1.heartbeat"
    fleet.publish_raw(subject, heartbeat_body("edge-1", 1))
    status_of(event_log, "edge-1", "healthy")
    burst = 3_000
    for seq in range(2, burst + 2):  # far faster than one actor wake-up per heartbeat
        fleet.publish_raw(subject, heartbeat_body("edge-1", seq, active_connections=seq))

    def accounted() -> int:
        return fleet.gateways()["edge-1"].heartbeats + fleet.status().shed.get("heartbeats", 0)

    wait_until(
        lambda: accounted() == burst + 1,
        timeout=20,
        what="every heartbeat of the burst counted or shed",
        show=accounted,
    )
    row = fleet.gateways()["edge-1"]
    assert (row.last_seq, row.active_connections) == (burst + 1, burst + 1)  # the newest
    assert fleet.status().malformed_messages == {}
    [ref] = pykka.ActorRegistry.get_by_class(GatewayActor)
    proxy = ref.proxy()
    accepted, batches = proxy.heartbeats_accepted.get(), proxy.heartbeat_batches.get()
    assert accepted == row.heartbeats
    assert batches < accepted  # some wake-ups took several heartbeats


@pytest.mark.slow
def test_200_gateways_at_10hz_every_heartbeat_counted(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    start_orchestrator(make_settings(health={"heartbeat_interval_ms": 100}))
    agents = [fleet.add(f"gw-{n}", interval_s=0.1) for n in range(200)]
    # The load: every gateway beats 50 times (5 s at 10 Hz).
    wait_until(lambda: min(a.beats_sent for a in agents) >= 50, timeout=20, what="50 beats each")
    for agent in agents:
        agent.pause_heartbeats()
    sent = {a.gateway_id: a.beats_sent for a in agents}
    assert sum(sent.values()) >= 200 * 40

    def all_counted() -> bool:
        rows = fleet.gateways()
        return all(rows[g].heartbeats == n for g, n in sent.items() if g in rows)

    wait_until(all_counted, timeout=10, what="every heartbeat counted")
    rows = fleet.gateways()
    assert len(rows) == 200
    assert sum(r.heartbeats for r in rows.values()) == sum(sent.values())
    assert fleet.status().malformed_messages == {}
    alive = [ref for ref in pykka.ActorRegistry.get_all() if ref.is_alive()]
    assert len(alive) >= 200 + 2


def test_out_of_range_deep_and_non_utf8_input_is_dropped_counted_and_answered(
    gatefleet: Orchestrator, fleet: Fleet, event_log: EventLog, prefix: str
) -> None:
    """Bounds at the edge: a count past 2^53 (a 400-digit number would overflow the score
    later), JSON nested past the decoder's depth, bytes that are not UTF-8. Heartbeats are
    dropped and counted; requests get `bad_request`, never silence; the gateway is fine."""
    subject = f"{prefix}.gw.edge-1.heartbeat"
    fleet.publish_raw(subject, heartbeat_body("edge-1", 1))
    status_of(event_log, "edge-1", "healthy")
    fleet.publish_raw(subject, heartbeat_body("edge-1", 2, active_connections=int("9" * 400)))
    fleet.publish_raw(subject, b'{"gateway_id": "edge-1", "region": "' + b"[" * 100_000)
    fleet.publish_raw(subject, b'{"gateway_id": "edge-1\xff", "region": "us-west"}')
    fleet.publish_raw(subject, heartbeat_body("edge-1", 3, active_connections=7))
    wait_until(lambda: fleet.gateways()["edge-1"].last_seq == 3, what="the good heartbeat")
    assert fleet.gateways()["edge-1"].active_connections == 7
    drops = fleet.status().malformed_messages
    assert drops.get("invalid_fields") == 1
    assert drops.get("malformed_json", 0) + drops.get("too_deep", 0) >= 1
    assert drops.get("invalid_utf8") == 1
    for body in (
        b'{"config_type": "Route", "config_data": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"config_type": "R\xffoute", "config_data": {}}',
        b'{"config_type": "Route", "config_data": {}, "target_gateways": ["' + b"9" * 70 + b'"]}',
    ):
        reply = fleet.raw_call("distribute", body)
        assert reply["error"]["code"] == "bad_request", reply
    assert fleet.status().malformed_messages.get("bad_request") == 3


def test_a_gateway_down_long_enough_is_forgotten_unless_configured(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    """health.forget_after_s: a gateway down that long leaves (`gateway.forgotten`); one
    listed in [[gateways]] stays, and its configured role survives a goodbye and a
    re-registration."""
    settings = make_settings(
        health={"heartbeat_interval_ms": 100, "forget_after_s": 0.5},
        gateways=[{"id": "gw-conf", "region": "us-west", "role": "backup", "backup_for": "gw-a"}],
    )
    start_orchestrator(settings)
    fleet.add("gw-a", interval_s=0.1)
    fleet.add("gw-conf", interval_s=0.1)
    status_of(event_log, "gw-a", "healthy")
    status_of(event_log, "gw-conf", "healthy")
    assert fleet.gateways()["gw-conf"].role == "backup"

    fleet.stop("gw-conf")  # goodbye, then back: still the configured backup
    fleet.add("gw-conf", interval_s=0.1)
    mark = event_log.mark()
    status_of(event_log, "gw-conf", "healthy", since=mark)
    assert (fleet.gateways()["gw-conf"].role, fleet.gateways()["gw-conf"].backup_for) == (
        "backup",
        "gw-a",
    )

    fleet.stop("gw-a", goodbye=False)
    fleet.stop("gw-conf", goodbye=False)
    forgotten = event_log.wait_for(lambda e: isinstance(e, GatewayForgotten), timeout=5)
    assert isinstance(forgotten, GatewayForgotten)
    assert forgotten.gateway_id == "gw-a"
    assert forgotten.type == "gateway.forgotten"
    wait_until(lambda: "gw-a" not in fleet.gateways(), what="gw-a gone")
    # The configured one went down with it: after a few more checks (every 0.05 s) it must
    # still be there. An absence has no event to wait on, so a fixed window.
    time.sleep(1.0)
    assert fleet.gateways()["gw-conf"].status == "down"
    assert [e.gateway_id for e in event_log.of_type(GatewayForgotten)] == ["gw-a"]
