"""Request and reply bodies of the `P.api.*` subjects (PROTOCOL.md section 2).

The HTTP API returns the same bodies. Requests ignore unknown fields; replies are
always one of these Structs or an `ErrorReply`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

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
    Timestamp,
    whole,
)
from schemas.wire import DistributionId, Version

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

# Paging of `P.api.gateways` and `P.api.distributions.list` (docs/PROTOCOL.md section 5).
# A GatewaySnapshot row is about 360 bytes (about 600 with 64-char ids and a few labels),
# so a page of GATEWAYS_MAX_LIMIT rows stays well under NATS's 1 MiB payload limit.
GATEWAYS_DEFAULT_LIMIT: Final = 500
GATEWAYS_MAX_LIMIT: Final = 1000
DISTRIBUTIONS_DEFAULT_LIMIT: Final = 100
DISTRIBUTIONS_MAX_LIMIT: Final = 1000
# Per-gateway states of one distribution in a reply (`distributions.get`; the first page
# in each row of `distributions.list`). A state is about 200 bytes with a 64-char id.
GATEWAY_STATES_DEFAULT_LIMIT: Final = 500
GATEWAY_STATES_MAX_LIMIT: Final = 1000
# Whatever the limit, a page's rows take at most this many bytes of JSON (a page always
# holds at least one row): the reply stays under the 1 MiB default payload limit even
# when rows are large (labels, a distribution to thousands of gateways).
PAGE_MAX_BYTES: Final = 900 * 1024
# An opaque position: the sort key of the last row of the previous page. "" is no cursor.
Cursor = Annotated[str, Meta(max_length=1024)]
GatewaysLimit = Annotated[int, Meta(ge=1, le=GATEWAYS_MAX_LIMIT)]
DistributionsLimit = Annotated[int, Meta(ge=1, le=DISTRIBUTIONS_MAX_LIMIT)]
GatewayStatesLimit = Annotated[int, Meta(ge=1, le=GATEWAY_STATES_MAX_LIMIT)]


class _Body(msgspec.Struct, frozen=True, kw_only=True):
    """Base for API bodies."""


class ErrorDetail(_Body, frozen=True, gc=False, omit_defaults=True):
    code: ErrorCode
    message: str
    # Addition: when to try again, for an `unavailable` that will pass (no leader yet);
    # left out otherwise, so that every other error body is as it always was.
    retry_after_ms: int | None = None


class ErrorReply(_Body, frozen=True, gc=False):
    error: ErrorDetail


class MaybeError(_Body, frozen=True, gc=False):
    """Just enough of any reply to tell an error reply (`error` set) from the others."""

    error: ErrorDetail | None = None


class Empty(_Body, frozen=True, gc=False):
    """`{}`: the request body of status and load-balancing.get."""


class GatewaysRequest(_Body, frozen=True, gc=False):
    """`P.api.gateways`: one page of gateways, by id; `{}` is the first page of all."""

    limit: GatewaysLimit | None = None  # null: GATEWAYS_DEFAULT_LIMIT
    cursor: Cursor | None = None  # a reply's next_cursor; null or "": the first page
    status: GatewayStatus | None = None
    region: Region | None = None


class Features(_Body, frozen=True):
    load_balancing: str = "enabled"
    configuration_distribution: str = "enabled"
    health_monitoring: str = "enabled"


class Histogram(_Body, frozen=True):
    """Observations in seconds, Prometheus style: `counts[i]` of them were <= `bounds[i]`
    (cumulative), `count` in all, adding up to `sum`."""

    bounds: list[float]
    counts: list[int]
    count: Count = 0
    sum: NonNegativeFloat = 0.0


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
    gateways_flapping: Count = 0
    gateways_in_maintenance: Count = 0
    # How long distributions took, created to ended (those that ended since start).
    distribution_durations_s: Histogram | None = None
    # How long selections took, from the request's arrival to the reply, per strategy.
    selection_latency_s: dict[str, Histogram] = msgspec.field(default_factory=dict)
    distributions_by_state: dict[str, int] = msgspec.field(default_factory=dict)
    # Local health awareness: how late gatefleet's own loop runs (now, and the worst of
    # the last seconds), whether missed heartbeats are not counted right now (it is
    # disconnected or lagging), and the seconds spent so since start.
    orchestrator_lag_ms: NonNegativeFloat = 0.0
    orchestrator_max_lag_ms: NonNegativeFloat = 0.0
    detection_suspended: bool = False
    detection_suspended_s: NonNegativeFloat = 0.0
    # Work shed under overload since start: "requests" answered `unavailable` at once,
    # "heartbeats" coalesced away (newest wins), "probes" not sent while the loop lagged.
    shed: dict[str, int] = msgspec.field(default_factory=dict)
    # The latency prober's counters (sent, answered, timed_out, no_responders, ...).
    probes: dict[str, int] = msgspec.field(default_factory=dict)
    # Each part gatefleet needs -> "ok" or what is wrong: nats, jetstream, load_balancer,
    # distributor, supervisor (/healthz answers 503 naming those not ok).
    health: dict[str, str] = msgspec.field(default_factory=dict)
    # Events the audit stream could not store since start (each reported in the stream
    # by an `audit.gap` event).
    events_lost: Count = 0
    # Permission violations since start per user (`kind:name`), from the embedded
    # server's log; and the test credentials (simulator) that may connect.
    permission_violations: dict[str, int] = msgspec.field(default_factory=dict)
    test_credentials: list[str] = msgspec.field(default_factory=list)
    # Config type -> the scheduled or paused distribution that holds its queue (later
    # distributions of that type wait behind it).
    distribution_blockers: dict[str, str] = msgspec.field(default_factory=dict)
    # The replica that answered (issue 16): its id, its role ("leader" or "standby"), the
    # leading replica's id (null while none is known) and the leader's epoch.
    replica_id: str | None = None
    role: str | None = None
    leader: str | None = None
    epoch: int | None = None


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


RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
# Gateways a distribute may name: a whole fleet at the scale gatefleet is built for. An
# unbounded list (60,000 ids fit in one request) made a spec too large to store.
MAX_TARGETS: Final = 20_000
Targets = Annotated[list[GatewayId], Meta(max_length=MAX_TARGETS)]
# A canary as a share of the targets: "10%", "2.5%" (rounded up to whole gateways).
CanaryPercent = Annotated[str, whole(r"(100(\.0+)?|[1-9]?[0-9](\.[0-9]+)?)%")]
MAX_HEALTH_GATE_S: Final = 86_400.0
# An RFC 3339 time with its offset (a time without one would mean different instants).
ZonedTimestamp = Annotated[datetime, Meta(tz=True, extra_json_schema={"format": "date-time"})]


class Rollout(_Body, frozen=True):
    """Progressive delivery (docs/PROTOCOL.md section 5): a canary pushed first, alone;
    after each batch a health gate; a halt (and, asked for, a rollback) once more than
    `max_failures` gateways failed; a pause after the canary; a time before which
    nothing is pushed."""

    canary: Count | CanaryPercent = 0  # gateways (or a share of them) pushed first, alone
    # After each batch, its gateways must stay healthy (at or above the health threshold,
    # not down) this long, or they count as failed although they acked. 0: no gate.
    health_gate_s: Annotated[float, Meta(ge=0.0, le=MAX_HEALTH_GATE_S)] = 0.0
    # Failures tolerated (nacks, timeouts after retries, failed health gates) before it
    # halts: no further push, and its version never becomes desired state.
    max_failures: Count = 0
    # On a halt, the gateways that got the new version are pushed the previous one's
    # content as a new, higher version (a distribution of origin "rollback").
    auto_rollback: bool = False
    pause_after_canary: bool = False  # wait for P.api.distributions.resume after it
    not_before: ZonedTimestamp | None = None  # nothing is pushed before (a window)


class DistributeRequest(_Body, frozen=True):
    config_type: ConfigType
    config_data: dict[str, Any]
    target_gateways: Targets | None = None
    # Addition: the same request_id within 24 h answers the same distribution and starts
    # nothing new, so a client may retry a distribute whose answer it did not get.
    request_id: RequestId | None = None
    # Additions: progressive delivery (null: every batch at once, as before), and a dry
    # run (nothing stored or pushed: the reply's `plan` says what would happen).
    rollout: Rollout | None = None
    dry_run: bool = False


class DistributionPlan(_Body, frozen=True):
    """What a distribute would do (`dry_run`): nothing of it is stored or pushed."""

    config_type: ConfigType
    version: Count  # the version it would get
    # Its targets in batch order; the first batch is the canary when it has one.
    batches: list[list[str]]
    canary: list[str]
    # Each target -> the version of `config_type` it holds now (null: none known).
    versions_now: dict[str, int | None]
    unknown_gateways: list[str]  # listed ids gatefleet does not know: never pushed
    # The distribution of that type it would wait behind (null: it would start at once).
    waits_behind: DistributionId | None
    not_before: Timestamp | None


# The distribution_id of a dry run's reply: no distribution has it.
DRY_RUN_ID: Final = "dist-dry-run"


class DistributeReply(_Body, frozen=True):
    distribution_id: DistributionId  # DRY_RUN_ID for a dry run
    status: str = "pending"  # "dry_run" for a dry run
    plan: DistributionPlan | None = None  # addition: a dry run's answer


class DistributionActionRequest(_Body, frozen=True):
    """`P.api.distributions.pause`, `.resume`, `.abort`: answered with the Distribution as
    it is after the action."""

    distribution_id: DistributionId


class RollbackRequest(_Body, frozen=True):
    """`P.api.rollback`: push an earlier version's content again, as a new version (origin
    "rollback"), answered like distribute."""

    config_type: ConfigType
    # Null: the newest version older than the one now desired that a distribution made
    # desired (and whose content is kept).
    to_version: Version | None = None
    target_gateways: Targets | None = None  # null: every active gateway


class DistributionGetRequest(_Body, frozen=True):
    """`P.api.distributions.get`: the distribution with one page of its per-gateway
    states, in target order; `{"distribution_id": ...}` is the first page."""

    distribution_id: DistributionId
    # Additions: paging of the per-gateway states (optional).
    limit: GatewayStatesLimit | None = None  # null: GATEWAY_STATES_DEFAULT_LIMIT
    cursor: Cursor | None = None  # a reply's next_cursor; null or "": the first page


class DistributionListRequest(_Body, frozen=True):
    """`P.api.distributions.list`: one page, oldest first (by created_at, then id)."""

    include_completed: bool = True
    # Additions: paging and filters (all optional: `{}` is the first page).
    limit: DistributionsLimit | None = None  # null: DISTRIBUTIONS_DEFAULT_LIMIT
    cursor: Cursor | None = None
    status: DistributionStatus | None = None
    config_type: ConfigType | None = None


GatewayDeliveryState = Literal[
    "pending",
    "sent",
    "acked",
    "nacked",
    "timed_out",
    "retrying",
    "failed",
    # Progressive delivery: acked, then not healthy within the health gate (a failure);
    # not pushed (or no answer awaited) because the distribution halted or was aborted,
    # or, in a rollback, a gateway with no previous version to restore.
    "unhealthy",
    "skipped",
]


Origin = Literal["distribute", "reconcile", "rollback"]


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
    created_at: Timestamp
    completed_at: Timestamp | None = None
    # Additions: why it ended as it did (e.g. "no targets"), and the batch in flight.
    reason: str | None = None
    batch: Count = 0
    # Addition: "reconcile" for a push of a gateway's desired version (P.api.reconcile or
    # automatic), "distribute" for P.api.distribute, "rollback" for an earlier version's
    # content pushed again (P.api.rollback, or a rollout's automatic rollback).
    origin: Origin = "distribute"
    # Addition: the distribute request's `request_id`, if it had one.
    request_id: str | None = None
    # Additions, progressive delivery: the request's rollout (null: none); the batches
    # planned; the position in `target_gateways` where the current batch starts; when
    # the current batch's health gate ends (null: none running); the last batch whose
    # gate is over (or started); the distribution this one rolls back (origin
    # "rollback", automatic) and the rollbacks of this one.
    rollout: Rollout | None = None
    batch_count: Count = 0
    batch_start: Count = 0
    gate_until: Timestamp | None = None
    gated_batch: Count = 0
    rollback_of: DistributionId | None = None
    rollbacks: list[str] = msgspec.field(default_factory=list)


class DistributionPage(Distribution, frozen=True):
    """A Distribution as the API answers it: every field as in the record, except that
    `target_gateways`, `gateways`, `successful_gateways` and `failed_gateways` hold only
    the gateways of one page of targets (all of them when they fit in one page); the
    counts are of every target."""

    target_count: Count = 0
    successful_count: Count = 0
    failed_count: Count = 0
    # Targets per delivery state (pending, sent, acked, ...).
    state_counts: dict[str, int] = msgspec.field(default_factory=dict)
    # Pass it as `cursor` to distributions.get for the next page; null on the last page.
    next_cursor: str | None = None
    # Where it stands, for people: "canary", "batch 2 of 5", "health gate of batch 2: 3.5
    # s left", "paused after the canary", "waits behind dist-… (paused)", ...
    phase: str = ""
    # A pending distribution waiting behind a scheduled or paused one of its type: that one.
    blocked_by: str | None = None


class DistributionListReply(_Body, frozen=True):
    # Each with the first page of its per-gateway states (see DistributionPage).
    distributions: list[DistributionPage]
    # Addition: pass it as `cursor` for the next page; null on the last page.
    next_cursor: str | None = None


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
    last_seen: Timestamp | None = None
    # Heartbeats accepted since gatefleet started tracking this gateway.
    heartbeats: Count = 0
    config_versions: dict[str, int] = msgspec.field(default_factory=dict)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    # Status changed health.flap_threshold times within health.flap_window_s, and not yet
    # healthy for health.flap_hold_s since: not selected, not failed back to.
    flapping: bool = False
    # In maintenance (P.api.maintenance): not selected, its traffic moved to a backup, not
    # reconciled; after maintenance is turned off, until `rise` good heartbeats.
    maintenance: bool = False
    maintenance_reason: str | None = None

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
    # Pass it as `cursor` for the next page; null on the last page.
    next_cursor: str | None = None


class FailbackRequest(_Body, frozen=True):
    """`P.api.failback`: return traffic to a recovered primary (`[ha] failback = "manual"`)."""

    gateway_id: GatewayId


class FailbackReply(_Body, frozen=True):
    gateway_id: GatewayId
    # The gateway that carried its traffic meanwhile (null if none could).
    released_from: GatewayId | None


class MaintenanceRequest(_Body, frozen=True):
    """`P.api.maintenance`: drain a gateway (`enabled` true) or return it (false)."""

    gateway_id: GatewayId
    enabled: bool
    reason: Annotated[str, Meta(max_length=256)] | None = None


class MaintenanceReply(_Body, frozen=True):
    gateway_id: GatewayId
    # As requested; a gateway turned off stays out of selection until `rise` good
    # heartbeats (its record's `maintenance` turns false then).
    enabled: bool
    reason: str | None = None


class ReconcileRequest(_Body, frozen=True):
    """`P.api.reconcile`: `config_type` null means every type with a desired version."""

    gateway_id: GatewayId
    config_type: ConfigType | None = None


class ReconcileReply(_Body, frozen=True):
    # The reconciliations created (or joined while waiting in their queue).
    distributions: list[DistributionId]
    # Config type -> why nothing was pushed for it (in sync, a distribution in flight...).
    skipped: dict[str, str] = msgspec.field(default_factory=dict)
