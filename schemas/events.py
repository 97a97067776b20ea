"""Events: everything gatefleet decides or observes, published on `P.events.<type>`.

Each event is a frozen Struct tagged by `type` (its subject suffix too), with a unique
`id` (also the `Nats-Msg-Id`, so a re-publish is stored once) and `ts`. The union
`Event` decodes any of them; audit tools match on the concrete classes.
"""

from __future__ import annotations

import itertools
import secrets
import typing
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from schemas.codec import decode
from schemas.types import DistributionStatus, GatewayStatus, Role, StrategyName, Timestamp

# Event ids: 80 random bits drawn once per process, then a counter: unique like a uuid4
# (the stream deduplicates on them), without a system call for randomness per event.
_ID_PREFIX = f"evt-{secrets.token_hex(10)}"
_id_counter = itertools.count()


def new_event_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=False):
    id: str = msgspec.field(default_factory=new_event_id)
    ts: Timestamp = msgspec.field(default_factory=utc_now)

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)


# Gateways ---------------------------------------------------------------------------------


class GatewayRegistered(_Event, frozen=True, tag="gateway.registered"):
    gateway_id: str
    region: str
    source: str  # "heartbeat" or "config"


class GatewayStatusChanged(_Event, frozen=True, tag="gateway.status_changed"):
    gateway_id: str
    old_status: GatewayStatus
    new_status: GatewayStatus
    score: float
    reason: str


class GatewayDown(_Event, frozen=True, tag="gateway.down"):
    gateway_id: str
    missed_heartbeats: int
    reason: str


class GatewayRecovered(_Event, frozen=True, tag="gateway.recovered"):
    gateway_id: str
    score: float


class GatewayFlapping(_Event, frozen=True, tag="gateway.flapping"):
    """A gateway started flapping (`flapping` true: `changes` status changes within
    `window_s`) or stopped (false: healthy for health.flap_hold_s)."""

    gateway_id: str
    flapping: bool
    changes: int
    window_s: float


class GatewayMaintenance(_Event, frozen=True, tag="gateway.maintenance"):
    """A gateway went into maintenance (`enabled` true, when requested) or came back into
    service (false: turned off, then `rise` good heartbeats)."""

    gateway_id: str
    enabled: bool
    reason: str | None = None


class GatewayLeft(_Event, frozen=True, tag="gateway.left"):
    gateway_id: str
    reason: str


class GatewayForgotten(GatewayLeft, frozen=True, tag="gateway.forgotten"):
    """A gateway down for `health.forget_after_s` is forgotten: it leaves as if it had
    said goodbye (a subclass, so whatever reads `gateway.left` reads this too)."""


# Load balancing ---------------------------------------------------------------------------


class LoadBalancingChanged(_Event, frozen=True, tag="lb.changed"):
    old_strategy: StrategyName
    new_strategy: StrategyName
    old_threshold: float
    new_threshold: float
    requested_by: str | None = None


class CandidateView(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A candidate of a selection as the strategy saw it: what it read, and what `audit
    explain` shows. (A whole GatewaySnapshot per candidate made `lb.selected` outgrow the
    server's max_payload at a few thousand gateways.)"""

    gateway_id: str
    region: str
    role: Role = "primary"
    score: float
    # The strategy's own measure of it: connection load (LeastConnections), latency in ms
    # (LatencyBased), chance 0-1 (WeightedRandom); None for RoundRobin or when unknown.
    measure: float | None = None
    active_connections: int | None = None
    max_connections: int | None = None
    latency_ms: float | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None


class GatewaySelected(_Event, frozen=True, tag="lb.selected"):
    """One selection decision, with what is needed to explain it later.

    `candidates`: the chosen one first, then the best others by the strategy's own measure
    (next in turn, lowest load, lowest latency, highest chance), at most 51 in all, of the
    `candidate_count` the strategy chose among. `excluded`: gateways left out of the pool
    and why, the first 50 by id of `excluded_count`. (The caps are the load balancer's
    AUDIT_CANDIDATES and AUDIT_EXCLUDED: an event stays near 12 KiB whatever the fleet's
    size.) The counts are None in events recorded before they existed, which listed every
    candidate and every excluded gateway."""

    region: str | None
    client_id: str | None
    strategy: StrategyName
    threshold: float
    gateway_id: str | None
    reason: str
    candidates: list[CandidateView]
    excluded: dict[str, str]
    candidate_count: int | None = None
    excluded_count: int | None = None
    # Gateways in slow start this selection passed over or chose -> their ramp factor
    # (load_balancing.slow_start_s); empty when none was.
    slow_start: dict[str, float] = msgspec.field(default_factory=dict)
    # The replica that made it (issue 16; None before replicas, or not known).
    replica_id: str | None = None


class PoolRow(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A gateway as the load balancer judged it: what eligibility, the strategies and
    `audit explain` read of its snapshot (a JSON array, in this order, to stay small).
    `seq` is its last heartbeat's: a new one makes LeastConnections forget the picks it
    counted since the previous heartbeat."""

    gateway_id: str
    region: str
    role: Role
    backup_for: str | None
    status: GatewayStatus
    score: float
    active_connections: int | None
    max_connections: int | None
    latency_ms: float | None
    cpu_percent: float | None
    memory_percent: float | None
    seq: int | None
    flapping: bool = False
    maintenance: bool = False
    maintenance_reason: str | None = None


class PoolChange(msgspec.Struct, frozen=True, array_like=True, tag="g", gc=False):
    """A step of an `lb.selections` batch: the pool's next generation, what changed since
    the one before (applied in this order: removed, rows, held, settings). Several steps
    may carry one generation's rows (a large change is split across batches)."""

    generation: int
    removed: list[str] = msgspec.field(default_factory=list)
    rows: list[PoolRow] = msgspec.field(default_factory=list)
    held: list[str] | None = None  # the whole held set, when it changed
    strategy: StrategyName | None = None  # when it changed
    threshold: float | None = None  # when it changed


class SelectionRecord(msgspec.Struct, frozen=True, array_like=True, tag="s", gc=False):
    """A step of an `lb.selections` batch: one selection, made against the latest
    generation before it. Its id is `sel-<run>-<n>` (the reply's selection_id). With the
    pool, its inputs as recorded decide the pick: the client's remembered gateway
    (`sticky`), the rotation cursor of its scope (`cursor`: the id chosen last), the
    random numbers it drew (`draws`) and the ramp of gateways in slow start it met."""

    n: int
    at_ms: int  # after the batch's `ts`
    region: str | None
    client_id: str | None
    sticky: str | None
    cursor: str | None
    draws: list[float]
    slow_start: dict[str, float]
    gateway_id: str | None


SelectionStep = PoolChange | SelectionRecord


class SelectionBatch(_Event, frozen=True, tag="lb.selections"):
    """The load balancer's selections and the pool changes between them, in the order it
    made and applied them, for at most 100 ms (docs/PROTOCOL.md section 5).

    `run` names one load balancer's life (its selection ids are `sel-<run>-<n>`); `seq`
    numbers its batches and snapshot parts together, from 0, so a missing number is a
    message lost. `snapshot_ts` is the `ts` of the `lb.snapshot` these steps build on
    (a replay reads from there). `first`/`last`: the `n` of its first and last selection
    (`last` < `first` when it holds none)."""

    run: str
    seq: int
    snapshot_ts: datetime
    first: int
    last: int
    steps: list[SelectionStep]
    # The replica whose load balancer made them (issue 16; None before replicas).
    replica_id: str | None = None


class SelectionRules(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The settings a run's selections read that only a restart changes."""

    region_inner_strategy: StrategyName
    latency_margin_percent: float
    latency_margin_ms: float
    connection_reference: int
    regions: dict[str, list[str]]


class PoolSnapshot(_Event, frozen=True, tag="lb.snapshot"):
    """The whole pool at one generation, in `parts` events (`part` 0..parts-1, each with
    at most 2,000 rows): every known gateway, the held ones, the settings in force, and
    the picks LeastConnections counts since each gateway's last heartbeat. Recorded at a
    run's first selection and then at most once a minute (and after events were lost),
    so that a replay starts at the last one before the selections it reads."""

    run: str
    seq: int
    generation: int
    part: int
    parts: int
    strategy: StrategyName
    threshold: float
    rules: SelectionRules
    held: list[str]
    picks: dict[str, int]
    rows: list[PoolRow]
    replica_id: str | None = None  # as in SelectionBatch


# Distribution -----------------------------------------------------------------------------


class _Step(msgspec.Struct, frozen=True, kw_only=True):
    """The details of one kind of distribution step (DistributionEvent.details)."""

    @property
    def name(self) -> str:
        return str(self.__struct_config__.tag)


# The most gateway ids a list of a distribution step holds, so that an event of a
# distribution to the largest fleet stays far under NATS's 1 MiB payload limit.
EVENT_MAX_IDS = 1000


class CreatedStep(_Step, frozen=True, tag="created"):
    config_type: str
    version: int
    # The first EVENT_MAX_IDS of each (target_count says how many targets in all).
    target_gateways: list[str]
    unknown_gateways: list[str]
    target_count: int | None = None  # addition


class QueuedStep(_Step, frozen=True, tag="queued"):
    after: str  # the distribution of the same config type it waits behind


class BatchSentStep(_Step, frozen=True, tag="batch_sent"):
    batch: int
    gateways: list[str]
    canary: bool = False  # addition: the rollout's canary, pushed first, alone


class GatewayAckedStep(_Step, frozen=True, tag="gateway_acked"):
    attempts: int


class GatewayNackedStep(_Step, frozen=True, tag="gateway_nacked"):
    attempts: int
    error: str


class GatewayTimedOutStep(_Step, frozen=True, tag="gateway_timed_out"):
    attempts: int
    reason: str
    final: bool
    error: str | None


class GatewayRetriedStep(_Step, frozen=True, tag="gateway_retried"):
    attempt: int


class ResumedStep(_Step, frozen=True, tag="resumed"):
    batch: int
    resent: list[str]
    retry_scheduled: list[str]


class FinishedStep(_Step, frozen=True, tag="finished"):
    status: DistributionStatus
    # The first EVENT_MAX_IDS of each (the counts say how many in all).
    successful: list[str]
    failed: list[str]
    reason: str | None
    successful_count: int | None = None  # addition
    failed_count: int | None = None  # addition


# Progressive delivery (a distribution with a `rollout`).


class ScheduledStep(_Step, frozen=True, tag="scheduled"):
    """It waits for its window: nothing is pushed before `not_before`."""

    not_before: datetime


class StartedStep(_Step, frozen=True, tag="started"):
    """Its window opened (`not_before` has passed): it pushes from now on."""

    not_before: datetime


class PausedStep(_Step, frozen=True, tag="paused"):
    batch: int
    reason: str  # "requested", or "after the canary" (pause_after_canary)


class UnpausedStep(_Step, frozen=True, tag="unpaused"):
    batch: int


class GateStartedStep(_Step, frozen=True, tag="gate_started"):
    """The batch has answered: its gateways that acked must stay healthy until `until`."""

    batch: int
    gateways: list[str]  # the first EVENT_MAX_IDS of them
    until: datetime
    seconds: float


class GatePassedStep(_Step, frozen=True, tag="gate_passed"):
    batch: int


class GatewayUnhealthyStep(_Step, frozen=True, tag="gateway_unhealthy"):
    """A gateway that acked went below the health threshold or down within its gate: it
    counts as failed."""

    reason: str
    failures: int  # failures so far


class HaltedStep(_Step, frozen=True, tag="halted"):
    """More than `max_failures` failed: nothing more is pushed, its version never
    becomes desired state. `rolling_back` (auto_rollback) or `finished` follows."""

    reason: str
    failures: int
    max_failures: int
    skipped_count: int  # targets not pushed (or whose answer is not awaited)


class RollingBackStep(_Step, frozen=True, tag="rolling_back"):
    """Its rollback is created: `rollback_id` pushes version `restores`'s content as
    version `version` to `gateway_count` gateways; `not_pushed` (the first
    EVENT_MAX_IDS) had no previous version to restore and are listed there, not pushed."""

    rollback_id: str
    version: int
    restores: int | None
    gateway_count: int
    not_pushed: list[str]


class VersionMovedStep(_Step, frozen=True, tag="version_moved"):
    """Gateways answered `stale_version`: they hold a version of its type above its own,
    so gatefleet's version counter was behind (its state was reset). The counter moved
    past `held_version` and the distribution starts over as version `to_version`, the
    same content: every target not failed is pushed again (events from here on carry it)."""

    from_version: int
    to_version: int
    held_version: int  # the highest version the gateways answering so hold
    gateways: list[str]  # those that answered so (the first EVENT_MAX_IDS)


Step = (
    CreatedStep
    | QueuedStep
    | BatchSentStep
    | GatewayAckedStep
    | GatewayNackedStep
    | GatewayTimedOutStep
    | GatewayRetriedStep
    | ResumedStep
    | FinishedStep
    | ScheduledStep
    | StartedStep
    | PausedStep
    | UnpausedStep
    | GateStartedStep
    | GatePassedStep
    | GatewayUnhealthyStep
    | HaltedStep
    | RollingBackStep
    | VersionMovedStep
)
STEP_TYPES: dict[str, type[Step]] = {
    str(kind.__struct_config__.tag): kind for kind in typing.get_args(Step)
}


class DistributionEvent(_Event, frozen=True, tag="distribution.step"):
    """A step of a distribution. On the wire `step` names it and `details` holds its
    fields; in code they are one typed `Step` (`DistributionEvent.of`, `.detail`)."""

    distribution_id: str
    config_type: str
    version: int
    step: str
    gateway_id: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def of(
        cls,
        distribution_id: str,
        config_type: str,
        version: int,
        step: Step,
        gateway_id: str | None = None,
    ) -> DistributionEvent:
        return cls(
            distribution_id=distribution_id,
            config_type=config_type,
            version=version,
            step=step.name,
            gateway_id=gateway_id,
            details=msgspec.structs.asdict(step),
        )

    @property
    def detail(self) -> Step | None:
        """The typed step; None for a step this release does not know, or details that
        do not fit it (an event written by another release)."""
        kind = STEP_TYPES.get(self.step)
        if kind is None:
            return None
        try:
            return msgspec.convert(self.details, kind)
        except msgspec.ValidationError:
            return None


# High availability ------------------------------------------------------------------------


class Failover(_Event, frozen=True, tag="ha.failover"):
    from_gateway: str
    to_gateway: str | None
    reason: str


class Failback(_Event, frozen=True, tag="ha.failback"):
    from_gateway: str
    to_gateway: str
    reason: str


class Alarm(_Event, frozen=True, tag="ha.alarm"):
    kind: str
    message: str
    active: bool


class Reconciliation(_Event, frozen=True, tag="ha.reconcile"):
    gateway_id: str
    config_type: str
    desired_version: int
    reported_version: int | None
    distribution_id: str | None
    reason: str


class OrchestratorStarted(_Event, frozen=True, tag="orchestrator.started"):
    """A (re)start: the settings in force from now on; gateways' health starts over."""

    strategy: StrategyName
    threshold: float
    ha_enabled: bool
    # Additions (issue 16): the replica that started, its role then, the leader and its
    # epoch (later changes: `orchestrator.leader`).
    replica_id: str | None = None
    role: Literal["leader", "standby"] | None = None
    leader: str | None = None
    epoch: int | None = None


class OrchestratorStopped(_Event, frozen=True, tag="orchestrator.stopped"):
    """A clean stop: the last event of a run, stored only once every event before it
    was (or, for events the stream never took, once `audit.gap` reported them).
    `events_lost`: events of the run that could not be stored."""

    events_lost: int


class OrchestratorLeader(_Event, frozen=True, tag="orchestrator.leader"):
    """A replica's view of the leadership changed since its `orchestrator.started`
    (issue 16): `replica_id` is the
    replica reporting, `role` its own role now, `leader` the leading replica (null while
    none is known) and `epoch` the leader's epoch."""

    replica_id: str
    role: Literal["leader", "standby"]
    leader: str | None
    epoch: int | None


class AuditGap(_Event, frozen=True, tag="audit.gap"):
    """Events the audit trail may be missing, between `since` and `until` (event times).

    `cause` "not_stored": `events_lost` events emitted in that window could not be stored
    (the stream refused or did not answer until their retries ran out, or too many
    waited); `reason` is the last failure. "unclean_stop": the previous run ended
    without `orchestrator.stopped` (it was killed): `since` is its last stored event,
    `until` this start, `events_lost` null (unknown)."""

    cause: Literal["not_stored", "unclean_stop"]
    since: datetime
    until: datetime
    events_lost: int | None
    reason: str


# Security ---------------------------------------------------------------------------------


class SecurityViolation(_Event, frozen=True, tag="security.violation"):
    """A credential tried what its permissions refuse (read from the embedded server's
    log). At most one event per user every few seconds: `count` is the violations by
    this user since its previous event, this one included."""

    user: str  # `kind:name` of a credential gatefleet issued, else the user's public key
    operation: Literal["publish", "subscribe"]
    subject: str
    count: int = 1
    gateway_id: str | None = None  # the gateway of a gateway credential


Event = (
    OrchestratorStarted
    | OrchestratorStopped
    | OrchestratorLeader
    | AuditGap
    | GatewayRegistered
    | GatewayStatusChanged
    | GatewayDown
    | GatewayRecovered
    | GatewayFlapping
    | GatewayMaintenance
    | GatewayLeft
    | GatewayForgotten
    | LoadBalancingChanged
    | GatewaySelected
    | SelectionBatch
    | PoolSnapshot
    | DistributionEvent
    | Failover
    | Failback
    | Alarm
    | Reconciliation
    | SecurityViolation
)


def decode_event(data: bytes) -> Event:
    """Any event, or DecodeError (however the bytes are wrong)."""
    return decode(data, Event)  # type: ignore[arg-type]  # a union, not a class
