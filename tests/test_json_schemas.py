"""The JSON Schemas in docs/schemas: current, valid, linked from PROTOCOL.md, and as strict
as the decoders (tests/test_schema_capture.py holds them to a running fleet's messages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from gatefleet.cli import main
from schemas.json_schemas import generate, messages, render

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCHEMAS = DOCS / "schemas"
REGENERATE = "regenerate them: rm docs/schemas/*.json && gatefleet schema --out docs/schemas"


def test_checked_in_schemas_are_current() -> None:
    expected = {name: render(schema) for name, schema in generate().items()}
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in SCHEMAS.glob("*.json")}
    stale = sorted(name for name in expected if on_disk.get(name) != expected[name])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale, f"docs/schemas is stale ({stale}): {REGENERATE}"
    assert not extra, f"docs/schemas has schemas of no message ({extra}): {REGENERATE}"


def test_there_is_a_schema_per_message_and_each_is_valid() -> None:
    schemas = generate()
    assert len(schemas) == len(messages())
    for name in ("heartbeat.json", "config-push.json", "config-ack.json", "pong.json"):
        assert name in schemas
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)


def test_protocol_links_every_schema() -> None:
    protocol = (DOCS / "PROTOCOL.md").read_text()
    assert "](schemas/)" in protocol
    missing = [name for name in generate() if f"`{name.removesuffix('.json')}`" not in protocol]
    assert not missing, f"docs/PROTOCOL.md does not name these schemas: {missing}"


def test_sent_bodies_require_every_field_and_received_ones_only_theirs() -> None:
    schemas = generate()
    push = schemas["config-push.json"]
    assert push["required"] == list(push["properties"])  # `attempt` has a default, yet is sent
    beat = schemas["heartbeat.json"]
    assert "labels" in beat["properties"]
    assert "labels" not in beat["required"]  # a gateway may leave it out
    features = schemas["api.status.reply.json"]["$defs"]["Features"]
    assert features["required"] == list(features["properties"])


def test_bounds_appear_as_json_schema_keywords() -> None:
    beat = generate()["heartbeat.json"]["properties"]
    assert (beat["cpu_percent"]["minimum"], beat["cpu_percent"]["maximum"]) == (0, 100)
    assert beat["seq"]["maximum"] == 2**53
    assert beat["gateway_id"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    assert beat["labels"]["maxProperties"] == 64
    assert beat["config_versions"]["propertyNames"] == {"pattern": "^[A-Za-z0-9_]{1,64}$"}
    assert beat["ts"] == {"format": "date-time", "type": "string"}


HEARTBEAT: dict[str, Any] = {
    "gateway_id": "edge-1",
    "region": "us-west",
    "seq": 42,
    "ts": "2026-11-28T07:00:00.000Z",
    "cpu_percent": 35.5,
    "memory_percent": 61.0,
    "active_connections": 120,
}
ACK: dict[str, Any] = {
    "distribution_id": "dist-1",
    "gateway_id": "edge-1",
    "ok": True,
    "version": 8,
}


def _with(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**body, **changes}


def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


# (schema, body): each accepted by both the decoder and the schema, or rejected by both.
CASES = [
    ("heartbeat", HEARTBEAT),
    ("heartbeat", _with(HEARTBEAT, latency_ms=None, labels={"az": "a"}, unknown_field=1)),
    ("heartbeat", _with(HEARTBEAT, cpu_percent=100.5)),
    ("heartbeat", _with(HEARTBEAT, seq=-1)),
    ("heartbeat", _with(HEARTBEAT, seq=2**53 + 1)),
    ("heartbeat", _with(HEARTBEAT, gateway_id="edge.1")),
    ("heartbeat", _with(HEARTBEAT, region="")),
    ("heartbeat", _with(HEARTBEAT, max_connections=0)),
    ("heartbeat", _with(HEARTBEAT, role="leader")),
    ("heartbeat", _with(HEARTBEAT, labels={f"k{i}": "v" for i in range(65)})),
    ("heartbeat", _with(HEARTBEAT, labels={"k": "v" * 257})),
    ("heartbeat", _with(HEARTBEAT, config_versions={"Bad Type": 1})),
    ("heartbeat", _with(HEARTBEAT, active_connections="many")),
    ("heartbeat", _without(HEARTBEAT, "ts")),
    ("config-ack", ACK),
    ("config-ack", _with(ACK, ok=False, error="x" * 4096)),
    ("config-ack", _with(ACK, error="x" * 4097)),
    ("config-ack", _with(ACK, version=0)),
    ("config-ack", _with(ACK, distribution_id="d-1")),
    ("pong", {"gateway_id": "edge-1"}),
    ("pong", {}),
    ("goodbye", {"gateway_id": "x" * 65}),
    ("api.select-gateway.request", {}),
    ("api.select-gateway.request", {"client_id": ""}),
    ("api.load-balancing.set.request", {"health_threshold": 75}),
    ("api.load-balancing.set.request", {"strategy": "Fastest"}),
    ("api.gateways.request", {"limit": 1000}),
    ("api.gateways.request", {"limit": 1001}),
    ("api.distribute.request", {"config_type": "Route", "config_data": {}}),
    ("api.distribute.request", {"config_type": "Route", "config_data": [], "request_id": ""}),
    ("api.distributions.list.request", {"limit": 0}),
]


@pytest.mark.parametrize(("name", "body"), CASES)
def test_a_schema_accepts_what_the_decoder_accepts(name: str, body: dict[str, Any]) -> None:
    message = next(m for m in messages() if m.name == name)
    data = json.dumps(body).encode()
    try:
        msgspec.json.decode(data, type=message.body)
    except msgspec.ValidationError:
        decodes = False
    else:
        decodes = True
    errors = list(Draft202012Validator(generate()[f"{name}.json"]).iter_errors(body))
    assert decodes == (not errors), (decodes, [e.message for e in errors])


def test_cli_prints_or_writes_them(tmp_path: Path) -> None:
    printed = CliRunner().invoke(main, ["schema"], catch_exceptions=False)
    assert printed.exit_code == 0
    assert json.loads(printed.output) == generate()
    written = CliRunner().invoke(main, ["schema", "--out", str(tmp_path / "out")])
    assert written.exit_code == 0, written.output
    files = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert files == sorted(generate())
    assert (tmp_path / "out" / "heartbeat.json").read_text() == render(generate()["heartbeat.json"])


def test_cli_fails_in_one_line_when_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["schema", "--out", str(blocker / "schemas")])
    assert result.exit_code == 1
    assert result.output.startswith("gatefleet: cannot write the schemas to")
