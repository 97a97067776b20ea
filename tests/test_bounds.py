"""Bounds at the edge, over NATS: a request over a documented bound is a bad_request."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from bus.runtime import Bus
from gatefleet.app import Orchestrator
from schemas.api import MAX_TARGETS, ErrorReply
from schemas.codec import decode
from tests.conftest import SettingsFactory


def test_a_distribute_naming_too_many_gateways_is_a_bad_request(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[..., Orchestrator],
    bus: Bus,
    prefix: str,
) -> None:
    """Found by the fuzz: 60,000 unknown ids (a 720 KB request) got `internal`, the spec
    being too large to store, after the type's version counter had moved on."""
    start_orchestrator(make_settings())
    targets = [f"gw-{n:06}" for n in range(MAX_TARGETS + 1)]
    body = msgspec.json.encode(
        {"config_type": "Route", "config_data": {}, "target_gateways": targets}
    )
    reply = decode(bus.ask(f"{prefix}.api.distribute", body, 10), ErrorReply)
    assert reply.error.code == "bad_request"
    assert "$.target_gateways" in reply.error.message
