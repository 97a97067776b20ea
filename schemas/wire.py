"""What a gateway and gatefleet say to each other (PROTOCOL.md section 1).

Unknown fields are ignored (gateways may be newer than us); missing required fields,
wrong types and out-of-range values fail decoding with a path such as `$.cpu_percent`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from schemas.types import (
    MAX_COUNT,
    ConfigType,
    Count,
    Epoch,
    GatewayId,
    NonNegativeFloat,
    Percent,
    Region,
    Role,
    Timestamp,
    whole,
)

Label = Annotated[str, Meta(max_length=256)]
DistributionId = Annotated[str, whole(r"dist-[A-Za-z0-9-]{1,64}")]
Version = Annotated[int, Meta(ge=1, le=MAX_COUNT)]
# A ConfigAck's error when the push's version is lower than the one the gateway holds for
# that config type: gatefleet's version counter is behind, not the content rejected.
STALE_VERSION = "stale_version"
# A ConfigAck's error when the push's epoch is lower than the highest the gateway has seen:
# it came from a leader that another replica has replaced (PROTOCOL.md section 5).
STALE_EPOCH = "stale_epoch"


class _Wire(msgspec.Struct, frozen=True, kw_only=True):
    """Base for wire bodies."""


class Heartbeat(_Wire, frozen=True, gc=False):
    gateway_id: GatewayId
    region: Region
    seq: Count
    ts: Timestamp
    cpu_percent: Percent
    memory_percent: Percent
    active_connections: Count
    latency_ms: NonNegativeFloat | None = None
    max_connections: Annotated[int, Meta(ge=1, le=MAX_COUNT)] | None = None
    role: Role | None = None  # absent: as configured, else primary
    backup_for: GatewayId | None = None
    config_versions: Annotated[dict[ConfigType, Count], Meta(max_length=256)] = msgspec.field(
        default_factory=dict
    )
    labels: Annotated[dict[Label, Label], Meta(max_length=64)] = msgspec.field(default_factory=dict)


class ConfigPush(_Wire, frozen=True):
    distribution_id: DistributionId
    config_type: ConfigType
    version: Version
    config_data: dict[str, Any]
    attempt: Annotated[int, Meta(ge=1)] = 1
    # The sending leader's epoch (an addition): absent, the push is not fenced.
    epoch: Epoch | None = None


class ConfigAck(_Wire, frozen=True, gc=False):
    distribution_id: DistributionId
    gateway_id: GatewayId
    ok: bool
    version: Version
    error: Annotated[str, Meta(max_length=4096)] | None = None
    # With error STALE_VERSION: the version of that type the gateway holds (an addition).
    held_version: Version | None = None
    # With error STALE_EPOCH: the highest epoch the gateway has seen (an addition).
    held_epoch: Epoch | None = None


class Ping(_Wire, frozen=True, gc=False):
    """The probe's request body: `{}`."""


class Pong(_Wire, frozen=True, gc=False):
    gateway_id: GatewayId


class Goodbye(_Wire, frozen=True, gc=False):
    gateway_id: GatewayId


class Redirect(_Wire, frozen=True, gc=False):
    """Published on `P.redirect.<from>` when traffic moves off a gateway (or back)."""

    from_: GatewayId = msgspec.field(name="from")
    to: GatewayId | None
    reason: str
