"""Constrained scalar types shared by the wire messages and the settings."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Final, Literal

from msgspec import Meta


def whole(body: str, max_length: int | None = None) -> Meta:
    r"""A string made of `body` from start to end. Python's `$` also matches before a final
    newline (so "Route\n" would pass), hence `\Z` to validate; the JSON Schemas say `$`
    (schemas/json_schemas.py), the end of the string in ECMA-262 and Go's RE2."""
    return Meta(pattern=f"^{body}\\Z", max_length=max_length)


GATEWAY_ID_BODY: Final = r"[A-Za-z0-9_-]{1,64}"
GATEWAY_ID_RE: Final = re.compile(GATEWAY_ID_BODY)  # for fullmatch

GatewayId = Annotated[str, whole(GATEWAY_ID_BODY)]
# A gatefleet process among the replicas on one cluster (`[cluster] replica_id`).
ReplicaId = Annotated[str, whole(r"[A-Za-z0-9_-]{1,64}")]
Percent = Annotated[float, Meta(ge=0.0, le=100.0)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0, le=1e12)]
# Integers a JSON number holds exactly in every language (2^53): a 400-digit count would
# otherwise pass decoding and overflow arithmetic later.
MAX_COUNT: Final = 2**53
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
# The leader's fencing number (bus/leadership.py): it starts from a Unix time in ms, far
# below 2^53 for many thousand years.
Epoch = Annotated[int, Meta(ge=1, le=MAX_COUNT)]
ConfigType = Annotated[str, whole(r"[A-Za-z0-9_]{1,64}")]
Region = Annotated[str, Meta(min_length=1, max_length=64)]
# An RFC 3339 timestamp. The JSON Schema says so (`format: date-time`); decoding is as lenient
# as a plain datetime (an offset is not required), so that no gateway sending one is refused.
Timestamp = Annotated[datetime, Meta(extra_json_schema={"format": "date-time"})]

StrategyName = Literal[
    "RoundRobin", "LeastConnections", "WeightedRandom", "LatencyBased", "RegionAware"
]
STRATEGIES: Final[tuple[str, ...]] = (
    "RoundRobin",
    "LeastConnections",
    "WeightedRandom",
    "LatencyBased",
    "RegionAware",
)
GatewayStatus = Literal["unknown", "healthy", "degraded", "down"]
Role = Literal["primary", "backup"]
DistributionStatus = Literal[
    "pending",
    "in_progress",
    "completed",
    "partially_failed",
    "failed",
    # Progressive delivery (a distribution with a `rollout`).
    "scheduled",
    "paused",
    "halted",
    "aborted",
    "rolling_back",
    "rolled_back",
]
