"""Messages actors tell each other (in-process only; the wire vocabulary is in schemas/).

Requests from the bus carry `reply`, the subject the actor publishes its answer on.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pykka

from schemas.api import (
    DistributeRequest,
    Distribution,
    DistributionGetRequest,
    DistributionListRequest,
    FailbackRequest,
    GatewaySnapshot,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    SelectRequest,
)
from schemas.types import GatewayStatus
from schemas.wire import Heartbeat


class _Message(msgspec.Struct, frozen=True, kw_only=True):
    """Base of in-process messages. Those made per heartbeat are `gc=False`, like the
    wire and API bodies they carry (Heartbeat, GatewaySnapshot): made of scalars and such
    bodies, they cannot be part of a reference cycle, so the collector need not track
    them, and their allocations no longer count towards triggering collections."""


# Gateways ---------------------------------------------------------------------------------


class HeartbeatReceived(_Message, frozen=True, gc=False):
    """Discovery (the supervisor's wildcard) -> Supervisor -> a new GatewayActor."""

    heartbeat: Heartbeat
    received_at: float  # receiver's monotonic clock


class HeartbeatsPending(_Message, frozen=True):
    """Bus loop -> GatewayActor: heartbeats wait in its Coalescer (one in flight at most)."""


HEARTBEATS_PENDING = HeartbeatsPending()


class GoodbyeReceived(_Message, frozen=True):
    gateway_id: str


class Tick(_Message, frozen=True):
    """A timer fired; `generation` lets an actor ignore timers it has replaced."""

    generation: int


class ProbeDue(_Message, frozen=True):
    pass


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


# Load balancing ---------------------------------------------------------------------------


class SelectGateway(_Message, frozen=True):
    request: SelectRequest
    reply: str


class GetLoadBalancing(_Message, frozen=True):
    reply: str


class SetLoadBalancing(_Message, frozen=True):
    update: LoadBalancingUpdate
    reply: str


class ListGateways(_Message, frozen=True):
    reply: str


class LoadBalancingInForce(_Message, frozen=True):
    """LoadBalancer -> listeners: the settings now in force."""

    config: LoadBalancingConfig


class AddListener(_Message, frozen=True):
    listener: pykka.ActorRef[Any]


# Status -----------------------------------------------------------------------------------


class GetStatus(_Message, frozen=True):
    reply: str


# Distribution -----------------------------------------------------------------------------


class Distribute(_Message, frozen=True):
    request: DistributeRequest
    reply: str


class GetDistribution(_Message, frozen=True):
    request: DistributionGetRequest
    reply: str


class ListDistributions(_Message, frozen=True):
    request: DistributionListRequest
    reply: str


class DistributionCounts(_Message, frozen=True):
    """Distributor -> Supervisor: the numbers `P.api.status` reports."""

    active: int
    completed: int
    failed: int
    by_state: dict[str, int] = msgspec.field(default_factory=dict)


class DistributionChanged(_Message, frozen=True):
    """DistributionActor -> Distributor: its record as just stored (final once it has ended)."""

    record: Distribution


class PushAnswered(_Message, frozen=True):
    """Bus loop -> DistributionActor: how one ConfigPush attempt ended."""

    gateway_id: str
    attempt: int
    outcome: Literal["ack", "nack", "no_answer"]
    detail: str | None = None  # the nack's error, or why there was no (valid) answer


class RetryDue(_Message, frozen=True):
    """Timer -> DistributionActor: a gateway's retry delay is over."""

    gateway_id: str


class ChildDied(_Message, frozen=True):
    """A supervised actor -> its parent, from the dying actor's thread."""

    kind: str  # the actor class, e.g. "GatewayActor"
    key: str  # what it looked after: a gateway id, a distribution id
    error: str


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


class FailbackRequested(_Message, frozen=True):
    request: FailbackRequest
    reply: str


# Reconciliation ---------------------------------------------------------------------------


class Reconcile(_Message, frozen=True):
    """`P.api.reconcile` -> Distributor: push a gateway's desired versions now (forced)."""

    gateway_id: str
    config_type: str | None  # None: every type with a desired version
    reply: str


class ReconcileDue(_Message, frozen=True):
    """Timer -> Distributor: a gateway's cooldown after timed-out pushes is over."""

    gateway_id: str
