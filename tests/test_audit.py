"""`gatefleet audit` end to end: a real nats-server, the orchestrator, GatewayAgents, and
the command run through click's CliRunner (or a subprocess where a process matters).

The scenario: three gateways join, a selection, one gateway fails, the strategy changes,
another selection, a distribution with one nack. Tests wait on events and conditions
(never bare sleeps); the stream is read only once the test's event log and the stream
agree on what was published.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

from bus.jetstream import stream_name
from bus.replay import Replay, epoch_ns, until_stored
from bus.runtime import Bus
from bus.subjects import Subjects
from gatefleet.app import Orchestrator
from gatefleet.audit import audit
from gatefleet.audit.filter import EVENT_TYPES, EventFilter, gateways_named, parse_when
from gatefleet.audit.read import ReadProgress
from gatefleet.audit.render import show_selection, strategy_input, summary
from gatefleet.audit.rerun import selection_ts
from gatefleet.audit.state import FleetState
from gatefleet.client import GatefleetClient
from gatefleet.config import load_settings
from gatefleet.gateway import ConfigResult
from schemas.api import (
    DistributeReply,
    DistributeRequest,
    DistributionListReply,
    DistributionListRequest,
    Empty,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    SelectReply,
    SelectRequest,
)
from schemas.codec import encode
from schemas.events import (
    CandidateView,
    DistributionEvent,
    Event,
    FinishedStep,
    GatewayDown,
    GatewayRegistered,
    GatewaySelected,
    GatewayStatusChanged,
    LoadBalancingChanged,
    OrchestratorStarted,
    OrchestratorStopped,
    SelectionBatch,
    decode_event,
)
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet
from tests.selections import holds, recorded

INTERVAL_S = 0.2
# No score penalty for a late heartbeat: a busy test machine cannot flap a gateway to
# degraded; only `fall` missed intervals (a paused agent) take it down.
HEALTH = {
    "heartbeat_interval_ms": int(INTERVAL_S * 1000),
    "fall": 3,
    "rise": 2,
    "weights": {"failure_penalty": 0.0},
}
GATEWAYS = ("edge-1", "edge-2", "edge-3")


# Fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(health=HEALTH)


@pytest.fixture
def config_file(settings: Settings, tmp_path: Path) -> str:
    """What an operator's --config would say: the bus URL and the subject prefix."""
    path = tmp_path / "audit.toml"
    path.write_text(
        f'[bus]\nurl = "{settings.bus.url}"\nsubject_prefix = "{settings.bus.subject_prefix}"\n'
    )
    return str(path)


@pytest.fixture
def gatefleet(
    settings: Settings,
    start_orchestrator: Callable[[Settings], Orchestrator],
    event_log: EventLog,  # subscribed before the orchestrator starts: it sees every event
) -> Orchestrator:
    return start_orchestrator(settings)


def run_audit(config_file: str, *args: str) -> Result:
    result = CliRunner().invoke(audit, ["--config", config_file, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def explained(config_file: str, selection_id: str) -> GatewaySelected:
    """`gatefleet audit explain --json ID`: the selection rebuilt from the stream."""
    result = run_audit(config_file, "explain", "--json", selection_id)
    return msgspec.json.decode(result.stdout_bytes, type=GatewaySelected)


def json_events(config_file: str, *args: str) -> list[Event]:
    """`gatefleet audit --json ...`, each line decoded (so each line must be an event)."""
    result = run_audit(config_file, "--json", *args)
    assert not result.stderr
    return [decode_event(line) for line in result.stdout_bytes.splitlines()]


def stored_count(bus: Bus, prefix: str) -> int:
    return bus.run(bus.js.stream_info(stream_name(prefix))).state.messages


def all_stored(bus: Bus, prefix: str, event_log: EventLog) -> datetime:
    """Waits until the stream holds every event the log has seen; returns the time then
    (every event stored so far was stored before it, every later one after it)."""
    wait_until(
        lambda: stored_count(bus, prefix) == event_log.mark(),
        what="every event stored",
        show=lambda: (stored_count(bus, prefix), event_log.mark()),
    )
    return datetime.now(UTC)


def healthy(event_log: EventLog, gateway_id: str, since: int = 0) -> Event:
    return event_log.wait_for(
        lambda e: (
            isinstance(e, GatewayStatusChanged)
            and e.gateway_id == gateway_id
            and e.new_status == "healthy"
        ),
        since=since,
    )


def finished(event_log: EventLog, dist_id: str) -> DistributionEvent:
    event = event_log.wait_for(
        lambda e: (
            isinstance(e, DistributionEvent)
            and e.distribution_id == dist_id
            and e.step == "finished"
        )
    )
    assert isinstance(event, DistributionEvent)
    return event


def reject(_push: Any) -> ConfigResult:
    return ConfigResult.reject("edge-3 cannot route to svc-a")


@dataclass
class Scenario:
    first_selection: str
    second_selection: str
    second_reply: SelectReply
    distribution_id: str
    # Times between the phases, taken once the stream held everything before them.
    joined_at: datetime
    failed_at: datetime
    end: datetime
    # Live snapshots at those times.
    snapshots: dict[str, LiveFleet]


@dataclass
class LiveFleet:
    """What the orchestrator serves at one moment, in the fold's terms."""

    gateways: dict[str, tuple[str, float]]
    load_balancing: tuple[str, float]
    distributions: dict[str, tuple[object, ...]]


def comparable(record: Any) -> tuple[object, ...]:
    return (
        record.status,
        record.config_type,
        record.version,
        record.target_gateways,
        sorted(record.successful_gateways),
        sorted(record.failed_gateways),
        dict(sorted(record.gateways.items())),
        record.batch,
        record.reason,
    )


def live(fleet: Fleet) -> LiveFleet:
    lb = fleet.call("load-balancing.get", Empty(), LoadBalancingConfig)
    dists = fleet.call(
        "distributions.list", DistributionListRequest(include_completed=True), DistributionListReply
    )
    return LiveFleet(
        gateways={g.gateway_id: (g.status, g.score) for g in fleet.gateways().values()},
        load_balancing=(lb.strategy, lb.health_threshold),
        distributions={d.id: comparable(d) for d in dists.distributions},
    )


def rebuilt(state: FleetState) -> LiveFleet:
    return LiveFleet(
        gateways={g.gateway_id: (g.status, g.score) for g in state.gateways.values()},
        load_balancing=(state.load_balancing.strategy, state.load_balancing.health_threshold),
        distributions={d.id: comparable(d) for d in state.distributions.values()},
    )


def snapshot_at(
    fleet: Fleet, bus: Bus, prefix: str, event_log: EventLog
) -> tuple[datetime, LiveFleet]:
    """A live snapshot and a moment it holds at: the same before and after that moment."""
    for _ in range(50):
        before = live(fleet)
        moment = all_stored(bus, prefix, event_log)
        if live(fleet) == before:
            return moment, before
    raise AssertionError("the fleet never held still")


def run_scenario(fleet: Fleet, bus: Bus, prefix: str, event_log: EventLog) -> Scenario:
    snapshots: dict[str, LiveFleet] = {}
    for gateway_id in GATEWAYS:
        on_config = reject if gateway_id == "edge-3" else None
        fleet.add(gateway_id, interval_s=INTERVAL_S, on_config=on_config)
    for gateway_id in GATEWAYS:
        healthy(event_log, gateway_id)
    first = fleet.call("select-gateway", SelectRequest(region="us-west"), SelectReply)
    assert first.selection_id is not None
    recorded(event_log, first.selection_id)
    joined_at, snapshots["joined"] = snapshot_at(fleet, bus, prefix, event_log)

    fleet.agents["edge-2"].pause_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, GatewayDown) and e.gateway_id == "edge-2")
    failed_at, snapshots["failed"] = snapshot_at(fleet, bus, prefix, event_log)

    update = LoadBalancingUpdate(strategy="LeastConnections", health_threshold=75.0)
    fleet.call("load-balancing.set", update, LoadBalancingConfig)
    event_log.wait_for(lambda e: isinstance(e, LoadBalancingChanged))
    second = fleet.call("select-gateway", SelectRequest(client_id="client-9"), SelectReply)
    assert second.selection_id is not None
    request = DistributeRequest(config_type="Route", config_data={"routes": ["/api"]})
    dist_id = fleet.call("distribute", request, DistributeReply).distribution_id
    assert finished(event_log, dist_id).details["status"] == "partially_failed"
    recorded(event_log, second.selection_id)
    end, snapshots["end"] = snapshot_at(fleet, bus, prefix, event_log)
    return Scenario(
        first.selection_id,
        second.selection_id,
        second,
        dist_id,
        joined_at,
        failed_at,
        end,
        snapshots,
    )


def milestones(events: list[Event], scenario: Scenario) -> list[str]:
    """The scenario's landmarks, one per event of `events` ("" for the others): a batch
    holding a selection of the scenario is named after it, at the selection's time."""
    names: list[str] = []
    for e in events:
        match e:
            case GatewayRegistered(gateway_id=gw):
                names.append(f"registered {gw}")
            case GatewayStatusChanged(gateway_id=gw, new_status=status):
                names.append(f"{gw} {status}")
            case GatewayDown(gateway_id=gw):
                names.append(f"down {gw}")
            case LoadBalancingChanged(new_strategy=strategy, new_threshold=threshold):
                names.append(f"lb {strategy} {threshold:g}")
            case DistributionEvent(step=step, gateway_id=gw):
                names.append(f"distribution {step}{' ' + gw if gw else ''}")
            case SelectionBatch() if holds(e, scenario.first_selection):
                names.append("first selection")
            case SelectionBatch() if holds(e, scenario.second_selection):
                names.append("second selection")
            case _:
                names.append("")
    return names


def in_order(names: list[str], *expected: str) -> None:
    positions = [names.index(name) for name in expected]
    assert positions == sorted(positions), list(zip(expected, positions, strict=True))


# The scenario in the stream ---------------------------------------------------------------


def test_scenario_is_in_the_stream_in_order_and_well_formed(
    gatefleet: Orchestrator,
    fleet: Fleet,
    bus: Bus,
    prefix: str,
    event_log: EventLog,
    config_file: str,
) -> None:
    started = datetime.now(UTC)
    scenario = run_scenario(fleet, bus, prefix, event_log)
    replayed = json_events(config_file)

    # Everything published, once, in publication order, and nothing else.
    assert [e.id for e in replayed] == [e.id for e in event_log.events]
    assert replayed == event_log.events
    assert len({e.id for e in replayed}) == len(replayed)
    first, *rest = replayed
    assert first.type == "orchestrator.started"  # each run's log opens with its settings
    assert first.ts <= started
    assert all(e.id.startswith("evt-") and started <= e.ts <= scenario.end for e in rest)
    assert {e.type for e in replayed} <= set(EVENT_TYPES)

    names = milestones(replayed, scenario)
    for gw in GATEWAYS:
        in_order(names, f"registered {gw}", f"{gw} healthy", "edge-2 down")
    in_order(
        names,
        "edge-2 down",
        "down edge-2",
        "lb LeastConnections 75",
        "distribution created",
        "distribution batch_sent",
        "distribution gateway_acked edge-1",
        "distribution finished",
    )
    # Selections are stored in batches, up to 100 ms after they were made: their own
    # times place them among the other events.
    times = {name: e.ts for name, e in zip(names, replayed, strict=True)}
    for selection_id, name in (
        (scenario.first_selection, "first selection"),
        (scenario.second_selection, "second selection"),
    ):
        batch, record = next((e, r) for e in replayed if (r := holds(e, selection_id)))
        assert isinstance(batch, SelectionBatch)
        times[name] = selection_ts(batch, record)
    assert max(times[f"{gw} healthy"] for gw in GATEWAYS) <= times["first selection"]
    assert times["first selection"] <= times["edge-2 down"]
    assert times["lb LeastConnections 75"] <= times["second selection"]
    assert times["second selection"] <= times["distribution created"]
    in_order(names, "distribution batch_sent", "distribution gateway_nacked edge-3")
    in_order(names, "distribution gateway_nacked edge-3", "distribution finished")
    assert names.count("distribution finished") == 1

    # Each decision can be explained from the stream alone.
    first, second = (
        explained(config_file, scenario.first_selection),
        explained(config_file, scenario.second_selection),
    )
    assert (first.strategy, first.threshold, first.region) == ("RoundRobin", 70.0, "us-west")
    assert sorted(c.gateway_id for c in first.candidates) == list(GATEWAYS)
    assert first.excluded == {}
    assert (second.strategy, second.threshold, second.client_id) == (
        "LeastConnections",
        75.0,
        "client-9",
    )
    assert sorted(c.gateway_id for c in second.candidates) == ["edge-1", "edge-3"]
    assert second.excluded == {"edge-2": "status down"}
    assert second.gateway_id in ("edge-1", "edge-3")
    assert all(c.cpu_percent is not None and c.score > 0 for c in second.candidates)
    [nacked] = [
        e for e in replayed if isinstance(e, DistributionEvent) and e.step == "gateway_nacked"
    ]
    assert nacked.details["error"] == "edge-3 cannot route to svc-a"

    # The readable table: a header, then one line per event.
    table = run_audit(config_file).stdout.splitlines()
    assert table[0].split() == ["TIME", "(UTC)", "TYPE", "GATEWAY", "DETAILS"]
    assert len(table) == 1 + len(replayed)
    [batch] = [e for e in replayed if holds(e, scenario.second_selection)]
    assert "1 selection: " in table[1 + replayed.index(batch)]
    assert scenario.second_selection in table[1 + replayed.index(batch)]


def test_filters(
    gatefleet: Orchestrator,
    fleet: Fleet,
    bus: Bus,
    prefix: str,
    event_log: EventLog,
    config_file: str,
) -> None:
    scenario = run_scenario(fleet, bus, prefix, event_log)
    everything = json_events(config_file)

    def ids(events: list[Event]) -> list[str]:
        return [e.id for e in events]

    down = json_events(config_file, "--type", "gateway.down")
    assert [(e.type, getattr(e, "gateway_id", None)) for e in down] == [("gateway.down", "edge-2")]

    lb = json_events(config_file, "--type", "lb")
    assert ids(lb) == ids([e for e in everything if e.type.startswith("lb.")])
    two_types = json_events(config_file, "--type", "lb.changed", "--type", "gateway.registered")
    assert ids(two_types) == ids(
        [e for e in everything if e.type in ("lb.changed", "gateway.registered")]
    )

    dist = json_events(config_file, "--distribution", scenario.distribution_id)
    steps = [e.step for e in dist if isinstance(e, DistributionEvent)]
    assert len(steps) == len(dist) == 5
    assert steps[:2] == ["created", "batch_sent"]
    assert sorted(steps[2:4]) == ["gateway_acked", "gateway_nacked"]
    assert steps[4] == "finished"

    edge_3 = json_events(config_file, "--gateway", "edge-3")
    assert ids(edge_3) == ids([e for e in everything if "edge-3" in gateways_named(e)])
    kinds = {"gateway.registered", "gateway.status_changed", "lb.snapshot", "distribution.step"}
    assert kinds <= {e.type for e in edge_3}
    # The pool's snapshot names edge-3 (a gateway of it); the failure of edge-2 does not.
    assert not any(isinstance(e, GatewayDown) for e in edge_3)
    both = json_events(config_file, "--gateway", "edge-3", "--type", "distribution")
    assert ids(both) == ids([e for e in edge_3 if e.type == "distribution.step"])

    # By storage time: --since / --until between the phases (times and durations).
    before_failure = [e for e in everything if e.ts <= scenario.joined_at]
    since = json_events(config_file, "--since", scenario.joined_at.isoformat())
    until = json_events(config_file, "--until", scenario.joined_at.isoformat())
    assert ids(until) == ids(before_failure)
    assert ids(until) + ids(since) == ids(everything)
    window = json_events(
        config_file,
        "--since",
        scenario.joined_at.isoformat(),
        "--until",
        scenario.failed_at.isoformat(),
    )
    until_failed = json_events(config_file, "--until", scenario.failed_at.isoformat())
    assert ids(until) + ids(window) == ids(until_failed)
    assert [e.type for e in window][:2] == ["gateway.status_changed", "gateway.down"]
    assert all("edge-2" in gateways_named(e) for e in window)  # its failure, and only that
    assert ids(json_events(config_file, "--since", "1h")) == ids(everything)
    assert json_events(config_file, "--since", "now") == []
    assert json_events(config_file, "--type", "ha.alarm") == []


def test_filter_errors_are_usage_errors(config_file: str) -> None:
    runner = CliRunner()
    result = runner.invoke(audit, ["--config", config_file, "--type", "gateway.dwn"])
    assert result.exit_code == 2
    assert "unknown event type 'gateway.dwn' (did you mean 'gateway.down'?)" in result.stderr
    result = runner.invoke(audit, ["--config", config_file, "--since", "yesterday-ish"])
    assert result.exit_code == 2
    assert "neither a time" in result.stderr
    result = runner.invoke(audit, ["--config", config_file, "--gateway", "a.b"])
    assert result.exit_code == 2
    result = runner.invoke(audit, ["--config", config_file, "--since", "2h", "state"])
    assert result.exit_code == 2
    assert "--since goes with `audit`" in result.stderr


def test_no_stream_is_one_line(config_file: str) -> None:
    result = CliRunner().invoke(audit, ["--config", config_file])
    assert result.exit_code == 1
    assert result.stderr.startswith("gatefleet: no event stream")
    assert len(result.stderr.splitlines()) == 1


# Explain ----------------------------------------------------------------------------------


def test_explain_a_selection(
    gatefleet: Orchestrator,
    fleet: Fleet,
    bus: Bus,
    prefix: str,
    event_log: EventLog,
    config_file: str,
) -> None:
    scenario = run_scenario(fleet, bus, prefix, event_log)
    reply = scenario.second_reply
    # Rebuilt from the stream: the pool at that moment, and the selection re-run.
    as_json = explained(config_file, scenario.second_selection)
    assert (as_json.id, as_json.gateway_id) == (scenario.second_selection, reply.gateway_id)
    assert as_json.reason == reply.reason

    # The group's --config is inherited (`audit --config X explain ID`).
    text = run_audit(config_file, "explain", scenario.second_selection).stdout
    for expected in (
        scenario.second_selection,
        "client client-9",
        "LeastConnections",
        "75",
        "load 0.010",  # the strategy's input per candidate: active / max connections
        "edge-1",
        "edge-3",
        "Excluded",
        "status down",
        reply.reason,
    ):
        assert expected in text, expected

    for nope in ("evt-nope", f"sel-{scenario.second_selection.split('-')[1]}-999999"):
        missing = CliRunner().invoke(audit, ["explain", nope, "--config", config_file])
        assert missing.exit_code == 1
        assert missing.stderr.startswith(f"gatefleet: no selection {nope}")


# State at a moment ------------------------------------------------------------------------


def test_state_at_equals_the_live_snapshot_then(
    gatefleet: Orchestrator,
    fleet: Fleet,
    bus: Bus,
    prefix: str,
    event_log: EventLog,
    config_file: str,
) -> None:
    scenario = run_scenario(fleet, bus, prefix, event_log)
    # Life goes on after the snapshots: edge-2 comes back, the strategy changes again.
    mark = event_log.mark()
    fleet.agents["edge-2"].resume_heartbeats()
    healthy(event_log, "edge-2", since=mark)
    # Its return reconciles the Route it missed. Waited for: between a distribution's
    # creation and its actor's first step, the list shows it and no event does yet.
    event_log.wait_for(
        lambda e: (
            isinstance(e, DistributionEvent)
            and isinstance(e.detail, FinishedStep)
            and e.detail.successful == ["edge-2"]
        ),
        since=mark,
    )
    fleet.call(
        "load-balancing.set", LoadBalancingUpdate(strategy="LatencyBased"), LoadBalancingConfig
    )
    event_log.wait_for(lambda e: isinstance(e, LoadBalancingChanged), since=mark)
    later, later_live = snapshot_at(fleet, bus, prefix, event_log)

    moments = {
        "joined": (scenario.joined_at, scenario.snapshots["joined"]),
        "failed": (scenario.failed_at, scenario.snapshots["failed"]),
        "end": (scenario.end, scenario.snapshots["end"]),
        "later": (later, later_live),
    }
    for name, (moment, snapshot) in moments.items():
        result = run_audit(config_file, "state", "--json", "--at", moment.isoformat())
        state = msgspec.json.decode(result.stdout_bytes, type=FleetState)
        assert state.at == moment
        assert rebuilt(state) == snapshot, name
    called = datetime.now(UTC)
    now = msgspec.json.decode(
        run_audit(config_file, "state", "--json").stdout_bytes, type=FleetState
    )
    assert called <= now.at <= datetime.now(UTC)  # --at defaults to now

    # Phases differ (so the comparison means something), and the table renders.
    assert scenario.snapshots["joined"].gateways["edge-2"][0] == "healthy"
    assert scenario.snapshots["failed"].gateways["edge-2"] == ("down", 0.0)
    assert scenario.snapshots["end"].load_balancing == ("LeastConnections", 75.0)
    assert later_live.load_balancing == ("LatencyBased", 75.0)
    reconciled = [d for d in later_live.distributions.values() if d[3] == ["edge-2"]]
    assert [d[0] for d in reconciled] == ["completed"]
    text = run_audit(config_file, "state", "--at", scenario.end.isoformat()).stdout
    assert "LeastConnections" in text
    assert "partially_failed" in text


# Storage ----------------------------------------------------------------------------------


def test_a_duplicate_publish_is_stored_once(
    gatefleet: Orchestrator, bus: Bus, prefix: str, config_file: str
) -> None:
    event = LoadBalancingChanged(
        old_strategy="RoundRobin",
        new_strategy="WeightedRandom",
        old_threshold=70.0,
        new_threshold=70.0,
    )
    subject = Subjects(prefix).event(event.type)
    headers = {"Nats-Msg-Id": event.id}
    first = bus.run(bus.js.publish(subject, encode(event), headers=headers))
    again = bus.run(bus.js.publish(subject, encode(event), headers=headers))
    assert (again.seq, again.duplicate) == (first.seq, True)

    # The orchestrator's own path: its event outbox, twice (acked), then a marker.
    emitted = LoadBalancingChanged(
        old_strategy="WeightedRandom",
        new_strategy="RoundRobin",
        old_threshold=70.0,
        new_threshold=70.0,
    )
    outbox = gatefleet.events
    assert outbox is not None
    outbox.emit(emitted)
    outbox.emit(emitted)
    wait_until(lambda: outbox.settled, what="the outbox's events acked")
    marker = LoadBalancingChanged(
        old_strategy="RoundRobin", new_strategy="RoundRobin", old_threshold=70.0, new_threshold=71.0
    )
    bus.run(bus.js.publish(subject, encode(marker), headers={"Nats-Msg-Id": marker.id}))

    replayed = [e.id for e in json_events(config_file) if e.type != "orchestrator.started"]
    assert replayed == [event.id, emitted.id, marker.id]


def test_events_survive_an_orchestrator_restart_on_the_embedded_server(
    tmp_path: Path, start_orchestrator: Callable[[Settings], Orchestrator]
) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text(
        f'[bus]\nport = 0\ndata_dir = "{tmp_path / "data"}"\n\n'
        '[[gateways]]\nid = "edge-1"\nregion = "eu-west"\n'
    )
    settings = load_settings(config)
    first = start_orchestrator(settings)
    with GatefleetClient(first.url, auth=first.client_auth) as client:
        client.update_load_balancing_config("LatencyBased", 80.0)

    def replay() -> list[Event]:
        return json_events(str(config))

    wait_until(lambda: len(replay()) == 3, what="the first run's events stored")
    before = replay()
    assert [e.type for e in before] == ["orchestrator.started", "gateway.registered", "lb.changed"]
    first.stop()

    second = start_orchestrator(settings)
    assert second.server is not None
    wait_until(lambda: len(replay()) == 6, what="the second run's events stored")
    after = replay()
    assert after[:3] == before
    assert isinstance(after[3], OrchestratorStopped)  # a clean stop: no audit.gap follows
    assert after[3].events_lost == 0
    restarted = after[4]
    assert isinstance(restarted, OrchestratorStarted)
    assert (restarted.strategy, restarted.threshold) == ("LatencyBased", 80.0)  # as stored
    assert isinstance(after[5], GatewayRegistered)
    state = msgspec.json.decode(
        run_audit(str(config), "state", "--json").stdout_bytes, type=FleetState
    )
    assert (state.load_balancing.strategy, state.load_balancing.health_threshold) == (
        "LatencyBased",
        80.0,
    )


def store_registrations(bus: Bus, subject: str, count: int) -> None:
    """`count` gateway.registered events stored on `subject` (acked by the stream)."""

    async def publish() -> None:
        for n in range(count):
            event = GatewayRegistered(gateway_id=f"g-{n}", region="r", source="heartbeat")
            await bus.js.publish_async(subject, encode(event), headers={"Nats-Msg-Id": event.id})
        await bus.js.publish_async_completed()

    bus.run(publish(), timeout=60)


def test_replay_holds_back_a_slow_reader_and_loses_nothing(
    gatefleet: Orchestrator, bus: Bus, prefix: str
) -> None:
    """Tiny batches and a two-batch buffer: the loop side must pause and resume often."""
    subject = Subjects(prefix).event("gateway.registered")

    store_registrations(bus, subject, 3000)
    replay = Replay(bus, stream_name(prefix), [subject], batch_size=7, max_buffered=2)
    with replay:
        seqs = [seq for batch in replay for seq, _, _ in batch]
    assert replay.total == 3000
    assert seqs == list(range(2, 3002))  # after the orchestrator.started event, seq 1


def test_a_read_until_a_stored_time_includes_the_message_stored_then(
    gatefleet: Orchestrator, bus: Bus, prefix: str
) -> None:
    """`audit explain` reads up to its batch's own storage time: the conversion must be
    exact (through a float timestamp, about 1 in 25 was left out, so explain failed)."""
    subject = Subjects(prefix).event("gateway.registered")

    store_registrations(bus, subject, 200)
    with Replay(bus, stream_name(prefix), [subject]) as replay:
        stored = [(seq, ns) for batch in replay for seq, ns, _ in batch]
    assert len(stored) == 200
    for seq, ns in stored:
        assert epoch_ns(until_stored(ns)) >= ns
        with Replay(bus, stream_name(prefix), [subject], until=until_stored(ns)) as replay:
            last = [s for batch in replay for s, _, _ in batch][-1]
        assert last >= seq


def test_a_read_since_a_time_under_several_subjects_starts_at_the_first_of_any(
    gatefleet: Orchestrator, bus: Bus, prefix: str
) -> None:
    """Since a time, a read of several subjects starts at the first message of any of
    them stored since then. nats-server, asked by start time, skipped the snapshot stored
    before two batches: `audit explain` of the first selection then failed (1 in 70
    runs of test_replicas, where two replicas' batches follow their snapshots)."""
    subjects = Subjects(prefix)
    both = [subjects.event(f"test.{name}") for name in ("first", "second", "never")]

    def read(since: datetime | None) -> list[int]:
        with Replay(bus, stream_name(prefix), both, since=since) as replay:
            return [seq for batch in replay for seq, _, _ in batch]

    # As explain read it: a snapshot, the time, a snapshot, then batches.
    store_registrations(bus, both[1], 1)
    since = datetime.now(UTC)
    store_registrations(bus, both[1], 1)
    store_registrations(bus, both[0], 2)
    stored = read(None)
    assert len(stored) == 4
    assert read(since) == stored[1:]
    assert read(datetime.now(UTC)) == []


# Following, and a real process -----------------------------------------------------------


class AuditProcess:
    """`gatefleet audit` in a subprocess, its stdout lines read in the background."""

    def __init__(self, *args: str) -> None:
        # SIGINT as at a terminal: a child of a background job inherits it ignored.
        code = (
            "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from gatefleet.audit import audit; audit(prog_name='gatefleet audit')"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def next_event(self, timeout: float = 10.0) -> Event:
        return decode_event(self.lines.get(timeout=timeout))

    def stop(self) -> tuple[int, bytes]:
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # a failed test leaves no process behind
            self.process.wait(10)
            raise
        self.reader.join(5)
        assert self.process.stderr is not None
        assert self.process.stdout is not None
        err = self.process.stderr.read()
        self.process.stderr.close()
        self.process.stdout.close()
        return code, err


def test_follow_tails_new_events(
    gatefleet: Orchestrator, bus: Bus, prefix: str, config_file: str
) -> None:
    assert gatefleet.events is not None
    emit = gatefleet.events.emit
    old = LoadBalancingChanged(
        old_strategy="RoundRobin", new_strategy="RoundRobin", old_threshold=70.0, new_threshold=71.0
    )
    emit(old)
    # orchestrator.started, then ours
    wait_until(lambda: stored_count(bus, prefix) == 2, what="the old event stored")
    follower = AuditProcess("--config", config_file, "--json", "--follow", "--type", "lb")
    try:
        assert follower.next_event().id == old.id  # the history first
        for n in range(3):
            new = msgspec.structs.replace(old, id=f"evt-new-{n}", new_threshold=72.0 + n)
            emit(new)
            assert follower.next_event().id == new.id
        # Not of the followed type: never shown.
        emit(GatewayRegistered(gateway_id="edge-9", region="x", source="heartbeat"))
        last = msgspec.structs.replace(old, id="evt-last")
        emit(last)
        assert follower.next_event().id == last.id
    finally:
        code, err = follower.stop()
    assert code == 0, err
    assert err == b""


def test_json_output_is_only_events_and_progress_goes_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = ReadProgress(10, "reading S", note_every_s=0.0)
    progress.advance(4)
    progress.advance(6)  # the end: no more notes
    progress.advance(1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "gatefleet: reading S: 4 of 10 events\n"


# Pure pieces ------------------------------------------------------------------------------


NOW = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("2h", NOW - timedelta(hours=2)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("90s", NOW - timedelta(seconds=90)),
        ("7d", NOW - timedelta(days=7)),
        ("250ms", NOW - timedelta(milliseconds=250)),
        ("2026-11-27T06:00:00Z", datetime(2026, 11, 27, 6, tzinfo=UTC)),
        ("2026-11-27 06:00", datetime(2026, 11, 27, 6, tzinfo=UTC)),  # no offset: UTC
        ("2026-11-27T08:00:00+02:00", datetime(2026, 11, 27, 6, tzinfo=UTC)),
        ("2026-11-27", datetime(2026, 11, 27, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "2x", "h2", "tomorrow", "2026-13-01"])
def test_parse_when_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="neither a time"):
        parse_when(text, NOW)


def test_filter_subjects() -> None:
    subjects = Subjects("p")
    assert EventFilter.build([]).subjects(subjects) == ["p.events.>"]
    assert EventFilter.build(["ha"]).subjects(subjects) == [
        "p.events.ha.alarm",
        "p.events.ha.failback",
        "p.events.ha.failover",
        "p.events.ha.reconcile",
    ]
    by_dist = EventFilter.build([], distribution="dist-1")
    assert by_dist.subjects(subjects) == ["p.events.distribution.step", "p.events.ha.reconcile"]
    assert by_dist.needs_decoding
    assert "p.events.lb.changed" not in EventFilter.build([], gateway="g").subjects(subjects)
    with pytest.raises(ValueError, match="no event of these types"):
        EventFilter.build(["lb.changed"], gateway="g")


def test_a_capped_selection_says_how_many_it_leaves_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """lb.selected keeps the chosen candidate and the best others, and the first excluded:
    the counts say how many there were, and the strategy's measure is shown as recorded."""
    event = GatewaySelected(
        region=None,
        client_id=None,
        strategy="WeightedRandom",
        threshold=70.0,
        gateway_id="edge-2",
        reason="WeightedRandom over 4000 eligible gateways, weighted by health score",
        candidates=[
            CandidateView(gateway_id="edge-2", region="eu", score=80.0, measure=0.0002),
            CandidateView(gateway_id="edge-1", region="eu", score=99.0, measure=0.00025),
        ],
        candidate_count=4000,
        excluded={"edge-0": "status down"},
        excluded_count=1000,
    )
    gateway, line = summary(event)
    assert gateway == "edge-2"
    assert "4000 candidates, 1000 excluded" in line
    assert strategy_input(event, event.candidates[1]) == "0% chance"
    show_selection(event)
    shown = capsys.readouterr().out
    assert "the pick and the best 1 of 4000 candidates" in shown
    assert "the first 1 of 1000 excluded gateways" in shown
    # Events recorded before the counts existed list everything: the lengths are the counts.
    old = msgspec.structs.replace(event, candidate_count=None, excluded_count=None)
    assert "2 candidates, 1 excluded" in summary(old)[1]


def test_explain_reads_a_selection_recorded_one_event_each(
    gatefleet: Orchestrator, bus: Bus, prefix: str, config_file: str
) -> None:
    """Before batches, each selection was an lb.selected event (its id the reply's
    selection_id): a stream that holds them is still explained."""
    event = GatewaySelected(
        region="eu",
        client_id="c-1",
        strategy="RoundRobin",
        threshold=70.0,
        gateway_id="edge-1",
        reason="RoundRobin over 1 eligible gateway",
        candidates=[CandidateView(gateway_id="edge-1", region="eu", score=90.0)],
        excluded={},
    )
    subject = Subjects(prefix).event(event.type)
    bus.run(bus.js.publish(subject, encode(event), headers={"Nats-Msg-Id": event.id}))
    assert explained(config_file, event.id) == event
    assert (
        "RoundRobin over 1 eligible gateway" in run_audit(config_file, "explain", event.id).stdout
    )
