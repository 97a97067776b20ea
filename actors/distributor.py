"""DistributorActor: the API of configuration distribution, its bookkeeping, and
reconciliation.

Owns: every distribution record (loaded from the `distributions` bucket at start, then
kept current by the DistributionActors' tells, so get and list never ask anyone), the
last version given per config type, desired state (bucket `desired`, mirrored in a
`Reconciler` (actors/reconciliation.py) with each gateway's status and reported versions
and what it acked, nacked or timed out on), one FIFO queue per config type whose head
alone runs (two distributions of a type are applied in order, so no gateway ends on the
older one; types run side by side), the running DistributionActors (it is their parent:
one that dies is restarted from its newest record), the reconciliations in flight per
gateway, and the distribution counts of `P.api.status`.
Receives: Distribute, GetDistribution, ListDistributions, Reconcile, DistributionChanged,
GatewayUpdated, GatewayRemoved, ReconcileDue (its cooldown timers), ChildDied,
AddListener (a listener is told DistributionCounts on every change: the supervisor).
Emits: `distribution.step` with step "queued" when a distribution waits behind another of
its type, and "finished" for one it fails itself (spec lost, actor dying again and again;
its DistributionActor emits every other step); `ha.reconcile` for each reconciliation
pushed and for each gateway found out of sync on a version it rejected.
Serves: `P.api.distribute`, `P.api.distributions.get`, `P.api.distributions.list`,
`P.api.reconcile`.

A distribution's targets are resolved when it is created, so its record lists them at
once. The spec, the version counter and the record are stored before the reply (layout:
schemas/desired.py); its desired state is written when it starts, before its actor sends
anything. At start, unfinished distributions are queued again per type in version order
and resumed; what each gateway rejected is rebuilt from the records.

Reconciliation is level-triggered: a gateway is checked (`Reconciler.check`, whose table
says when it is pushed) for every type with a desired version when its status or reported
versions change, when a distribution that targeted it ends, when its cooldown after
timed-out pushes ends, and every gateway is checked for a type when a distribution of
that type starts (desired state changed). A push is a targeted distribution (origin
"reconcile") of the desired version with that version's stored content: no new version,
desired state untouched. It goes through its type's FIFO like any distribution, so it
never races one; and none is created for a gateway that a distribution of that type
targets (running or queued), while a distribution of that type waits to start (its start
changes desired state and brings a recheck), or while another reconciliation for that
gateway is in flight (one per gateway). A reconciliation still waiting in its queue takes
in the next gateways needing the same version, so a mass rejoin makes few distributions.
`[orchestrator] ha_enabled = false` turns automatic reconciliation off; `P.api.reconcile`
(an operator's request, which also re-pushes a version the gateway rejected and skips the
cooldown) works either way.

A DistributionActor that dies is started again from the newest record it told (the
stored one may lag by the acks since its last send): it resumes, re-sending in-flight
pushes with the same attempt number. After a restart of the whole orchestrator the
stored record is all there is; see actors/distribution.py. One that dies more than MAX_RESTARTS times is failed instead.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import pykka
from msgspec.structs import replace

from actors.base import SafeActor, safe_tell
from actors.context import Context
from actors.distribution import DistributionActor
from actors.distribution_machine import TERMINAL_STATUSES, new_distribution, resolve_targets
from actors.messages import (
    ChildDied,
    DistributionChanged,
    DistributionCounts,
    GatewayRemoved,
    GatewayUpdated,
    ReconcileDue,
    ReportTo,
    Request,
)
from actors.reconciliation import Desired, Outcome, OutOfSync, Push, Reconciler
from bus.edge import reply_error
from bus.runtime import SubscriptionHandle
from schemas import endpoints as api
from schemas.api import (
    DistributeReply,
    DistributeRequest,
    Distribution,
    DistributionGetRequest,
    DistributionListReply,
    DistributionListRequest,
    DistributionStatus,
    GatewayDelivery,
    ReconcileReply,
    ReconcileRequest,
)
from schemas.codec import DecodeError, encode
from schemas.desired import DesiredConfig, DistributionSpec, VersionCounter
from schemas.events import DistributionEvent, Reconciliation, utc_now

log = logging.getLogger(__name__)

RECORD_KEY_RE = re.compile(r"^dist-[A-Za-z0-9-]+$")
SPEC_SUFFIX = ".spec"
VERSIONS_PREFIX = "versions."
OPEN_STATUSES = frozenset[DistributionStatus]({"pending", "in_progress"})
# A distribution whose actor dies more often than this is failed, not started again.
MAX_RESTARTS = 3


class DistributorActor(SafeActor):
    def __init__(self, context: Context) -> None:
        super().__init__()
        self.ctx = context
        self.bus = context.bus
        self.store = context.buckets["distributions"]
        self.desired_store = context.buckets["desired"]
        settings = context.settings.orchestrator
        self.auto_reconcile = settings.ha_enabled
        # The first cooldown of a gateway whose push timed out: what one distribution has
        # just spent on it (every attempt's ack timeout and retry delay).
        attempt_ms = settings.distribution_ack_timeout_ms + settings.distribution_retry_delay_ms
        cooldown_s = (settings.distribution_retry_count + 1) * attempt_ms / 1000
        self.reconciler = Reconciler(cooldown_s=cooldown_s)
        self.records: dict[str, Distribution] = {}
        self.versions: dict[str, int] = {}
        self.queues: dict[str, deque[str]] = {}
        self.running: dict[str, pykka.ActorRef[Any]] = {}
        self.restarts: Counter[str] = Counter()  # per distribution id
        self.reconciling: dict[str, set[str]] = {}  # gateway -> reconciliations in flight
        self.statuses: Counter[DistributionStatus] = Counter()
        self.supervisor: pykka.ActorRef[Any] | None = None  # told DistributionCounts
        self._subscriptions: list[SubscriptionHandle] = []

    # Life cycle --------------------------------------------------------------------------

    def on_start(self) -> None:
        self._load()
        self._subscriptions = self.serve("distributor", self.ctx.subjects, self.ctx.drops)
        for config_type in list(self.queues):
            self._start_head(config_type)

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        for ref in self.running.values():
            ref.stop(timeout=5)

    def _load(self) -> None:
        """Records, version counters and desired state from the buckets; unfinished
        distributions queued again; what gateways rejected, from the records."""
        unfinished: list[Distribution] = []
        for key in self.store.keys():  # noqa: SIM118 - a KvStore, not a dict
            try:
                if key.startswith(VERSIONS_PREFIX):
                    counter = self.store.get(key, VersionCounter)
                    if counter is not None:
                        self.versions[counter.config_type] = counter.last_version
                elif RECORD_KEY_RE.fullmatch(key):
                    record = self.store.get(key, Distribution)
                    if record is not None:
                        self.records[key] = record
                        if record.status in OPEN_STATUSES:
                            unfinished.append(record)
            except DecodeError as exc:
                log.warning("skipping undecodable entry %r: %s", key, exc)
        for key, value in self.desired_store.items(DesiredConfig).items():
            config_type, _, gateway_id = key.partition(".")
            desired = Desired(value.version, value.distribution_id)
            self.reconciler.set_desired(config_type, gateway_id or None, desired)
        for record in sorted(self.records.values(), key=lambda r: (r.created_at, r.id)):
            self._learn(None, record)
        for record in sorted(unfinished, key=lambda r: r.version):
            self.queues.setdefault(record.config_type, deque()).append(record.id)
            if record.origin == "reconcile":
                for gw in record.target_gateways:
                    self.reconciling.setdefault(gw, set()).add(record.id)
        self.statuses = Counter(r.status for r in self.records.values())
        if self.records:
            log.info("%d distributions loaded, %d to resume", len(self.records), len(unfinished))

    # Messages ----------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case Request(endpoint=api.DISTRIBUTE, body=DistributeRequest() as request, reply=reply):
                self._distribute(request, reply)
            case Request(
                endpoint=api.DISTRIBUTIONS_GET,
                body=DistributionGetRequest() as request,
                reply=reply,
            ):
                record = self.records.get(request.distribution_id)
                if record is None:
                    reply_error(
                        self.bus, reply, "not_found", f"no distribution {request.distribution_id}"
                    )
                else:
                    self.bus.publish(reply, record)
            case Request(
                endpoint=api.DISTRIBUTIONS_LIST,
                body=DistributionListRequest() as request,
                reply=reply,
            ):
                rows = [
                    r
                    for r in self.records.values()
                    if request.include_completed or r.status in OPEN_STATUSES
                ]
                rows.sort(key=lambda r: (r.created_at, r.id))
                self.bus.publish(reply, DistributionListReply(distributions=rows))
            case Request(endpoint=api.RECONCILE, body=ReconcileRequest() as request, reply=reply):
                self._reconcile_request(request, reply)
            case DistributionChanged(record=record):
                self._changed(record)
            case GatewayUpdated(snapshot=snapshot):
                self.reconciler.on_gateway(snapshot)
                self._reconcile([snapshot.gateway_id])
            case GatewayRemoved(gateway_id=gateway_id):
                self.reconciler.forget_gateway(gateway_id)
            case ReconcileDue(gateway_id=gateway_id):
                self._reconcile([gateway_id])
            case ChildDied(kind="DistributionActor", key=dist_id, error=error):
                self._restart(dist_id, error)
            case ReportTo(supervisor=supervisor):
                self.supervisor = supervisor
                supervisor.tell(self._counts())
            case _:
                return super().handle(message)
        return None

    # Distributions -----------------------------------------------------------------------

    def _distribute(self, request: DistributeRequest, reply: str) -> None:
        size = len(encode(request.config_data))
        limit = self.ctx.settings.orchestrator.max_config_bytes
        if size > limit:
            message = f"config_data is {size} bytes encoded, over the limit of {limit}"
            reply_error(self.bus, reply, "bad_request", message)
            return
        config_type = request.config_type
        dist_id = f"dist-{uuid.uuid4()}"
        version = self.versions.get(config_type, 0) + 1
        counter = VersionCounter(config_type=config_type, last_version=version)
        self.store.put(VERSIONS_PREFIX + config_type, counter)
        self.versions[config_type] = version
        spec = DistributionSpec(
            config_type=config_type,
            version=version,
            config_data=request.config_data,
            target_gateways=request.target_gateways,
        )
        self.store.put(dist_id + SPEC_SUFFIX, spec)
        targets, unknown = resolve_targets(request.target_gateways, self.reconciler.active)
        record = new_distribution(
            dist_id, config_type, version, targets=targets, unknown=unknown, created_at=utc_now()
        )
        self.store.put(dist_id, record)
        self._update(record)
        self._enqueue(record, spec)
        self.bus.publish(reply, DistributeReply(distribution_id=dist_id))

    def _enqueue(self, record: Distribution, spec: DistributionSpec) -> None:
        queue = self.queues.setdefault(record.config_type, deque())
        queue.append(record.id)
        if len(queue) == 1:
            self._start_head(record.config_type, spec)
            return
        self.ctx.emit(
            DistributionEvent(
                distribution_id=record.id,
                config_type=record.config_type,
                version=record.version,
                step="queued",
                details={"after": queue[-2]},
            )
        )

    def _start_head(self, config_type: str, spec: DistributionSpec | None = None) -> None:
        """Starts the first distribution queued for `config_type`, if any."""
        queue = self.queues.get(config_type)
        if not queue:
            self.queues.pop(config_type, None)
            return
        record = self.records[queue[0]]
        spec = spec or self._spec(record.id)
        if spec is None:
            log.error("distribution %s has no stored spec: failing it", record.id)
            self._finished(self._fail(record, "spec lost"))
            return
        self._start_actor(record, spec)

    def _start_actor(self, record: Distribution, spec: DistributionSpec) -> None:
        sets_desired = record.status == "pending" and record.origin == "distribute"
        if sets_desired:
            self._set_desired(record, spec)
        self.running[record.id] = DistributionActor.start(self.ctx, record, spec, self.actor_ref)
        if sets_desired:
            self._reconcile(None, [record.config_type])

    def _set_desired(self, record: Distribution, spec: DistributionSpec) -> None:
        """Fleet-wide for a distribution to every gateway, else per named (known) gateway."""
        value = DesiredConfig(
            config_type=record.config_type,
            version=record.version,
            distribution_id=record.id,
            set_at=utc_now(),
        )
        desired = Desired(record.version, record.id)
        if spec.target_gateways is None:
            self.desired_store.put(record.config_type, value)
            self.reconciler.set_desired(record.config_type, None, desired)
            return
        for gw, delivery in record.gateways.items():
            if delivery.state == "pending":  # not an unknown id, failed from the start
                self.desired_store.put(f"{record.config_type}.{gw}", value)
                self.reconciler.set_desired(record.config_type, gw, desired)

    def _changed(self, record: Distribution) -> None:
        """A record as its DistributionActor stored it."""
        old = self.records.get(record.id)
        self._update(record)
        self._learn(old, record)
        if record.status in TERMINAL_STATUSES and (old is None or old.status in OPEN_STATUSES):
            self._finished(record)

    def _finished(self, record: Distribution) -> None:
        """It has ended: the next of its type starts, and the gateways it targeted are checked."""
        self.running.pop(record.id, None)
        self.restarts.pop(record.id, None)
        if record.origin == "reconcile":
            for gw in record.target_gateways:
                in_flight = self.reconciling.get(gw, set())
                in_flight.discard(record.id)
                if not in_flight:
                    self.reconciling.pop(gw, None)
        queue = self.queues.get(record.config_type)
        if queue and queue[0] == record.id:
            queue.popleft()
            self._start_head(record.config_type)
        self._reconcile(record.target_gateways)

    def _fail(self, record: Distribution, reason: str) -> Distribution:
        """Ends an unfinished distribution as failed, here rather than in its actor."""
        failed = replace(record, status="failed", completed_at=utc_now(), reason=reason)
        self.store.put(failed.id, failed)
        self._update(failed)
        details = {
            "status": "failed",
            "successful": list(failed.successful_gateways),
            "failed": list(failed.failed_gateways),
            "reason": reason,
        }
        self.ctx.emit(
            DistributionEvent(
                distribution_id=failed.id,
                config_type=failed.config_type,
                version=failed.version,
                step="finished",
                details=details,
            )
        )
        return failed

    def _restart(self, dist_id: str, error: str) -> None:
        """Its DistributionActor died: a new one resumes it from the newest record.

        That is the one it told us last (it tells every step, and ChildDied comes after
        them), not the stored one, which lags by the acks since the last send."""
        if self.running.pop(dist_id, None) is None:
            return  # it had ended already
        record = self.records[dist_id]
        if record.status in TERMINAL_STATUSES:
            return
        self.restarts[dist_id] += 1
        if self.restarts[dist_id] > MAX_RESTARTS:
            log.error("distribution actor %s died again (%s): failing it", dist_id, error)
            reason = f"its actor died {self.restarts[dist_id]} times: {error}"
            self._finished(self._fail(record, reason))
            return
        spec = self._spec(dist_id)
        if spec is None:
            self._finished(self._fail(record, "spec lost"))
            return
        self.ctx.restarts.add("DistributionActor")
        log.warning("distribution actor %s died (%s): restarting it", dist_id, error)
        self._start_actor(record, spec)

    def _spec(self, dist_id: str) -> DistributionSpec | None:
        return self.store.get(dist_id + SPEC_SUFFIX, DistributionSpec)

    def _update(self, record: Distribution) -> None:
        """Keeps the record and the status counts; tells listeners when the counts change."""
        old = self.records.get(record.id)
        self.records[record.id] = record
        if old is not None and old.status == record.status:
            return
        before = self._counts()
        if old is not None:
            self.statuses[old.status] -= 1
        self.statuses[record.status] += 1
        counts = self._counts()
        if counts != before and self.supervisor is not None:
            self.supervisor.tell(counts)

    def _counts(self) -> DistributionCounts:
        s = self.statuses
        return DistributionCounts(
            active=s["pending"] + s["in_progress"],
            completed=s["completed"],
            failed=s["failed"] + s["partially_failed"],
            by_state={state: n for state, n in s.items() if n},
        )

    # Reconciliation ----------------------------------------------------------------------

    def _learn(self, old: Distribution | None, record: Distribution) -> None:
        """Tells the reconciler each gateway's final state in `record` not yet in `old`."""
        reconciler, now, at = self.reconciler, self.ctx.clock(), utc_now()
        acked = record.successful_gateways[len(old.successful_gateways) if old else 0 :]
        failed = record.failed_gateways[len(old.failed_gateways) if old else 0 :]
        for gw in acked:
            reconciler.on_outcome(gw, record.config_type, record.version, "acked", at=at, now=now)
        for gw in failed:
            delivery = record.gateways[gw]
            outcome: Outcome
            if delivery.state == "nacked":
                outcome = "nacked"
            elif delivery.attempts:
                outcome = "timed_out"
            else:
                continue  # an unknown id: never sent to
            delay = reconciler.on_outcome(
                gw, record.config_type, record.version, outcome, at=at, now=now
            )
            if delay is not None and self.auto_reconcile:
                self.bus.call_later(delay, safe_tell, self.actor_ref, ReconcileDue(gateway_id=gw))

    def _reconcile(
        self, gateways: Iterable[str] | None, config_types: list[str] | None = None
    ) -> None:
        """Automatic reconciliation of these gateways (None: all) for these types (None:
        every type with a desired version)."""
        if not self.auto_reconcile:
            return
        reconciler, now = self.reconciler, self.ctx.clock()
        for gw in sorted(reconciler.gateways if gateways is None else gateways):
            for config_type in config_types or reconciler.config_types(gw):
                busy = self._busy(gw, config_type)
                decision = reconciler.check(gw, config_type, busy=busy, now=now)
                if isinstance(decision, Push):
                    self._push(decision)
                elif isinstance(decision, OutOfSync):
                    log.warning("gateway %s: %s of %s", gw, decision.reason, config_type)
                    self._emit_reconciliation(decision, None)

    def _reconcile_request(self, request: ReconcileRequest, reply: str) -> None:
        """`P.api.reconcile`: push now, even a version the gateway rejected."""
        gw, config_type = request.gateway_id, request.config_type
        if gw not in self.reconciler.active:
            reply_error(self.bus, reply, "not_found", f"no gateway {gw}")
            return
        if config_type is None:
            config_types = self.reconciler.config_types(gw)
        elif self.reconciler.desired(gw, config_type) is None:
            message = f"no desired version of {config_type} for {gw}"
            reply_error(self.bus, reply, "not_found", message)
            return
        else:
            config_types = [config_type]
        created: list[str] = []
        skipped: dict[str, str] = {}
        now = self.ctx.clock()
        for name in config_types:
            busy = self._busy(gw, name, forced=True)
            decision = self.reconciler.check(gw, name, busy=busy, now=now, force=True)
            dist_id = None
            if isinstance(decision, Push):
                reason = f"operator request: {decision.reason}"
                dist_id = self._push(dataclasses.replace(decision, reason=reason))
            if dist_id is None:
                skipped[name] = decision.reason
            else:
                created.append(dist_id)
        self.bus.publish(reply, ReconcileReply(distributions=created, skipped=skipped))

    def _busy(self, gw: str, config_type: str, *, forced: bool = False) -> str | None:
        """Why the gateway must not be pushed `config_type` now, if it must not."""
        in_flight = self.reconciling.get(gw)
        if in_flight and not forced:
            return f"reconciliation {min(in_flight)} in flight"
        for position, dist_id in enumerate(self.queues.get(config_type, ())):
            record = self.records[dist_id]
            if gw in record.gateways:
                return f"distribution {dist_id} targets it"
            if position and record.origin == "distribute":
                return f"distribution {dist_id} of {config_type} waits to start"
        return None

    def _push(self, push: Push) -> str | None:
        """A reconciliation for `push`: joins the one waiting in the queue for the same
        version, or is created (None if that version's content is lost)."""
        gw, config_type, version = push.gateway_id, push.config_type, push.desired.version
        queue = self.queues.get(config_type, deque())
        waiting = self.records[queue[-1]] if len(queue) > 1 else None
        if waiting and waiting.origin == "reconcile" and waiting.version == version:
            record = replace(
                waiting,
                target_gateways=[*waiting.target_gateways, gw],
                gateways={**waiting.gateways, gw: GatewayDelivery()},
            )
            self.store.put(record.id, record)
            self._update(record)
            self._note_push(push, record.id)
            return record.id
        source = self._spec(push.desired.distribution_id)
        if source is None:
            log.error(
                "cannot reconcile %s: the content of %s version %d (%s) is lost",
                gw,
                config_type,
                version,
                push.desired.distribution_id,
            )
            return None
        dist_id = f"dist-{uuid.uuid4()}"
        spec = replace(source, target_gateways=[gw])
        self.store.put(dist_id + SPEC_SUFFIX, spec)
        record = new_distribution(
            dist_id, config_type, version, targets=[gw], unknown=[], created_at=utc_now()
        )
        record = replace(record, origin="reconcile")
        self.store.put(dist_id, record)
        self._update(record)
        self._note_push(push, dist_id)
        self._enqueue(record, spec)
        return dist_id

    def _note_push(self, push: Push, dist_id: str) -> None:
        self.reconciling.setdefault(push.gateway_id, set()).add(dist_id)
        gw, config_type = push.gateway_id, push.config_type
        log.info("reconciling %s %s with %s: %s", gw, config_type, dist_id, push.reason)
        self._emit_reconciliation(push, dist_id)

    def _emit_reconciliation(self, decision: Push | OutOfSync, dist_id: str | None) -> None:
        self.ctx.emit(
            Reconciliation(
                gateway_id=decision.gateway_id,
                config_type=decision.config_type,
                desired_version=decision.desired.version,
                reported_version=decision.reported,
                distribution_id=dist_id,
                reason=decision.reason,
            )
        )
