"""The Node.js gateway of examples/node-gateway against gatefleet on a real nats-server: the
wire contract (docs/PROTOCOL.md section 1, docs/schemas) proven in a second language.

Skipped when `node` is not installed, or nats.js is not (`npm ci` in examples/node-gateway,
which .ci/run does wherever node is)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from schemas.api import (
    DistributeReply,
    DistributeRequest,
    Distribution,
    DistributionGetRequest,
)
from schemas.events import GatewayLeft, GatewayRegistered
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.distribution_events import finished
from tests.fleet import Fleet
from tests.test_ha import healthy

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_DIR = ROOT / "examples" / "node-gateway"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (GATEWAY_DIR / "node_modules" / "nats").is_dir(),
        reason="nats.js is not installed: run `npm ci` in examples/node-gateway",
    ),
]


def schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        json.loads((ROOT / "docs" / "schemas" / f"{name}.json").read_text())
    )


def valid(name: str, body: dict[str, Any]) -> dict[str, Any]:
    errors = [e.message for e in schema(name).iter_errors(body)]
    assert not errors, (name, body, errors)
    return body


class NodeGateway:
    """`node gateway.mjs` in a process of its own; its log goes to a file."""

    def __init__(self, log: Path, *args: str) -> None:
        assert NODE is not None
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [NODE, "gateway.mjs", *args], cwd=GATEWAY_DIR, stdout=out, stderr=out
            )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def node_gateway(
    nats_server: EmbeddedServer,
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    prefix: str,
    tmp_path: Path,
) -> Iterator[NodeGateway]:
    health = {"heartbeat_interval_ms": 100, "probe_interval_ms": 100}
    start_orchestrator(make_settings(health=health))
    gateway = NodeGateway(
        tmp_path / "node-gateway.log",
        *("--nats", nats_server.url, "--prefix", prefix, "--interval-ms", "100"),
        *("--id", "edge-js", "--region", "us-west", "--label", "lang=node"),
        *("--reject", "Firewall"),
    )
    yield gateway
    gateway.kill()


def test_node_gateway_speaks_the_wire_contract(
    node_gateway: NodeGateway, fleet: Fleet, bus: Bus, prefix: str, event_log: EventLog
) -> None:
    beats: list[dict[str, Any]] = []

    def on_beat(msg: Inbound) -> None:
        beats.append(json.loads(msg.data))

    bus.subscribe(f"{prefix}.gw.edge-js.heartbeat", on_beat)

    # Its heartbeats register it, and it becomes healthy.
    registered = event_log.wait_for(
        lambda e: isinstance(e, GatewayRegistered) and e.gateway_id == "edge-js", timeout=15
    )
    assert isinstance(registered, GatewayRegistered), node_gateway.output()
    assert (registered.region, registered.source) == ("us-west", "heartbeat")
    healthy(event_log, "edge-js")
    wait_until(lambda: len(beats) >= 2, what="two heartbeats")
    valid("heartbeat", beats[-1])
    assert beats[-1]["seq"] > beats[0]["seq"]

    # It answers pings: gatefleet's prober, and one of ours.
    wait_until(
        lambda: fleet.gateways()["edge-js"].probe_latency_ms is not None,
        what="a probe answered",
        show=lambda: fleet.gateways()["edge-js"],
    )
    pong = valid("pong", json.loads(bus.ask(f"{prefix}.gw.edge-js.ping", b"{}", 5.0)))
    assert pong == {"gateway_id": "edge-js"}
    assert fleet.gateways()["edge-js"].labels == {"lang": "node"}

    # A distribution is applied and acked; the next heartbeats report its version.
    route = DistributeRequest(
        config_type="Route", config_data={"path": "/api"}, target_gateways=["edge-js"]
    )
    reply = fleet.call("distribute", route, DistributeReply)
    done = finished(event_log, reply.distribution_id)
    assert (done.details["status"], done.details["successful"]) == ("completed", ["edge-js"])
    wait_until(
        lambda: fleet.gateways()["edge-js"].config_versions == {"Route": 1},
        what="Route v1 reported in a heartbeat",
    )

    # A push it rejects is a NACK with its reason; a repeated push is answered the same.
    firewall = DistributeRequest(
        config_type="Firewall", config_data={}, target_gateways=["edge-js"]
    )
    firewall_id = fleet.call("distribute", firewall, DistributeReply).distribution_id
    assert finished(event_log, firewall_id).details["status"] == "failed"
    record = fleet.call(
        "distributions.get", DistributionGetRequest(distribution_id=firewall_id), Distribution
    )
    nack = record.gateways["edge-js"]
    assert (nack.state, nack.error) == ("nacked", "config type Firewall is not accepted here")
    push = valid(
        "config-push",
        {
            "distribution_id": "dist-again",
            "config_type": "Route",
            "version": 9,
            "config_data": {},
            "attempt": 1,
            "epoch": None,  # not fenced
        },
    )
    answers = [
        valid(
            "config-ack",
            json.loads(bus.ask(f"{prefix}.gw.edge-js.config", json.dumps(push).encode(), 5.0)),
        )
        for _ in range(2)
    ]
    assert (
        answers[0]
        == answers[1]
        == {
            "distribution_id": "dist-again",
            "gateway_id": "edge-js",
            "ok": True,
            "version": 9,
            "error": None,
            "held_version": None,
            "held_epoch": None,
        }
    )
    # A version lower than the one it holds is refused as stale, with the version held.
    older = json.dumps({**push, "distribution_id": "dist-older", "version": 3}).encode()
    stale = valid("config-ack", json.loads(bus.ask(f"{prefix}.gw.edge-js.config", older, 5.0)))
    assert (stale["ok"], stale["error"], stale["held_version"]) == (False, "stale_version", 9)

    # Fencing: an epoch below the highest seen is refused, with that epoch, before anything
    # else (also a repeat); as high or higher, or none, is answered as ever.
    def answer(body: dict[str, Any]) -> dict[str, Any]:
        raw = bus.ask(f"{prefix}.gw.edge-js.config", json.dumps(body).encode(), 5.0)
        return valid("config-ack", json.loads(raw))

    high = 2**52
    fencing = {**push, "distribution_id": "dist-fencing", "version": 10}
    first = answer({**fencing, "epoch": high})
    repeat = answer({**fencing, "epoch": high - 1})
    equal = answer({**fencing, "version": 11, "epoch": high})
    unfenced = answer({**fencing, "version": 12, "epoch": None})
    assert [(a["ok"], a["held_epoch"]) for a in (first, equal, unfenced)] == [(True, None)] * 3
    assert (repeat["ok"], repeat["error"], repeat["held_epoch"]) == (False, "stale_epoch", high)
    wait_until(
        lambda: fleet.gateways()["edge-js"].config_versions == {"Route": 12},
        what="Route v12 reported in a heartbeat",
    )

    # SIGTERM: it says goodbye, and gatefleet forgets it at once.
    mark = event_log.mark()
    assert node_gateway.stop() == 0, node_gateway.output()
    left = event_log.wait_for(
        lambda e: isinstance(e, GatewayLeft) and e.gateway_id == "edge-js", since=mark
    )
    assert isinstance(left, GatewayLeft)
    wait_until(lambda: "edge-js" not in fleet.gateways(), what="edge-js gone from the table")
    assert "said goodbye (SIGTERM)" in node_gateway.output()
