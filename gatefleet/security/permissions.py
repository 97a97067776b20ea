"""What each kind of user may publish and subscribe to, as NATS user JWT permissions.

Allow lists only: whatever is not listed is refused by the server. Nobody but the admin
user (gatefleet itself) may use the JetStream API beyond reading the event stream, so
no credential handed out can delete or purge the stream or a bucket.
"""

from __future__ import annotations

from typing import Any, Literal

from bus.jetstream import stream_name
from schemas.endpoints import ENDPOINTS

Kind = Literal["admin", "gateway", "operator", "read-only", "simulator"]
KINDS: tuple[Kind, ...] = ("admin", "gateway", "operator", "read-only", "simulator")
# Tag of a test credential (the simulator's) in its JWT and in `status`.
TEST_TAG = "gatefleet:test-credential"
# Replies to requests a user received: one each, as NATS's `allow_responses` default.
_RESPONSES = {"max": 1, "ttl": 0}


def _gateway(prefix: str, gateway_id: str) -> dict[str, Any]:
    base = f"{prefix}.gw.{gateway_id}"
    return {
        "pub": {"allow": [f"{base}.heartbeat", f"{base}.goodbye"]},
        "sub": {"allow": [f"{base}.config", f"{base}.ping", f"{prefix}.redirect.>"]},
        "resp": _RESPONSES,
    }


def _event_reader(prefix: str) -> list[str]:
    """The JetStream calls of an ordered consumer on the event stream (`gatefleet audit`)."""
    stream = stream_name(prefix)
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",  # flow-control answers
    ]


def read_only_endpoints() -> list[str]:
    return [endpoint.name for endpoint in ENDPOINTS if not endpoint.writes]


def permissions(kind: Kind, prefix: str, gateway_id: str = "") -> dict[str, Any]:
    """The `pub`/`sub`/`resp` claims of a user of this kind (none for the admin: all)."""
    match kind:
        case "admin":
            return {}
        case "gateway":
            return _gateway(prefix, gateway_id)
        case "simulator":
            return _gateway(prefix, "*")
        case "operator":
            calls = [f"{prefix}.api.>"]
        case "read-only":
            calls = [f"{prefix}.api.{name}" for name in read_only_endpoints()]
    return {
        "pub": {"allow": [*calls, "$SRV.>", *_event_reader(prefix)]},
        "sub": {"allow": ["_INBOX.>"]},
    }
