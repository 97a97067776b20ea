"""Progressive delivery end to end: a real nats-server, the orchestrator and gateway agents,
driven through the public subjects, the CLI and the HTTP API. A canary that nacks halts
the rollout; one that turns unhealthy inside its health gate is rolled back; pause,
resume and abort; a window (`not_before`) holds the push and its type's queue; a restart
during a gate or a rollback resumes it; dry runs and P.api.rollback.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.client import BadRequest, GatefleetClient, NotFound
from gatefleet.gateway import GatewayAgent
from gatefleet.http import HttpApi
from schemas import endpoints as api
from schemas.api import DRY_RUN_ID, ReconcileRequest, Rollout
from schemas.events import DistributionEvent, Reconciliation, utc_now
from schemas.stored import DesiredConfig
from tests import test_distribution
from tests.conftest import EventLog, wait_until
from tests.distribution_events import finished, steps
from tests.fleet import BUSY, IDLE, MutableMetrics
from tests.test_distribution import ROUTE, ConfigFleet

# The distribution tests' fixtures: a fleet whose gateways record what they apply, `run`
# (an orchestrator with short timings: batches of 3, ack timeout 250 ms) and `desired`.
fleet = test_distribution.fleet
run = test_distribution.run
desired = test_distribution.desired


def step(event_log: EventLog, dist_id: str, name: str, timeout: float = 5.0) -> DistributionEvent:
    """The first `name` step of a distribution, waiting for it."""
    event = event_log.wait_for(
        lambda e: (
            isinstance(e, DistributionEvent) and e.distribution_id == dist_id and e.step == name
        ),
        timeout,
    )
    assert isinstance(event, DistributionEvent)
    return event


def pushed(fleet: ConfigFleet, gateway_id: str) -> list[tuple[int, dict[str, Any]]]:
    """(version, content) of every push a gateway applied, in order."""
    return [(p.version, p.config_data) for _, _, p in fleet.applied[gateway_id]]


def unhealthy(agent: GatewayAgent) -> None:
    """Its heartbeats from now on score it below the health threshold."""
    assert isinstance(agent.metrics, MutableMetrics)
    agent.metrics.metrics = BUSY


@pytest.fixture
def cli(nats_server: EmbeddedServer, prefix: str, tmp_path: Path) -> Callable[..., Result]:
    """`gatefleet ARGS...` on this test's server and prefix."""
    config = tmp_path / "client.toml"
    config.write_text(f'[bus]\nurl = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n')

    def invoke(*args: str, stdin: str | None = None) -> Result:
        result = CliRunner().invoke(main, [*args, "--config", str(config)], input=stdin)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        return result

    return invoke


@pytest.fixture
def http(nats_server: EmbeddedServer, prefix: str) -> Iterator[str]:
    """The HTTP API's base URL."""
    server = HttpApi(access_log=False)
    host, port = server.start(nats_server.url, prefix, "127.0.0.1", 0, "")
    yield f"http://{host}:{port}{api.HTTP_PREFIX}"
    server.stop()


def post(url: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 - http: only
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - our test server
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# Halts and rollbacks ------------------------------------------------------------------------


def test_a_canary_that_nacks_halts_with_no_other_gateway_pushed(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    fleet.add_many("gw-1", "gw-2", "gw-3", "gw-4")
    run()
    finished(event_log, client.distribute("Route", {"v": 1}).distribution_id)
    fleet.reject.add("gw-1")

    rollout = Rollout(canary=1, max_failures=0, auto_rollback=True)
    dist_id = client.distribute("Route", {"v": 2}, rollout=rollout).distribution_id
    end = finished(event_log, dist_id)
    # The canary rejected it, so kept its last good config: nothing to roll back.
    assert end.details["status"] == "halted"
    assert end.details["reason"].endswith("; nothing to roll back: no gateway took it")

    [canary] = steps(event_log, dist_id, "batch_sent")
    assert (canary.details["gateways"], canary.details["canary"]) == (["gw-1"], True)
    [halted] = steps(event_log, dist_id, "halted")
    assert (halted.details["failures"], halted.details["skipped_count"]) == (1, 3)
    record = client.get_distribution(dist_id)
    assert record.gateways["gw-1"].state == "nacked"
    assert {gw: record.gateways[gw].state for gw in ("gw-2", "gw-3", "gw-4")} == dict.fromkeys(
        ("gw-2", "gw-3", "gw-4"), "skipped"
    )
    assert record.reason is not None
    assert record.reason.startswith("1 failed, more than max_failures 0 (last: gw-1 rejected it)")
    assert record.rollbacks == []
    assert [gw for gw in fleet.applied if (2, {"v": 2}) in pushed(fleet, gw)] == ["gw-1"]
    # Its version never becomes desired: reconciliation finds every gateway in sync.
    fleet_wide = desired("Route")
    assert fleet_wide is not None
    assert fleet_wide.version == 1
    reconciled = fleet.call(
        api.RECONCILE.name, ReconcileRequest(gateway_id="gw-2"), api.RECONCILE.reply
    )
    assert reconciled.skipped == {"Route": "in sync: runs version 1, desired 1"}
    assert client.status().distributions_by_state["halted"] == 1


def test_a_canary_unhealthy_inside_its_gate_is_rolled_back_to_the_previous_content(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    canary, *_ = fleet.add_many("gw-1", "gw-2", "gw-3")
    run()
    finished(event_log, client.distribute("Route", {"v": 1}).distribution_id)

    rollout = Rollout(canary=1, health_gate_s=5.0, auto_rollback=True)
    dist_id = client.distribute("Route", {"v": 2}, rollout=rollout).distribution_id
    gate = step(event_log, dist_id, "gate_started")
    assert (gate.details["batch"], gate.details["gateways"]) == (1, ["gw-1"])
    assert client.get_distribution(dist_id).phase.startswith("health gate of canary")
    unhealthy(canary)
    assert finished(event_log, dist_id, timeout=10).details["status"] == "rolled_back"

    [failed] = steps(event_log, dist_id, "gateway_unhealthy")
    assert failed.gateway_id == "gw-1"
    assert failed.details["reason"].startswith("degraded (score ")
    [rolling] = steps(event_log, dist_id, "rolling_back")
    assert (rolling.details["restores"], rolling.details["gateway_count"]) == (1, 1)
    record = client.get_distribution(dist_id)
    [rollback_id] = record.rollbacks
    assert record.gateways["gw-1"].state == "unhealthy"
    assert record.reason is not None
    assert record.reason.endswith(f"rolled back by {rollback_id}")
    rollback = client.get_distribution(rollback_id)
    assert (rollback.origin, rollback.rollback_of, rollback.version) == ("rollback", dist_id, 3)
    assert (rollback.status, rollback.successful_gateways) == ("completed", ["gw-1"])
    # The canary is back on the previous content, as a new version; the others never moved.
    assert pushed(fleet, "gw-1") == [(1, {"v": 1}), (2, {"v": 2}), (3, {"v": 1})]
    assert pushed(fleet, "gw-2") == pushed(fleet, "gw-3") == [(1, {"v": 1})]
    fleet_wide = desired("Route")
    assert fleet_wide is not None
    assert fleet_wide.version == 1


def test_a_gateway_with_no_previous_version_is_listed_not_pushed(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    canary, _ = fleet.add_many("gw-1", "gw-2")
    run()
    rollout = Rollout(canary=1, health_gate_s=5.0, auto_rollback=True)
    dist_id = client.distribute("Route", ROUTE, rollout=rollout).distribution_id  # Route's first
    step(event_log, dist_id, "gate_started")
    unhealthy(canary)
    end = finished(event_log, dist_id, timeout=10)

    assert end.details["status"] == "halted"
    [rolling] = steps(event_log, dist_id, "rolling_back")
    assert (rolling.details["restores"], rolling.details["not_pushed"]) == (None, ["gw-1"])
    rollback = client.get_distribution(rolling.details["rollback_id"])
    assert rollback.status == "completed"
    assert rollback.gateways["gw-1"].state == "skipped"
    assert rollback.gateways["gw-1"].error == "no previous version: not rolled back"
    assert end.details["reason"].endswith(f"no gateway had a version to restore ({rollback.id})")
    assert pushed(fleet, "gw-1") == [(1, ROUTE)]
    assert pushed(fleet, "gw-2") == []


# Pause, resume, abort, windows ----------------------------------------------------------------


def test_pause_resume_and_abort_from_the_cli_and_the_api(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    cli: Callable[..., Result],
) -> None:
    fleet.add_many("gw-1", "gw-2", "gw-3", "gw-4")
    run()
    rollout = Rollout(canary=1, pause_after_canary=True)
    dist_id = client.distribute("Route", ROUTE, rollout=rollout).distribution_id
    assert step(event_log, dist_id, "paused").details["reason"] == "after the canary"

    # It holds its type's queue: the next one waits, and both list and status say why.
    later = client.distribute("Route", {"v": 2}).distribution_id
    assert client.status().distribution_blockers == {"Route": dist_id}
    waiting = client.get_distribution(later)
    assert (waiting.status, waiting.blocked_by) == ("pending", dist_id)
    assert waiting.phase == f"waits behind {dist_id} (paused)"
    listed = json.loads(cli("distributions", "--json").output)["distributions"]
    assert [(d["id"], d["phase"]) for d in listed] == [
        (dist_id, "paused after the canary"),
        (later, f"waits behind {dist_id} (paused)"),
    ]
    assert [len(pushed(fleet, gw)) for gw in sorted(fleet.applied)] == [1, 0, 0, 0]

    resumed = cli("distributions", "resume", dist_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["status"] == "in_progress"
    assert finished(event_log, dist_id).details["status"] == "completed"
    assert finished(event_log, later).details["status"] == "completed"
    assert client.status().distribution_blockers == {}
    with pytest.raises(BadRequest, match="is completed: it has ended"):
        client.pause_distribution(dist_id)
    with pytest.raises(NotFound):
        client.abort_distribution("dist-00000000-0000-0000-0000-000000000000")

    # A scheduled one: paused and resumed (back to its window), then aborted.
    window = Rollout(not_before=utc_now() + timedelta(hours=1))
    scheduled = client.distribute("Route", {"v": 3}, rollout=window).distribution_id
    step(event_log, scheduled, "scheduled")
    assert "paused" in cli("distributions", "pause", scheduled).output
    assert client.resume_distribution(scheduled).status == "scheduled"
    queued = client.distribute("Route", {"v": 4}).distribution_id
    aborted = cli("distributions", "abort", scheduled, "--json")
    assert json.loads(aborted.output)["status"] == "aborted"
    assert finished(event_log, scheduled).details["reason"] == "aborted on request"
    assert finished(event_log, queued).details["status"] == "completed"  # the queue moved on
    assert all((3, {"v": 3}) not in pushed(fleet, gw) for gw in fleet.applied)
    bad = cli("distributions", "pause")
    assert (bad.exit_code, "usage:" in bad.output) == (2, True)


def test_a_held_queue_still_reconciles_gateways_the_holder_does_not_target(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    fleet.add_many("gw-1", "gw-2")
    run()
    finished(event_log, client.distribute("Route", {"v": 1}).distribution_id)
    window = Rollout(not_before=utc_now() + timedelta(hours=1))
    holder = client.distribute("Route", {"v": 2}, ["gw-1"], rollout=window).distribution_id
    step(event_log, holder, "scheduled")

    fleet.add_many("gw-3")  # joins while Route is held: it gets the desired version, 1
    joined = event_log.wait_for(lambda e: isinstance(e, Reconciliation) and e.gateway_id == "gw-3")
    assert isinstance(joined, Reconciliation)
    assert finished(event_log, joined.distribution_id).details["status"] == "completed"
    assert pushed(fleet, "gw-3") == [(1, {"v": 1})]
    assert client.get_distribution(holder).status == "scheduled"
    assert steps(event_log, joined.distribution_id or "", "queued") == []


def test_abort_a_queued_distribution_over_http(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    http: str,
) -> None:
    fleet.add_many("gw-1")
    run()
    window = Rollout(not_before=utc_now() + timedelta(hours=1))
    holder = client.distribute("Route", ROUTE, rollout=window).distribution_id
    step(event_log, holder, "scheduled")
    queued = client.distribute("Route", {"v": 2}).distribution_id

    status, body = post(f"{http}/distributions/{queued}/pause")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert "waits in its queue" in body["error"]["message"]
    status, body = post(f"{http}/distributions/{queued}/abort")
    assert (status, body["status"], body["gateways"]["gw-1"]["state"]) == (
        200,
        "aborted",
        "skipped",
    )
    assert finished(event_log, queued).details["status"] == "aborted"
    status, body = post(f"{http}/distributions/{holder}/abort")
    assert (status, body["status"]) == (200, "aborted")
    assert fleet.applied["gw-1"] == []
    status, body = post(f"{http}/distributions/dist-nothing/resume")
    assert (status, body["error"]["code"]) == (404, "not_found")


def test_not_before_in_the_future_holds_the_push(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    fleet.add_many("gw-1", "gw-2")
    run()
    not_before = utc_now() + timedelta(seconds=1.5)
    dist_id = client.distribute("Route", ROUTE, rollout=Rollout(not_before=not_before))
    scheduled = step(event_log, dist_id.distribution_id, "scheduled")
    assert datetime.fromisoformat(scheduled.details["not_before"]) == not_before
    record = client.get_distribution(dist_id.distribution_id)
    assert (record.status, record.phase) == (
        "scheduled",
        f"scheduled: not before {not_before.isoformat()}",
    )
    assert desired("Route") is None  # a rollout's version is desired once it has completed
    assert fleet.applied == {"gw-1": [], "gw-2": []}

    assert finished(event_log, record.id).details["status"] == "completed"
    [batch] = steps(event_log, record.id, "batch_sent")
    assert batch.ts >= not_before
    assert steps(event_log, record.id, "started")[0].ts >= not_before
    wait_until(lambda: desired("Route") is not None, what="desired state set as it completed")
    fleet_wide = desired("Route")
    assert fleet_wide is not None
    assert (fleet_wide.version, fleet_wide.distribution_id) == (1, record.id)


# Durable: a restart during a gate or a rollback ---------------------------------------------------


def test_a_restart_during_a_health_gate_resumes_it(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    canary, *_ = fleet.add_many("gw-1", "gw-2", "gw-3")
    orchestrator = run()
    finished(event_log, client.distribute("Route", {"v": 1}).distribution_id)
    rollout = Rollout(canary=1, health_gate_s=6.0, auto_rollback=True)
    dist_id = client.distribute("Route", {"v": 2}, rollout=rollout).distribution_id
    gate = step(event_log, dist_id, "gate_started")
    orchestrator.stop()

    mark = event_log.mark()
    run()
    resumed = event_log.wait_for(
        lambda e: isinstance(e, DistributionEvent) and e.step == "resumed", since=mark
    )
    assert isinstance(resumed, DistributionEvent)
    assert resumed.distribution_id == dist_id
    record = client.get_distribution(dist_id)
    assert record.status == "in_progress"
    assert record.gate_until == datetime.fromisoformat(gate.details["until"])
    unhealthy(canary)  # still inside the gate it resumed
    assert finished(event_log, dist_id, timeout=10).details["status"] == "rolled_back"
    assert pushed(fleet, "gw-1")[-1] == (3, {"v": 1})
    assert pushed(fleet, "gw-2") == [(1, {"v": 1})]


def test_a_restart_during_a_rollback_resumes_it(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
) -> None:
    canary, *_ = fleet.add_many("gw-1", "gw-2")
    orchestrator = run(distribution_ack_timeout_ms=60_000)
    finished(event_log, client.distribute("Route", {"v": 1}).distribution_id)
    rollout = Rollout(canary=1, health_gate_s=5.0, auto_rollback=True)
    dist_id = client.distribute("Route", {"v": 2}, rollout=rollout).distribution_id
    step(event_log, dist_id, "gate_started")
    canary.silent_config = True  # the rollback's push stays unanswered
    unhealthy(canary)
    rollback_id = step(event_log, dist_id, "rolling_back").details["rollback_id"]
    step(event_log, rollback_id, "batch_sent")
    wait_until(lambda: len(canary.received) == 3, what="the rollback pushed")
    orchestrator.stop()
    canary.silent_config = False
    assert isinstance(canary.metrics, MutableMetrics)
    canary.metrics.metrics = IDLE

    run(distribution_ack_timeout_ms=60_000)
    assert finished(event_log, rollback_id, timeout=10).details["status"] == "completed"
    assert finished(event_log, dist_id).details["status"] == "rolled_back"
    assert client.get_distribution(dist_id).rollbacks == [rollback_id]
    assert [p.version for _, p in canary.received] == [1, 2, 3, 3]  # sent again on resume


# Dry runs and rollbacks on request ---------------------------------------------------------------


def test_a_dry_run_answers_the_plan_and_stores_nothing(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    cli: Callable[..., Result],
) -> None:
    fleet.add_many("gw-1", "gw-2", "gw-3", "gw-4")
    run()
    finished(event_log, client.distribute("Route", {"v": 1}, ["gw-1", "gw-2"]).distribution_id)

    reply = client.distribute(
        "Route",
        {"v": 2},
        ["gw-4", "gw-1", "gw-2", "gw-3", "ghost"],
        rollout=Rollout(canary=1),
        dry_run=True,
    )
    assert (reply.distribution_id, reply.status) == (DRY_RUN_ID, "dry_run")
    plan = reply.plan
    assert plan is not None
    assert (plan.version, plan.canary, plan.unknown_gateways) == (2, ["gw-4"], ["ghost"])
    assert plan.batches == [["gw-4"], ["gw-1", "gw-2", "gw-3"]]
    assert plan.versions_now == {"gw-4": None, "gw-1": 1, "gw-2": 1, "gw-3": None}
    assert len(client.list_distributions().distributions) == 1
    shown = cli("distribute", "Route", "-", "--dry-run", "--canary", "50%", stdin="{}")
    assert "dry run: Route v2, 2 batches" in shown.output
    assert "1 (canary)" in shown.output
    assert len(client.list_distributions().distributions) == 1
    assert all(len(applied) <= 1 for applied in fleet.applied.values())


def test_rollback_on_request_pushes_an_earlier_content_as_a_new_desired_version(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    cli: Callable[..., Result],
    desired: Callable[[str], DesiredConfig | None],
) -> None:
    fleet.add_many("gw-1", "gw-2")
    run()
    with pytest.raises(NotFound, match="no earlier version of Route"):
        client.rollback("Route")
    for n in (1, 2):
        finished(event_log, client.distribute("Route", {"v": n}).distribution_id)

    back = client.rollback("Route").distribution_id
    assert finished(event_log, back).details["status"] == "completed"
    record = client.get_distribution(back)
    assert (record.origin, record.version, record.rollback_of) == ("rollback", 3, None)
    assert pushed(fleet, "gw-1")[-1] == (3, {"v": 1})
    fleet_wide = desired("Route")
    assert fleet_wide is not None
    assert fleet_wide.version == 3

    again = cli("rollback", "Route", "--to", "2", "--targets", "gw-2", "--wait", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["version"] == 4
    assert pushed(fleet, "gw-2")[-1] == (4, {"v": 2})
    with pytest.raises(NotFound, match="version 99 is not kept"):
        client.rollback("Route", to_version=99)
