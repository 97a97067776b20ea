"""DistributorActor: the API of configuration distribution and its bookkeeping.

Owns: every distribution record (loaded through the DistributionStore at start, then kept
current by the DistributionActors' tells, so get and list never ask anyone), the last
version given per config type, one FIFO queue per config type whose head alone runs (two
distributions of a type are applied in order, so no gateway ends on the older one; types
run side by side), the running DistributionActors (it is their parent: one that dies is
restarted from its newest record), the ReconcileDriver (actors/reconcile_driver.py) that
reconciliation runs through, and the distribution counts of `P.api.status`.
Receives: the requests below, DistributionChanged, GatewayUpdated, GatewayRemoved,
ReconcileDue (its cooldown timers), ChildDied, ReportTo (whom to tell DistributionCounts
on every change: the supervisor).
Emits: `distribution.step` with step "queued" when a distribution waits behind another of
its type, and "finished" for one it fails itself (spec or content lost, its store
failing, its actor dying again and again; its DistributionActor emits every other step);
`ha.reconcile` through the driver; `ha.alarm` (kind bad_stored_value) at start for each
stored value that cannot be read (skipped, or replaced by what the other values say: no
stored value stops start-up).
Serves: `P.api.distribute`, `P.api.distributions.get`, `P.api.distributions.list`,
`P.api.reconcile`.

`distribute` answers once the distribution is stored (its content, its targets,
resolved when it is created, in chunks, and last its spec), or `unavailable` if the store
refuses it (nothing of it exists then); the version counter is written after the spec.
Desired state is written when the distribution starts, before its actor sends anything;
a distribution that cannot be started (its desired state, spec or content cannot be
written or read) ends failed with the reason, and the next one of its type starts.
`distributions.get` answers a record with one page of its per-gateway states. Retention
(actors/retention.py) runs at start and whenever a distribution ends.
Which key each component writes is in schemas/stored.py. At start, unfinished
distributions are queued again per type in version order and resumed; what each gateway
rejected is rebuilt from the records.

A DistributionActor that dies is started again from the newest record it told (the
stored one may lag by the acks since its last send): it resumes, re-sending in-flight
pushes with the same attempt number. After a restart of the whole orchestrator the
stored record is all there is; see actors/distribution.py. One that dies more than
MAX_RESTARTS times is abandoned (its spec says so) and ends failed.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import pykka
from msgspec.structs import replace

from actors.base import SafeActor, stop_all
from actors.context import Context
from actors.distribution import DistributionActor
from actors.distribution_machine import (
    TERMINAL_STATUSES,
    abandoned,
    finished_step,
    new_distribution,
    resolve_targets,
)
from actors.distribution_store import DistributionStore
from actors.histogram import DISTRIBUTION_BOUNDS_S, HistogramRecorder
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
from actors.paging import BadCursor, distribution_page, distributions_page
from actors.reconcile_driver import ReconcileDriver
from actors.reconciliation import Desired, Resync
from actors.retention import past_history, unneeded_contents
from bus.edge import reply_error
from bus.jetstream import KvError
from bus.runtime import SubscriptionHandle
from schemas import endpoints as api
from schemas.api import (
    DistributeReply,
    DistributeRequest,
    Distribution,
    DistributionGetRequest,
    DistributionListRequest,
    GatewayDelivery,
    ReconcileRequest,
)
from schemas.codec import encode
from schemas.events import Alarm, DistributionEvent, QueuedStep, utc_now
from schemas.stored import DesiredConfig, DistributionSpec
from schemas.types import DistributionStatus

log = logging.getLogger(__name__)

OPEN_STATUSES = frozenset[DistributionStatus]({"pending", "in_progress"})
# A distribution whose actor dies more often than this is failed, not started again.
MAX_RESTARTS = 3
# How long a distribute request_id is remembered (a retry after that starts anew).
REQUEST_ID_TTL = timedelta(hours=24)


class DistributorActor(SafeActor):
    def __init__(self, context: Context) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "distributor"))
        self.ctx = context
        self.bus = context.bus
        self.store = DistributionStore(context.buckets["distributions"], context.buckets["desired"])
        settings = context.settings.orchestrator
        # The first cooldown of a gateway whose push timed out: what one distribution has
        # just spent on it (every attempt's ack timeout and retry delay).
        attempt_ms = settings.distribution_ack_timeout_ms + settings.distribution_retry_delay_ms
        self.reconcile = ReconcileDriver(
            self,
            bus=context.bus,
            me=self.actor_ref,
            emit=context.emit,
            clock=context.clock,
            auto=settings.ha_enabled,
            cooldown_s=(settings.distribution_retry_count + 1) * attempt_ms / 1000,
        )
        self.records: dict[str, Distribution] = {}
        self.versions: dict[str, int] = {}
        self.contents: set[tuple[str, int]] = set()  # (type, version) of contents stored
        self.request_ids: dict[str, str] = {}  # distribute request_id -> distribution id
        self.queues: dict[str, deque[str]] = {}
        self.running: dict[str, pykka.ActorRef[Any]] = {}
        self.restarts: Counter[str] = Counter()  # per distribution id
        self.statuses: Counter[DistributionStatus] = Counter()
        self.durations = HistogramRecorder(DISTRIBUTION_BOUNDS_S)  # of those ended since start
        self.supervisor: pykka.ActorRef[Any] | None = None  # told DistributionCounts
        self._subscriptions: list[SubscriptionHandle] = []

    # Life cycle --------------------------------------------------------------------------

    def on_start(self) -> None:
        self._load()
        self._prune()
        self._subscriptions = self.serve("distributor", self.ctx)
        for config_type in list(self.queues):
            self._start_head(config_type)

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        stop_all(self.running.values(), timeout=5)

    def _load(self) -> None:
        """Records, version counters and desired state from the store; unfinished
        distributions queued again; what gateways rejected, from the records."""
        loaded = self.store.load()
        for message in loaded.unreadable:  # skipped or replaced: start-up goes on
            self.ctx.emit(Alarm(kind="bad_stored_value", message=message, active=True))
        self.records, self.versions = loaded.records, loaded.versions
        self.contents = loaded.contents
        self.request_ids = {r.request_id: r.id for r in self.records.values() if r.request_id}
        for (config_type, gateway_id), value in loaded.desired.items():
            desired = Desired(value.version, value.distribution_id)
            self.reconcile.set_desired(config_type, gateway_id, desired)
        for record in sorted(self.records.values(), key=lambda r: (r.created_at, r.id)):
            self.reconcile.learn(None, record)
        unfinished = [r for r in self.records.values() if r.status in OPEN_STATUSES]
        for record in sorted(unfinished, key=lambda r: r.version):
            self.queues.setdefault(record.config_type, deque()).append(record.id)
            self.reconcile.started(record)
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
                self._get(request, reply)
            case Request(
                endpoint=api.DISTRIBUTIONS_LIST,
                body=DistributionListRequest() as request,
                reply=reply,
            ):
                try:
                    page = distributions_page(self.records.values(), request)
                except BadCursor as exc:
                    reply_error(self.replies, reply, "bad_request", str(exc))
                else:
                    self.replies.publish(reply, page)
            case Request(endpoint=api.RECONCILE, body=ReconcileRequest() as request, reply=reply):
                answer = self.reconcile.request(request.gateway_id, request.config_type)
                if isinstance(answer, str):
                    reply_error(self.replies, reply, "not_found", answer)
                else:
                    self.replies.publish(reply, answer)
            case DistributionChanged(record=record):
                self._changed(record)
            case GatewayUpdated(snapshot=snapshot):
                self.reconcile.on_gateway(snapshot)
            case GatewayRemoved(gateway_id=gateway_id):
                self.reconcile.forget(gateway_id)
            case ReconcileDue(gateway_id=gateway_id):
                self.reconcile.check([gateway_id])
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
            reply_error(self.replies, reply, "bad_request", message)
            return
        earlier = self._by_request_id(request.request_id)
        if earlier is not None:  # a retry: the same answer, nothing new started
            self.replies.publish(reply, DistributeReply(distribution_id=earlier.id))
            return
        config_type = request.config_type
        version = self.versions.get(config_type, 0) + 1
        targets, unknown = resolve_targets(request.target_gateways, self.reconcile.active)
        spec = DistributionSpec(
            config_type=config_type,
            version=version,
            fleet_wide=request.target_gateways is None,
            created_at=utc_now(),
            request_id=request.request_id,
        )
        try:
            record = self._create(spec, targets, unknown, request.config_data)
        except KvError as exc:
            reply_error(self.replies, reply, "unavailable", f"cannot store it: {exc}")
            return
        self.versions[config_type] = version
        try:
            self.store.put_version(config_type, version)
        except KvError as exc:  # its spec, stored, holds the version all the same
            log.warning("version counter of %s not stored: %s", config_type, exc)
        self.replies.publish(reply, DistributeReply(distribution_id=record.id))
        self._enqueue(record)

    def _get(self, request: DistributionGetRequest, reply: str) -> None:
        record = self.records.get(request.distribution_id)
        if record is None:
            message = f"no distribution {request.distribution_id}"
            reply_error(self.replies, reply, "not_found", message)
            return
        try:
            page = distribution_page(record, limit=request.limit, cursor=request.cursor)
        except BadCursor as exc:
            reply_error(self.replies, reply, "bad_request", str(exc))
        else:
            self.replies.publish(reply, page)

    def _by_request_id(self, request_id: str | None) -> Distribution | None:
        """The distribution created for this request_id within REQUEST_ID_TTL, if any."""
        if request_id is None:
            return None
        dist_id = self.request_ids.get(request_id)
        record = self.records.get(dist_id) if dist_id is not None else None
        if record is None or utc_now() - record.created_at > REQUEST_ID_TTL:
            return None
        return record

    def _create(
        self,
        spec: DistributionSpec,
        targets: list[str],
        unknown: list[str],
        content: dict[str, Any] | None,
    ) -> Distribution:
        """Stores a new distribution (with its version's `content`, unless stored already)
        and keeps its (pending) record. Raises KvError, and then keeps nothing."""
        record = new_distribution(
            f"dist-{uuid.uuid4()}",
            spec.config_type,
            spec.version,
            targets=targets,
            unknown=unknown,
            created_at=spec.created_at,
        )
        record = replace(record, origin=spec.origin, request_id=spec.request_id)
        self.store.create(record, spec, content)
        self.contents.add((spec.config_type, spec.version))
        self._update(record)
        if spec.request_id is not None:
            self.request_ids[spec.request_id] = record.id
        return record

    def _enqueue(self, record: Distribution) -> None:
        queue = self.queues.setdefault(record.config_type, deque())
        queue.append(record.id)
        if len(queue) == 1:
            self._start_head(record.config_type)
            return
        self.ctx.emit(
            DistributionEvent.of(
                record.id, record.config_type, record.version, QueuedStep(after=queue[-2])
            )
        )

    def _start_head(self, config_type: str) -> None:
        """Starts the first distribution queued for `config_type`, if any. One that cannot
        start ends failed, and the next one is started instead."""
        queue = self.queues.get(config_type)
        failed = []
        while queue:
            record = self.records[queue[0]]
            reason = self._start(record)
            if reason is None:
                break
            queue.popleft()
            failed.append(self._fail(record, reason))
        if not queue:
            self.queues.pop(config_type, None)
        for record in failed:
            self.reconcile.finished(record)

    def _start(self, record: Distribution) -> str | None:
        """Starts its DistributionActor (writing desired state first if it sets it);
        or why it cannot start."""
        try:
            spec = self.store.spec(record.id)
            content = self.store.content(record.config_type, record.version)
            if spec is None or content is None:
                return "spec lost" if spec is None else "content lost"
            sets_desired = record.status == "pending" and record.origin == "distribute"
            if sets_desired:
                self._set_desired(record, spec)
        except KvError as exc:
            return f"cannot start it: {exc}"
        self.running[record.id] = DistributionActor.start(
            self.ctx, record, content, parent=self.actor_ref, store=self.store
        )
        if sets_desired:
            self.reconcile.check(None, [record.config_type])
        return None

    def _set_desired(self, record: Distribution, spec: DistributionSpec) -> None:
        """Fleet-wide for a distribution to every gateway, else per named (known) gateway:
        stored, then in force (a write that fails raises KvError, and none is in force)."""
        value = DesiredConfig(
            config_type=record.config_type,
            version=record.version,
            distribution_id=record.id,
            set_at=utc_now(),
        )
        if spec.fleet_wide:
            gateways: list[str | None] = [None]
        else:  # not the unknown ids, failed from the start
            gateways = [gw for gw, d in record.gateways.items() if d.state == "pending"]
        for gw in gateways:
            self.store.put_desired(record.config_type, gw, value)
        desired = Desired(record.version, record.id)
        for gw in gateways:
            self.reconcile.set_desired(record.config_type, gw, desired)

    def _changed(self, record: Distribution) -> None:
        """A record as its DistributionActor stored it."""
        old = self.records.get(record.id)
        self._update(record)
        self.reconcile.learn(old, record)
        if record.status in TERMINAL_STATUSES and (old is None or old.status in OPEN_STATUSES):
            self._finished(record)

    def _finished(self, record: Distribution) -> None:
        """It has ended: the next of its type starts, and the gateways it targeted are checked."""
        self.running.pop(record.id, None)
        self.restarts.pop(record.id, None)
        if record.completed_at is not None:
            self.durations.observe((record.completed_at - record.created_at).total_seconds())
            if self.supervisor is not None:
                self.supervisor.tell(self._counts())
        queue = self.queues.get(record.config_type)
        if queue and queue[0] == record.id:
            queue.popleft()
            self._start_head(record.config_type)
        self.reconcile.finished(record)
        self._prune()

    def _prune(self) -> None:
        """Retention (actors/retention.py): finished records past the history and the
        contents nothing needs are deleted. What cannot be deleted now is tried again
        after the next distribution ends."""
        settings = self.ctx.settings.orchestrator
        old = past_history(self.records.values(), settings.distribution_history)
        try:
            if old:
                self.store.delete(old)
                for record in old:
                    self._drop(record)
            needed = self.reconcile.desired_versions()
            needed.update(
                (r.config_type, r.version)
                for r in self.records.values()
                if r.status in OPEN_STATUSES
            )
            unneeded = unneeded_contents(self.contents, settings.config_history, needed)
            if unneeded:
                self.store.delete_contents(unneeded)
                self.contents.difference_update(unneeded)
        except KvError as exc:
            log.warning("retention: cannot delete now (%s); tried again later", exc)

    def _drop(self, record: Distribution) -> None:
        """A deleted record leaves memory, its request_id and the counts."""
        del self.records[record.id]
        if record.request_id is not None and self.request_ids.get(record.request_id) == record.id:
            del self.request_ids[record.request_id]
        self._recount({record.status: -1})

    def _fail(self, record: Distribution, reason: str) -> Distribution:
        """Gives up an unfinished distribution whose actor cannot carry it: its spec says
        so (the record is its actor's to write), and it ends failed. If even that cannot
        be stored, it is tried again after a restart."""
        log.error("distribution %s failed: %s", record.id, reason)
        try:
            self.store.abandon(record.id, reason)
        except KvError as exc:
            log.error(  # noqa: TRY400 - a known failure: one line, no traceback
                "the failure of %s cannot be stored (%s): it starts again after a restart",
                record.id,
                exc,
            )
        failed = abandoned(record, reason, utc_now())
        self._update(failed)
        step = finished_step(failed)
        self.ctx.emit(DistributionEvent.of(failed.id, failed.config_type, failed.version, step))
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
            self._finished(self._fail(record, f"its actor died {self.restarts[dist_id]} times"))
            return
        self.ctx.restarts.add("DistributionActor")
        log.warning("distribution actor %s died (%s): restarting it", dist_id, error)
        cannot = self._start(record)
        if cannot is not None:
            self._finished(self._fail(record, cannot))

    def _update(self, record: Distribution) -> None:
        """Keeps the record and the status counts."""
        old = self.records.get(record.id)
        self.records[record.id] = record
        if old is None:
            self._recount({record.status: 1})
        elif old.status != record.status:
            self._recount({old.status: -1, record.status: 1})

    def _recount(self, changes: Mapping[DistributionStatus, int]) -> None:
        """Counts records per status; tells listeners when the counts change."""
        before = self._counts()
        self.statuses.update(changes)
        counts = self._counts()
        if counts != before and self.supervisor is not None:
            self.supervisor.tell(counts)

    def _counts(self) -> DistributionCounts:
        s = self.statuses
        return DistributionCounts(
            active=s["pending"] + s["in_progress"],
            completed=s["completed"],
            failed=s["failed"] + s["partially_failed"],
            durations=self.durations.snapshot(),
            by_state={state: n for state, n in s.items() if n},
        )

    # The ReconcileDriver's desk ------------------------------------------------------------

    def queued(self, config_type: str) -> Sequence[Distribution]:
        return [self.records[dist_id] for dist_id in self.queues.get(config_type, ())]

    def reconcile_with(self, resync: Resync, joining: Distribution | None) -> str | None:
        gw = resync.gateway_id
        if joining is not None:  # waiting in its queue: it takes in one more gateway
            joined = replace(
                joining,
                target_gateways=[*joining.target_gateways, gw],
                gateways={**joining.gateways, gw: GatewayDelivery()},
            )
            self.store.put_gateways(joined, [len(joined.target_gateways) - 1])
            self._update(joined)
            return joined.id
        config_type, version = resync.config_type, resync.desired.version
        if self.store.content(config_type, version) is None:
            return None
        spec = DistributionSpec(
            config_type=config_type,
            version=version,
            fleet_wide=False,
            origin="reconcile",
            created_at=utc_now(),
        )
        record = self._create(spec, [gw], [], None)
        self._enqueue(record)
        return record.id
