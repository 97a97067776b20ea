"""Messages of a running fleet, captured off the wire, against the JSON Schemas checked in
to docs/schemas: a gateway agent heartbeats, answers probes and pushes, fails over and
back, says goodbye; a client calls every endpoint, one request of them bad."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from jsonschema import Draft202012Validator, FormatChecker

from bus.runtime import Bus, Inbound
from gatefleet.app import Orchestrator
from schemas.api import (
    DistributeReply,
    DistributeRequest,
    DistributionActionRequest,
    DistributionGetRequest,
    DistributionListRequest,
    Empty,
    LoadBalancingUpdate,
    MaintenanceRequest,
    ReconcileRequest,
    RollbackRequest,
    Rollout,
    SelectRequest,
)
from schemas.endpoints import ENDPOINTS
from schemas.events import Failback, Failover, GatewayLeft, GatewayMaintenance, utc_now
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.distribution_events import finished
from tests.fleet import Fleet
from tests.test_ha import add_pair

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"
GATEWAYS = [
    {"id": "primary", "region": "us-west"},
    {"id": "backup", "region": "us-west", "role": "backup", "backup_for": "primary"},
    {"id": "other", "region": "eu-west"},
]


def _rfc3339(value: object) -> bool:
    """RFC 3339 with an offset, as gatefleet promises (jsonschema checks date-time only
    with an optional package installed)."""
    if not isinstance(value, str):
        return True
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


def _validators() -> dict[str, Draft202012Validator]:
    formats = FormatChecker(formats=())
    formats.checks("date-time", raises=ValueError)(_rfc3339)
    return {
        path.name.removesuffix(".json"): Draft202012Validator(
            json.loads(path.read_text()), format_checker=formats
        )
        for path in SCHEMAS.glob("*.json")
    }


class Capture:
    """Every message on the server, in the order one subscription receives them (so a
    request is always seen before its reply)."""

    def __init__(self, bus: Bus) -> None:
        self._lock = threading.Lock()
        self.messages: list[Inbound] = []
        bus.subscribe(">", self._on_message)

    def _on_message(self, msg: Inbound) -> None:
        with self._lock:
            self.messages.append(msg)

    def seen(self, subject: str) -> bool:
        with self._lock:
            return any(m.subject == subject for m in self.messages)

    def snapshot(self) -> list[Inbound]:
        with self._lock:
            return list(self.messages)


def _schema_of(prefix: str, msg: Inbound) -> tuple[str, str | None]:
    """The schema of a message under the prefix, and of the reply it expects (or None)."""
    _, kind, *rest = msg.subject.split(".")
    if kind == "gw" and len(rest) == 2:
        verb = rest[1]
        return {
            "heartbeat": ("heartbeat", None),
            "goodbye": ("goodbye", None),
            "config": ("config-push", "config-ack"),
            "ping": ("ping", "pong"),
        }[verb]
    if kind == "api":
        name = ".".join(rest)
        return f"api.{name}.request", f"api.{name}.reply"
    if kind == "redirect":
        return "redirect", None
    if kind == "events":
        return f"event.{'.'.join(rest)}", None
    if kind == "replica" and rest == ["probes"]:
        return "replica.probes", None
    raise AssertionError(f"a message on {msg.subject}, which no schema describes")


def check(prefix: str, captured: list[Inbound]) -> Counter[str]:
    """Validates each message under the prefix, and each reply to one, against its schema;
    returns how many of each schema it checked."""
    validators = _validators()
    awaited: dict[str, str] = {}  # reply subject -> schema of the reply
    checked: Counter[str] = Counter()
    failures = []

    def validate(name: str, msg: Inbound) -> None:
        body = json.loads(msg.data or b"{}")  # an empty request body counts as {}
        if name.endswith(".reply") and "error" in body:
            name = "error-reply"
        schemas = [(name, body)]
        if name == "event.distribution.step":
            schemas.append((f"step.{body['step']}", body["details"]))
        for schema, part in schemas:
            checked[schema] += 1
            for error in validators[schema].iter_errors(part):
                failures.append(f"{msg.subject} ({schema}): {error.message} at {error.json_path}")

    for msg in captured:
        if msg.subject.startswith(f"{prefix}."):
            name, reply_schema = _schema_of(prefix, msg)
            validate(name, msg)
            if reply_schema and msg.reply:
                awaited[msg.reply] = reply_schema
        elif msg.subject in awaited:
            validate(awaited.pop(msg.subject), msg)
    assert not failures, "\n".join(failures[:20])
    return checked


def test_a_running_fleets_messages_match_the_schemas(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    capture = Capture(bus)
    start_orchestrator(
        make_settings(
            health={"heartbeat_interval_ms": 100, "fall": 3, "rise": 2, "probe_interval_ms": 100},
            orchestrator={"load_balancing_strategy": "RegionAware"},
            gateways=GATEWAYS,
        )
    )
    add_pair(fleet, event_log)

    # A client calls every endpoint.
    calls: list[tuple[str, msgspec.Struct | bytes]] = [
        ("status", Empty()),
        ("gateways", Empty()),
        ("select-gateway", SelectRequest(region="us-west", client_id="c-1")),
        ("load-balancing.get", Empty()),
        ("load-balancing.set", LoadBalancingUpdate(health_threshold=60.0)),
    ]
    for name, body in calls:
        fleet.bus.ask(f"{prefix}.api.{name}", body, 5.0)
    distribute = DistributeRequest(config_type="Route", config_data={"path": "/a"})
    dist_id = fleet.call("distribute", distribute, DistributeReply).distribution_id
    finished(event_log, dist_id)
    # A rollout waiting for its window: paused, resumed and aborted; a dry run; a rollback.
    window = Rollout(canary="50%", not_before=utc_now() + timedelta(hours=1))
    held = DistributeRequest(config_type="Acl", config_data={}, rollout=window)
    held_id = fleet.call("distribute", held, DistributeReply).distribution_id
    action = DistributionActionRequest(distribution_id=held_id)
    dry_run = DistributeRequest(config_type="Route", config_data={}, dry_run=True)
    calls = [
        ("distributions.pause", action),
        ("distributions.resume", action),
        ("distributions.abort", action),
        ("distribute", dry_run),
        ("rollback", RollbackRequest(config_type="Route", to_version=1)),
        ("distributions.get", DistributionGetRequest(distribution_id=dist_id)),
        ("distributions.list", DistributionListRequest()),
        ("reconcile", ReconcileRequest(gateway_id="primary")),
        ("failback", b'{"gateway_id": "primary"}'),  # none pending: an error reply
        ("status", b""),  # an empty body counts as {}
    ]
    for name, body in calls:
        fleet.bus.ask(f"{prefix}.api.{name}", body, 5.0)

    # The primary goes quiet, fails over to its backup, comes back; `other` leaves.
    fleet.agents["primary"].pause_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, Failover))
    fleet.agents["primary"].resume_heartbeats()
    event_log.wait_for(lambda e: isinstance(e, Failback))
    drain = MaintenanceRequest(gateway_id="backup", enabled=True, reason="schema capture")
    fleet.bus.ask(f"{prefix}.api.maintenance", drain, 5.0)
    event_log.wait_for(lambda e: isinstance(e, GatewayMaintenance))
    fleet.stop("other")
    event_log.wait_for(lambda e: isinstance(e, GatewayLeft))
    # The events are stored: the last one is on the wire once the test's log has it.
    wait_until(lambda: capture.seen(f"{prefix}.events.gateway.left"), what="gateway.left captured")

    checked = check(prefix, capture.snapshot())
    expected = {
        "heartbeat",
        "config-push",
        "config-ack",
        "ping",
        "pong",
        "goodbye",
        "redirect",
        "error-reply",
        "replica.probes",  # a lone leader shares its probe results all the same
        *(f"api.{e.name}.request" for e in ENDPOINTS),
        *(f"api.{e.name}.reply" for e in ENDPOINTS if e.name != "failback"),
        *(
            f"event.{t}"
            for t in (
                "orchestrator.started",
                "gateway.registered",
                "gateway.status_changed",
                "gateway.down",
                "gateway.recovered",
                "gateway.left",
                "lb.changed",
                "lb.selections",
                "lb.snapshot",
                "distribution.step",
                "ha.failover",
                "ha.failback",
                "gateway.maintenance",
            )
        ),
        *(
            f"step.{s}"
            for s in ("created", "batch_sent", "gateway_acked", "finished", "scheduled", "paused")
        ),
    }
    assert expected <= set(checked), f"never seen: {sorted(expected - set(checked))}"
