"""Messages actors tell each other (in-process only; the wire vocabulary is in schemas/).

Requests from the bus carry `reply`, the subject the actor publishes its answer on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import msgspec
import pykka

from actors.coalescer import Coalescer
from schemas.api import Distribution, GatewaySnapshot, Histogram, LoadBalancingConfig
from schemas.endpoints import Endpoint
from schemas.types import GatewayStatus
from schemas.wire import Heartbeat

if TYPE_CHECKING:
    from bus.leadership import LeaseView

# A heartbeat waiting for its actor, with its arrival time on the receiver's monotonic clock.
Arrival = tuple[Heartbeat, float]


class _Message(msgspec.Struct, frozen=True, kw_only=True):
    """Base of in-process messages. Those made per heartbeat are `gc=False`, like the
    wire and API bodies they carry (Heartbeat, GatewaySnapshot): made of scalars and such
    bodies, they cannot be part of a reference cycle, so the collector need not track
    them, and their allocations no longer count towards triggering collections."""


# Gateways ---------------------------------------------------------------------------------


class Discovered(_Message, frozen=True):
    """GatewayRoutes -> Supervisor: the first heartbeat of an id with no route. It waits,
    with those that follow, in `pending` for the actor the supervisor starts."""

    heartbeat: Heartbeat
    pending: Coalescer[Arrival]


class HeartbeatsPending(_Message, frozen=True):
    """GatewayRoutes -> GatewayActor: heartbeats wait in its Coalescer (one in flight at most)."""


HEARTBEATS_PENDING = HeartbeatsPending()


class GoodbyeReceived(_Message, frozen=True):
    gateway_id: str


class ForgetDue(_Message, frozen=True):
    """Timer -> Supervisor: time to forget gateways down for health.forget_after_s."""


class SetMaintenance(_Message, frozen=True):
    """To a GatewayActor: into maintenance, or back (through the rise rule)."""

    enabled: bool
    reason: str | None = None


class FlapCheck(_Message, frozen=True):
    """A flapping gateway may have been healthy long enough (actors/flapping.py)."""


class Tick(_Message, frozen=True):
    """A timer fired; `generation` lets an actor ignore timers it has replaced."""

    generation: int
    # A GatewayActor's staleness check: when it fell due, if gatefleet could see then
    # (None: it could not; bus/awareness.py, "Where a check is dated").
    seen_at: float | None = None


class ProbeAnswered(_Message, frozen=True):
    rtt_ms: float | None  # None: timed out or no responders
    error: str | None = None


class SetThreshold(_Message, frozen=True):
    threshold: float


class GatewayUpdated(_Message, frozen=True, gc=False):
    """GatewayActor -> LoadBalancer (every accepted heartbeat) and Supervisor (on changes)."""

    snapshot: GatewaySnapshot
    old_status: GatewayStatus


class GatewayRemoved(_Message, frozen=True):
    gateway_id: str


# Requests ---------------------------------------------------------------------------------


class Request(_Message, frozen=True, gc=False):
    """Bus edge -> the actor serving `endpoint` (schemas/endpoints.py): a decoded request
    body; the actor publishes the reply (or an error reply) on `reply`."""

    endpoint: Endpoint[Any, Any]
    body: Any
    reply: str


class Leading(_Message, frozen=True):
    """app.py -> Distributor, at each change of this replica's role: only the leader
    loads, runs and resumes distributions and reconciles (issue 16). `epoch`: the
    lease's, while leading (each tenure has its own)."""

    leading: bool
    epoch: int | None = None

    @classmethod
    def of(cls, view: LeaseView) -> Leading:
        """What the lease's view says of this replica's role."""
        leads = view.role == "leader"
        return cls(leading=leads, epoch=view.epoch if leads else None)


class ReportTo(_Message, frozen=True):
    """app.py -> LoadBalancer and Distributor: tell `supervisor` what `P.api.status`
    reports (LoadBalancingInForce, DistributionCounts), now and on every change."""

    supervisor: pykka.ActorRef[Any]


# Load balancing ---------------------------------------------------------------------------


class TableStats(_Message, frozen=True):
    """Asked of the LoadBalancer (a documented hook for benchmarks and tests): answers
    (gateways in its table, sum of their accepted heartbeats, how many are healthy)."""


class LoadBalancingInForce(_Message, frozen=True):
    """LoadBalancer -> listeners: the settings now in force."""

    config: LoadBalancingConfig


# Distribution -----------------------------------------------------------------------------


class DistributionCounts(_Message, frozen=True):
    """Distributor -> Supervisor: the numbers `P.api.status` reports."""

    active: int
    completed: int
    failed: int
    by_state: dict[str, int] = msgspec.field(default_factory=dict)
    durations: Histogram | None = None
    # Config type -> the scheduled or paused distribution holding its queue.
    blockers: dict[str, str] = msgspec.field(default_factory=dict)


class DistributionChanged(_Message, frozen=True):
    """DistributionActor -> Distributor: its record after a step (final once it has ended),
    and the gateways whose state the steps since the last one changed."""

    record: Distribution
    gateways: frozenset[str] = frozenset()


class PushAnswered(_Message, frozen=True):
    """Bus loop -> DistributionActor: how one ConfigPush attempt (of `version`) ended."""

    gateway_id: str
    attempt: int
    version: int
    # "stale": a nack with error stale_version, the gateway holding `held_version`;
    # "stale_epoch": one with error stale_epoch, the gateway having seen `held_epoch`.
    outcome: Literal["ack", "nack", "stale", "stale_epoch", "no_answer"]
    detail: str | None = None  # the nack's error, or why there was no (valid) answer
    held_version: int | None = None
    held_epoch: int | None = None


class RetryDue(_Message, frozen=True):
    """Timer -> DistributionActor: a gateway's retry delay (for `version`) is over."""

    gateway_id: str
    version: int


class CounterBehind(_Message, frozen=True):
    """DistributionActor -> Distributor: a gateway holds `held_version` of its type, more
    than the distribution's version: move the distribution to a version above it (with
    this `content`), and answer VersionMoved."""

    distribution_id: str
    held_version: int
    content: dict[str, Any]


class VersionMoved(_Message, frozen=True):
    """Distributor -> DistributionActor: the version it pushes from now on (stored, with
    its content), or None and why it cannot move."""

    version: int | None
    reason: str | None = None


class NotLeading(_Message, frozen=True):
    """DistributionActor -> Distributor: this replica no longer leads, so the actor has
    stopped without acting; the distribution stays as stored, for the leader to resume.
    `urn`: the actor's (this replica may lead again, and run the distribution in another
    actor, before this one's message arrives)."""

    distribution_id: str
    urn: str


class StartHead(_Message, frozen=True):
    """Timer -> Distributor: start the head of a type's queue again (a rollback the store
    refused is tried again)."""

    config_type: str


class GateDue(_Message, frozen=True):
    """Timer -> DistributionActor: the health gate of `batch` should be over."""

    batch: int


class WakeDue(_Message, frozen=True):
    """Timer -> DistributionActor: a scheduled rollout's `not_before` should have come."""


class GatewayHealth(_Message, frozen=True):
    """Distributor -> DistributionActor (of a rollout targeting it): a gateway became
    healthy, or not (`reason` says how)."""

    gateway_id: str
    healthy: bool
    reason: str


ControlAction = Literal["pause", "resume", "abort"]


class Control(_Message, frozen=True):
    """Distributor -> DistributionActor: P.api.distributions.pause|resume|abort; the
    actor answers on `reply` with its record as it is after it."""

    action: ControlAction
    reply: str


class ChildDied(_Message, frozen=True):
    """A supervised actor -> its parent, from the dying actor's thread."""

    kind: str  # the actor class, e.g. "GatewayActor"
    key: str  # what it looked after: a gateway id, a distribution id
    error: str
    urn: str = ""  # the dead actor's: another may look after `key` already


# High availability -----------------------------------------------------------------------


class FindReplacementFor(_Message, frozen=True):
    """Supervisor -> LoadBalancer: where should a down gateway's traffic go?"""

    gateway_id: str
    reply_to: pykka.ActorRef[Any]


class ReplacementFound(_Message, frozen=True):
    gateway_id: str
    to: str | None
    reason: str


class HoldGateway(_Message, frozen=True):
    gateway_id: str


class ReleaseGateway(_Message, frozen=True):
    gateway_id: str


# Reconciliation ---------------------------------------------------------------------------


class ReconcileDue(_Message, frozen=True):
    """Timer -> Distributor: a gateway's cooldown after timed-out pushes is over."""

    gateway_id: str
