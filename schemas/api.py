"""Request and reply bodies of the `P.api.*` subjects (PROTOCOL.md section 2).

The HTTP API returns the same bodies. Requests ignore unknown fields; replies are
always one of these Structs or an `ErrorReply`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.types import (
    ConfigType,
    Count,
    DistributionStatus,
    GatewayId,
    GatewayStatus,
    NonNegativeFloat,
    Percent,
    Region,
    Role,
    StrategyName,
)
from schemas.wire import DistributionId

ErrorCode = Literal["bad_request", "not_found", "unavailable", "internal"]
# The HTTP status of each error code: the HTTP API's status, and the NATS micro error
# headers' `Nats-Service-Error-Code`.
HTTP_STATUS: dict[ErrorCode, int] = {
    "bad_request": 400,
    "not_found": 404,
    "unavailable": 503,
    "internal": 500,
}
ClientId = Annotated[str, Meta(min_length=1, max_length=256)]


class _Body(msgspec.Struct, frozen=True, kw_only=True):
    """Base for API bodies."""


class ErrorDetail(_Body, frozen=True, gc=False):
    code: ErrorCode
    message: str


class ErrorReply(_Body, frozen=True, gc=False):
    error: ErrorDetail


class MaybeError(_Body, frozen=True, gc=False):
    """Just enough of any reply to tell an error reply (`error` set) from the others."""

    error: ErrorDetail | None = None


class Empty(_Body, frozen=True, gc=False):
    """`{}`: the request body of status, load-balancing.get and gateways."""


class Features(_Body, frozen=True):
    load_balancing: str = "enabled"
    configuration_distribution: str = "enabled"
    health_monitoring: str = "enabled"


class StatusReply(_Body, frozen=True):
    status: str = "ok"
    features: Features = msgspec.field(default_factory=Features)
    active_distributions: Count = 0
    successfully_completed_distributions: Count = 0
    failed_distributions: Count = 0
    gateways_managed: Count = 0
    gateways_healthy: Count = 0
    load_balancing_strategy: StrategyName = "RoundRobin"
    health_check_threshold: Percent = 70.0
    ha_enabled: bool = True
    # Additions to the protocol (allowed: optional fields).
    malformed_messages: dict[str, int] = msgspec.field(default_factory=dict)
    actor_restarts: Count = 0
    selections: dict[str, int] = msgspec.field(default_factory=dict)
    gateways_by_status: dict[str, int] = msgspec.field(default_factory=dict)
    distributions_by_state: dict[str, int] = msgspec.field(default_factory=dict)
    # Local health awareness: how late gatefleet's own loop runs (now, and the worst of
    # the last seconds), whether missed heartbeats are not counted right now (it is
    # disconnected or lagging), and the seconds spent so since start.
    orchestrator_lag_ms: NonNegativeFloat = 0.0
    orchestrator_max_lag_ms: NonNegativeFloat = 0.0
    detection_suspended: bool = False
    detection_suspended_s: NonNegativeFloat = 0.0
    # Work shed under overload since start: "requests" answered `unavailable` at once,
    # "heartbeats" coalesced away (newest wins).
    shed: dict[str, int] = msgspec.field(default_factory=dict)


class LoadBalancingConfig(_Body, frozen=True, gc=False):
    """Reply of load-balancing.get/set, and the request of set."""

    strategy: StrategyName
    health_threshold: Percent


class LoadBalancingUpdate(_Body, frozen=True, gc=False):
    """Request of load-balancing.set: either field may be left out to keep it as it is."""

    strategy: StrategyName | None = None
    health_threshold: Percent | None = None


class SelectRequest(_Body, frozen=True, gc=False):
    region: Region | None = None
    client_id: ClientId | None = None


class SelectReply(_Body, frozen=True, gc=False):
    gateway_id: GatewayId | None
    strategy: StrategyName
    reason: str
    # Addition: the audit event that explains this selection (`gatefleet audit explain`).
    selection_id: str | None = None


class DistributeRequest(_Body, frozen=True):
    config_type: ConfigType
    config_data: dict[str, Any]
    target_gateways: list[GatewayId] | None = None


class DistributeReply(_Body, frozen=True):
    distribution_id: DistributionId
    status: str = "pending"


class DistributionGetRequest(_Body, frozen=True):
    distribution_id: DistributionId


class DistributionListRequest(_Body, frozen=True):
    include_completed: bool = True


GatewayDeliveryState = Literal[
    "pending", "sent", "acked", "nacked", "timed_out", "retrying", "failed"
]


class GatewayDelivery(_Body, frozen=True):
    state: GatewayDeliveryState = "pending"
    attempts: Count = 0
    error: str | None = None


class Distribution(_Body, frozen=True):
    id: DistributionId
    status: DistributionStatus
    config_type: ConfigType
    version: Count
    target_gateways: list[str]
    successful_gateways: list[str]
    failed_gateways: list[str]
    gateways: dict[str, GatewayDelivery]
    created_at: datetime
    completed_at: datetime | None = None
    # Additions: why it ended as it did (e.g. "no targets"), and the batch in flight.
    reason: str | None = None
    batch: Count = 0
    # Addition: "reconcile" for a push of a gateway's desired version (P.api.reconcile or
    # automatic), "distribute" for P.api.distribute.
    origin: Literal["distribute", "reconcile"] = "distribute"


class DistributionListReply(_Body, frozen=True):
    distributions: list[Distribution]


class GatewaySnapshot(_Body, frozen=True, gc=False):
    """One gateway as gatefleet sees it: a row of `P.api.gateways` and of the LB table."""

    gateway_id: GatewayId
    region: str
    role: Role = "primary"
    backup_for: GatewayId | None = None
    status: GatewayStatus = "unknown"
    score: Percent = 0.0
    cpu_percent: Percent | None = None
    memory_percent: Percent | None = None
    active_connections: Count | None = None
    max_connections: int | None = None
    # The gateway's own measure, from its heartbeat.
    reported_latency_ms: NonNegativeFloat | None = None
    # gatefleet's smoothed ping round trip.
    probe_latency_ms: NonNegativeFloat | None = None
    consecutive_failures: Count = 0
    last_seq: int | None = None
    last_seen: datetime | None = None
    # Heartbeats accepted since gatefleet started tracking this gateway.
    heartbeats: Count = 0
    config_versions: dict[str, int] = msgspec.field(default_factory=dict)
    labels: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        """The latency a client would see: our probe if we have one, else the gateway's."""
        return (
            self.probe_latency_ms
            if self.probe_latency_ms is not None
            else (self.reported_latency_ms)
        )


class GatewaysReply(_Body, frozen=True):
    gateways: list[GatewaySnapshot]


class FailbackRequest(_Body, frozen=True):
    """`P.api.failback`: return traffic to a recovered primary (`[ha] failback = "manual"`)."""

    gateway_id: GatewayId


class FailbackReply(_Body, frozen=True):
    gateway_id: GatewayId
    # The gateway that carried its traffic meanwhile (null if none could).
    released_from: GatewayId | None


class ReconcileRequest(_Body, frozen=True):
    """`P.api.reconcile`: `config_type` null means every type with a desired version."""

    gateway_id: GatewayId
    config_type: ConfigType | None = None


class ReconcileReply(_Body, frozen=True):
    # The reconciliations created (or joined while waiting in their queue).
    distributions: list[DistributionId]
    # Config type -> why nothing was pushed for it (in sync, a distribution in flight...).
    skipped: dict[str, str] = msgspec.field(default_factory=dict)
