"""The fleet as it was at a moment, rebuilt from events alone (`gatefleet audit state --at`).

A pure fold: no I/O, no clock. Feed it the stream's events in stream order; it keeps
what an operator asks in a post-mortem: each gateway's status and score, the
load-balancing settings, every distribution with its per-gateway states, failovers in
effect and active alarms.

What events cannot tell, and so neither can this:
- a gateway's score between status events (heartbeats are not events): the score shown
  is the one recorded with its last status event;
- the load-balancing settings before the first `lb.changed` read: the caller passes the
  configured ones (`LoadBalancingState(since=None)` says so);
- a distribution waiting in its type's queue has no targets yet (they come with its
  `created` step), and one between its creation and its actor's first step (a few ms)
  is not in the events at all, though `distributions.list` shows it `pending`.

A gateway's registration can be published just *after* its first status change (the
gateway actor handles the first heartbeat while the supervisor is still registering it):
a registration within LATE_REGISTRATION of a change out of `unknown` is taken as that
change's own registration, not as a new one that starts the gateway over as `unknown`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Final

import msgspec

from schemas.api import GatewayDelivery, GatewayDeliveryState
from schemas.events import (
    Alarm,
    BatchSentStep,
    CreatedStep,
    DistributionEvent,
    Event,
    Failback,
    Failover,
    FinishedStep,
    GatewayAckedStep,
    GatewayDown,
    GatewayLeft,
    GatewayNackedStep,
    GatewayRecovered,
    GatewayRegistered,
    GatewayRetriedStep,
    GatewayStatusChanged,
    GatewayTimedOutStep,
    LoadBalancingChanged,
    OrchestratorStarted,
    ResumedStep,
    VersionMovedStep,
)
from schemas.types import DistributionStatus, GatewayStatus, StrategyName

UNKNOWN_GATEWAY = "unknown gateway"  # as actors.distribution_machine records it
# The event types that change the state: a reader need not fetch the others.
FOLDED_TYPES: Final = (
    *("gateway.registered", "gateway.status_changed", "gateway.down", "gateway.recovered"),
    *("gateway.left", "lb.changed", "distribution.step", "ha.failover", "ha.failback"),
    "ha.alarm",
)
LATE_REGISTRATION = timedelta(milliseconds=500)
# What a version move makes pending again: every delivery state but the final failures.
MOVED_STATES: Final = frozenset[GatewayDeliveryState]({"pending", "sent", "retrying", "acked"})


class GatewayState(msgspec.Struct, kw_only=True):
    gateway_id: str
    region: str | None  # None: registered before the oldest event read
    status: GatewayStatus = "unknown"
    score: float = 0.0
    since: datetime | None = None  # when it entered `status`
    reason: str | None = None  # of the last status event


class LoadBalancingState(msgspec.Struct, kw_only=True):
    strategy: StrategyName
    health_threshold: float
    since: datetime | None = None  # None: no lb.changed read, these are the configured ones


class DistributionState(msgspec.Struct, kw_only=True):
    """A distribution as its events tell it: the fields of `schemas.api.Distribution`."""

    id: str
    status: DistributionStatus
    config_type: str
    version: int
    target_gateways: list[str] = msgspec.field(default_factory=list)
    successful_gateways: list[str] = msgspec.field(default_factory=list)
    failed_gateways: list[str] = msgspec.field(default_factory=list)
    gateways: dict[str, GatewayDelivery] = msgspec.field(default_factory=dict)
    created_at: datetime | None = None
    completed_at: datetime | None = None
    reason: str | None = None
    batch: int = 0


class FleetState(msgspec.Struct, kw_only=True):
    at: datetime
    events: int  # events folded in
    gateways: dict[str, GatewayState]
    load_balancing: LoadBalancingState
    distributions: dict[str, DistributionState]
    failovers: dict[str, str | None]  # primary -> the gateway taking its traffic
    alarms: dict[str, str]  # kind -> message, while active


class FleetFold:
    """Applies events one by one; `state(at)` is a copy of the fleet so far."""

    def __init__(self, load_balancing: LoadBalancingState) -> None:
        self.load_balancing = load_balancing
        self.gateways: dict[str, GatewayState] = {}
        self.distributions: dict[str, DistributionState] = {}
        self.failovers: dict[str, str | None] = {}
        self.alarms: dict[str, str] = {}
        self.events = 0
        # Gateway -> time of its change out of `unknown`, until its registration is seen.
        self._first_change: dict[str, datetime] = {}

    def apply(self, event: Event) -> None:
        self.events += 1
        match event:
            case OrchestratorStarted(strategy=strategy, threshold=threshold, ts=ts):
                # A restart: settings as loaded; every gateway's health starts over.
                self.load_balancing = LoadBalancingState(
                    strategy=strategy, health_threshold=threshold, since=ts
                )
                for gateway_id in list(self.gateways):
                    self._set_status(gateway_id, "unknown", 0.0, "orchestrator restarted", ts)
            case GatewayRegistered(gateway_id=gw, region=region, ts=ts):
                first_change = self._first_change.pop(gw, None)
                if first_change is not None and abs(ts - first_change) <= LATE_REGISTRATION:
                    self.gateways[gw].region = region  # late: the change above was its own
                else:
                    self.gateways[gw] = GatewayState(gateway_id=gw, region=region, since=ts)
            case GatewayStatusChanged(gateway_id=gw, new_status=status, score=score):
                self._set_status(gw, status, score, event.reason, event.ts)
                if event.old_status == "unknown":
                    self._first_change[gw] = event.ts
                else:
                    self._first_change.pop(gw, None)
            case GatewayDown(gateway_id=gw, reason=reason, ts=ts):
                self._set_status(gw, "down", 0.0, reason, ts)
            case GatewayRecovered(gateway_id=gw, score=score, ts=ts):
                self._set_status(gw, "healthy", score, None, ts)
            case GatewayLeft(gateway_id=gw):
                self.gateways.pop(gw, None)
                self.failovers.pop(gw, None)  # nothing waits for it any more
                self._first_change.pop(gw, None)
            case LoadBalancingChanged(new_strategy=strategy, new_threshold=threshold, ts=ts):
                self.load_balancing = LoadBalancingState(
                    strategy=strategy, health_threshold=threshold, since=ts
                )
            case DistributionEvent():
                self._distribution(event)
            case Failover(from_gateway=primary, to_gateway=backup):
                self.failovers[primary] = backup
            case Failback(to_gateway=primary):
                self.failovers.pop(primary, None)
            case Alarm(kind=kind, message=message, active=active):
                if active:
                    self.alarms[kind] = message
                else:
                    self.alarms.pop(kind, None)
            case _:
                pass  # selections and reconciliations change no state

    def state(self, at: datetime) -> FleetState:
        return copy.deepcopy(
            FleetState(
                at=at,
                events=self.events,
                gateways=dict(sorted(self.gateways.items())),
                load_balancing=self.load_balancing,
                distributions=self.distributions,
                failovers=self.failovers,
                alarms=self.alarms,
            )
        )

    # Internals ---------------------------------------------------------------------------

    def _set_status(
        self,
        gateway_id: str,
        status: GatewayStatus,
        score: float,
        reason: str | None,
        ts: datetime,
    ) -> None:
        """`reason` None keeps the last one (a gateway.recovered after its status change)."""
        gateway = self.gateways.get(gateway_id)
        if gateway is None:  # registered before the oldest event read
            gateway = self.gateways[gateway_id] = GatewayState(gateway_id=gateway_id, region=None)
        if gateway.status != status:
            gateway.since = ts
        gateway.status, gateway.score = status, score
        if reason is not None:
            gateway.reason = reason

    def _distribution(self, event: DistributionEvent) -> None:
        dist = self.distributions.get(event.distribution_id)
        if dist is None:
            dist = self.distributions[event.distribution_id] = DistributionState(
                id=event.distribution_id,
                status="pending",
                config_type=event.config_type,
                version=event.version,
                created_at=event.ts,
            )
        gw = event.gateway_id
        match event.detail:
            case CreatedStep(target_gateways=targets, unknown_gateways=unknown):
                _created(dist, targets, set(unknown))
            case BatchSentStep(batch=batch, gateways=sent):
                dist.batch = batch
                for target in sent:
                    if target not in dist.gateways:  # past the ids `created` lists
                        dist.target_gateways.append(target)
                    dist.gateways[target] = GatewayDelivery(state="sent", attempts=1)
            case GatewayAckedStep(attempts=attempts) if gw is not None:
                _deliver(dist, gw, "acked", attempts, None)
                dist.successful_gateways.append(gw)
            case GatewayNackedStep(attempts=attempts, error=error) if gw is not None:
                _deliver(dist, gw, "nacked", attempts, error or "rejected")
                dist.failed_gateways.append(gw)
            case GatewayTimedOutStep(attempts=attempts, final=final, error=error) if gw:
                _deliver(dist, gw, "failed" if final else "retrying", attempts, error)
                if final:
                    dist.failed_gateways.append(gw)
            case GatewayRetriedStep(attempt=attempt) if gw is not None:
                old = dist.gateways.get(gw, GatewayDelivery())
                dist.gateways[gw] = GatewayDelivery(state="sent", attempts=attempt, error=old.error)
            case VersionMovedStep(to_version=version):
                _moved(dist, version)
            case ResumedStep(retry_scheduled=retrying):
                for target in retrying:
                    old = dist.gateways.get(target, GatewayDelivery())
                    dist.gateways[target] = msgspec.structs.replace(old, state="retrying")
            case FinishedStep(status=status, successful=successful, failed=failed):
                dist.status = status
                dist.reason = event.detail.reason
                dist.completed_at = event.ts
                # A list cut short (a large distribution): the acks and failures seen stand.
                if event.detail.successful_count in (None, len(successful)):
                    dist.successful_gateways = list(successful)
                if event.detail.failed_count in (None, len(failed)):
                    dist.failed_gateways = list(failed)
            case _:
                pass  # QueuedStep (the record above is all it says) and steps not known here


def _created(dist: DistributionState, targets: list[str], unknown: set[str]) -> None:
    dist.status = "in_progress"
    dist.target_gateways = list(targets)
    dist.gateways = {
        gw: GatewayDelivery(state="failed", error=UNKNOWN_GATEWAY)
        if gw in unknown
        else GatewayDelivery()
        for gw in targets
    }
    dist.failed_gateways = [gw for gw in targets if gw in unknown]


def _moved(dist: DistributionState, version: int) -> None:
    """It starts over as `version`: every target not failed is pending again."""
    dist.version, dist.batch = version, 0
    for gw, d in dist.gateways.items():
        if d.state in MOVED_STATES:
            dist.gateways[gw] = GatewayDelivery(state="pending", attempts=d.attempts)
    dist.successful_gateways = []


def _deliver(
    dist: DistributionState,
    gw: str,
    state: GatewayDeliveryState,
    attempts: int,
    error: str | None,
) -> None:
    dist.gateways[gw] = GatewayDelivery(state=state, attempts=attempts, error=error)


def rebuild(
    events: Iterable[Event], *, at: datetime, load_balancing: LoadBalancingState
) -> FleetState:
    """The fleet at `at` from `events` (stream order): those with `ts` after it are skipped."""
    fold = FleetFold(load_balancing)
    for event in events:
        if event.ts <= at:
            fold.apply(event)
    return fold.state(at)
