"""Wire schemas: valid bodies decode, invalid ones fail with a path, boundaries hold."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.api import (
    MAX_TARGETS,
    DistributeRequest,
    LoadBalancingUpdate,
    SelectRequest,
    StatusReply,
)
from schemas.codec import decode, encode
from schemas.events import GatewayStatusChanged, decode_event
from schemas.wire import ConfigAck, ConfigPush, Heartbeat, Pong, Redirect

HEARTBEAT: dict[str, Any] = {
    "gateway_id": "edge-1",
    "region": "us-west",
    "seq": 42,
    "ts": "2026-11-28T07:00:00.000Z",
    "cpu_percent": 35.5,
    "memory_percent": 61.0,
    "active_connections": 120,
    "latency_ms": 12.5,
    "max_connections": 1000,
    "role": "primary",
    "backup_for": None,
    "config_versions": {"Route": 7},
    "labels": {"az": "a"},
}


def heartbeat(**changes: Any) -> bytes:
    return msgspec.json.encode({**HEARTBEAT, **changes})


def test_protocol_example_heartbeat_decodes() -> None:
    hb = decode(heartbeat(), Heartbeat)
    assert hb.gateway_id == "edge-1"
    assert hb.config_versions == {"Route": 7}
    assert hb.ts.tzinfo is not None


def test_unknown_fields_are_ignored() -> None:
    assert decode(heartbeat(firmware="1.2"), Heartbeat).seq == 42


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"cpu_percent": 100.1}, "$.cpu_percent"),
        ({"cpu_percent": -0.1}, "$.cpu_percent"),
        ({"memory_percent": "high"}, "$.memory_percent"),
        ({"active_connections": -1}, "$.active_connections"),
        ({"seq": 1.5}, "$.seq"),
        ({"gateway_id": "edge.1"}, "$.gateway_id"),
        ({"gateway_id": "edge*"}, "$.gateway_id"),
        ({"gateway_id": "edge>"}, "$.gateway_id"),
        ({"gateway_id": "edge 1"}, "$.gateway_id"),
        ({"gateway_id": "x" * 65}, "$.gateway_id"),
        ({"gateway_id": ""}, "$.gateway_id"),
        ({"ts": "yesterday"}, "$.ts"),
        ({"latency_ms": -1}, "$.latency_ms"),
        ({"role": "leader"}, "$.role"),
    ],
)
def test_invalid_heartbeats_fail_with_a_path(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=rf"at `\{path}`"):
        decode(heartbeat(**changes), Heartbeat)


@pytest.mark.parametrize(
    "missing",
    ["gateway_id", "region", "seq", "ts", "cpu_percent", "memory_percent", "active_connections"],
)
def test_required_heartbeat_fields(missing: str) -> None:
    body = {k: v for k, v in HEARTBEAT.items() if k != missing}
    with pytest.raises(msgspec.ValidationError, match=f"missing required field `{missing}`"):
        decode(msgspec.json.encode(body), Heartbeat)


@pytest.mark.parametrize("value", [0.0, 100.0])
def test_percent_boundaries_are_inclusive(value: float) -> None:
    assert decode(heartbeat(cpu_percent=value), Heartbeat).cpu_percent == value


def test_id_of_64_chars_is_valid() -> None:
    assert decode(heartbeat(gateway_id="a" * 64), Heartbeat).gateway_id == "a" * 64


def test_malformed_json_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(b"\x00\xffnot json", Heartbeat)


def test_config_push_and_ack_round_trip() -> None:
    push = ConfigPush(
        distribution_id="dist-1234",
        config_type="Route",
        version=8,
        config_data={"routes": [1, 2]},
        attempt=2,
    )
    assert decode(encode(push), ConfigPush) == push
    nack = decode(
        b'{"distribution_id": "dist-1234", "gateway_id": "edge-1", "ok": false,'
        b' "version": 8, "error": "bad route"}',
        ConfigAck,
    )
    assert not nack.ok
    assert nack.error == "bad route"


@pytest.mark.parametrize("config_type", ["Route.x", "", "a b", "Route*"])
def test_config_type_must_be_a_name(config_type: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.config_type"):
        decode(
            msgspec.json.encode({"config_type": config_type, "config_data": {}}), DistributeRequest
        )


def test_target_gateways_are_at_most_20000() -> None:
    def request(count: int) -> bytes:
        targets = [f"gw-{n}" for n in range(count)]
        return msgspec.json.encode(
            {"config_type": "R", "config_data": {}, "target_gateways": targets}
        )

    assert len(decode(request(MAX_TARGETS), DistributeRequest).target_gateways or []) == 20_000
    with pytest.raises(msgspec.ValidationError, match=r"\$\.target_gateways"):
        decode(request(MAX_TARGETS + 1), DistributeRequest)


def test_config_data_must_be_an_object() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.config_data"):
        decode(b'{"config_type": "Route", "config_data": [1]}', DistributeRequest)


def test_redirect_uses_the_protocol_field_names() -> None:
    body = msgspec.json.decode(encode(Redirect(from_="edge-1", to="edge-2", reason="down")))
    assert body == {"from": "edge-1", "to": "edge-2", "reason": "down"}


def test_pong_needs_a_gateway_id() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(b"{}", Pong)


def test_status_reply_has_every_protocol_field() -> None:
    body = msgspec.json.decode(encode(StatusReply()))
    expected = {
        "status",
        "features",
        "active_distributions",
        "successfully_completed_distributions",
        "failed_distributions",
        "gateways_managed",
        "gateways_healthy",
        "load_balancing_strategy",
        "health_check_threshold",
        "ha_enabled",
    }
    assert expected <= set(body)
    assert body["features"] == {
        "load_balancing": "enabled",
        "configuration_distribution": "enabled",
        "health_monitoring": "enabled",
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"strategy": "Fastest"}',
        b'{"health_threshold": 100.5}',
        b'{"health_threshold": -1}',
        b'{"health_threshold": "high"}',
    ],
)
def test_bad_load_balancing_updates_are_rejected(body: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(body, LoadBalancingUpdate)


def test_select_request_fields_are_optional() -> None:
    assert decode(b"{}", SelectRequest) == SelectRequest()


def test_events_round_trip_through_the_union() -> None:
    event = GatewayStatusChanged(
        gateway_id="edge-1", old_status="healthy", new_status="degraded", score=40.0, reason="cpu"
    )
    data = encode(event)
    assert msgspec.json.decode(data)["type"] == "gateway.status_changed"
    assert decode_event(data) == event
    assert event.id.startswith("evt-")


@pytest.mark.parametrize(
    "body",
    [
        b'{"config_type": "Route\\n", "config_data": {}}',
        b'{"config_type": "Route", "config_data": {}, "target_gateways": ["edge-1\\n"]}',
    ],
)
def test_a_trailing_newline_does_not_pass_a_pattern(body: bytes) -> None:
    """Python's `$` matches before a final newline: patterns end in `\\Z` instead."""
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(body, type=DistributeRequest)
