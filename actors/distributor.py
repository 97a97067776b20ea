"""DistributorActor: the API of configuration distribution and its bookkeeping.

Owns: every distribution record (loaded through the DistributionStore at start, then kept
current by the DistributionActors' tells, so get and list never ask anyone), the last
version given per config type, one FIFO queue per config type whose head alone runs (two
distributions of a type are applied in order, so no gateway ends on the older one; types
run side by side), the running DistributionActors (it is their parent: one that dies is
restarted from its newest record), the ReconcileDriver (actors/reconcile_driver.py) that
reconciliation runs through, and the distribution counts of `P.api.status`. Only the
leader holds records; a standby's counts follow the stored ones (a watch of the
distributions bucket, actors/stored_statuses.py), so every replica counts alike.
Receives: the requests below, DistributionChanged, GatewayUpdated, GatewayRemoved,
ReconcileDue (its cooldown timers), ChildDied, ReportTo (whom to tell DistributionCounts
on every change: the supervisor), CounterBehind (a gateway answered `stale_version`),
NotLeading (a DistributionActor stopped without acting: this replica no longer leads).
A write of the store refused as fenced (another replica has written the key since: it
leads now) makes this replica step down, as when it loses the lease.
Emits: `distribution.step` with step "queued" when a distribution waits behind another of
its type, and "finished" for one it fails itself (spec or content lost, its store
failing, its actor dying again and again; its DistributionActor emits every other step);
`ha.reconcile` through the driver; `ha.alarm` (kind bad_stored_value) at start for each
stored value that cannot be read (skipped, or replaced by what the other values say: no
stored value stops start-up).
Serves: `P.api.distribute`, `P.api.distributions.get`, `P.api.distributions.list`,
`P.api.distributions.pause|resume|abort`, `P.api.rollback`, `P.api.reconcile`.

Progressive delivery (a distribution with a `rollout`): its DistributionActor runs the
canary, gates and pauses (actors/distribution_machine.py); the distributor tells it its
targets' health (GatewayUpdated: healthy or not), forwards pause/resume/abort to it (or
aborts one still waiting in its queue itself), and sets its desired state only once it
has completed (or partially failed): a halted or aborted rollout's version never
becomes desired, so reconciliation never pushes it. A scheduled or paused distribution
holds its type's queue (`distributions` and `status` name it as the blocker). One that
halts with `auto_rollback` hands over as `rolling_back`: the distributor creates its
rollback (origin "rollback", version one above it, kept for it when it was created;
actors/rollout.py says which gateways it pushes and which it lists) at the head of the
queue, and ends it `rolled_back` (or `failed`, with the reason) when the rollback ends,
writing its progress then (its actor has stopped). A restart picks up each step of that.

`distribute` answers once the distribution is stored (its content, its targets,
resolved when it is created, in chunks, and last its spec), or `unavailable` if the store
refuses it (nothing of it exists then); the version counter is written after the spec.
A dry run stores nothing and answers its plan. Desired state is written when a
distribution without a rollout starts, before its actor sends anything;
a distribution that cannot be started (its desired state, spec or content cannot be
written or read) ends failed with the reason, and the next one of its type starts.
`distributions.get` answers a record with one page of its per-gateway states. Retention
(actors/retention.py) runs at start and whenever a distribution ends.
Which key each component writes is in schemas/stored.py. At start, unfinished
distributions are queued again per type in the order of the versions they were created
with, and resumed; what each gateway rejected is rebuilt from the records.

A version move: a gateway answering `stale_version` holds a newer version of a type than
the counter has given (gatefleet's state was reset, or its store lost). The distributor
moves the counter past the version held and the distribution to the version after it
(its content and spec `moved_to` stored, its desired state moved if it set it), and its
actor pushes that version to its targets again (actors/distribution_machine.py). A
rollout keeps the version after the new one for its rollback, as at creation.

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
from datetime import datetime, timedelta
from typing import Any

import pykka
from msgspec.structs import replace

from actors.base import SafeActor, safe_tell, stop_all, tell_latest
from actors.context import Context
from actors.distribution import DistributionActor
from actors.distribution_machine import (
    HANDED_OVER,
    TERMINAL_STATUSES,
    UNKNOWN_GATEWAY,
    abandoned,
    finished_step,
    new_distribution,
    resolve_targets,
    unstarted_aborted,
)
from actors.distribution_store import DistributionStore, last_version
from actors.histogram import DISTRIBUTION_BOUNDS_S, HistogramRecorder
from actors.messages import (
    ChildDied,
    Control,
    ControlAction,
    CounterBehind,
    DistributionChanged,
    DistributionCounts,
    GatewayHealth,
    GatewayRemoved,
    GatewayUpdated,
    Leading,
    NotLeading,
    ReconcileDue,
    ReportTo,
    Request,
    StartHead,
    VersionMoved,
)
from actors.paging import BadCursor, distribution_page, distributions_page
from actors.reconcile_driver import ReconcileDriver
from actors.reconciliation import Desired, Resync
from actors.retention import past_history, unneeded_contents
from actors.rollout import (
    canary_count,
    phase,
    rollback_targets,
    split_batches,
    split_by_previous,
)
from actors.stored_statuses import StoredChanged, StoredStatuses
from bus.edge import NOT_LEADING, RETRY_AFTER_MS, reply_error
from bus.fenced_kv import Fenced
from bus.jetstream import KvError
from bus.kv_watch import KvWatch
from bus.runtime import SubscriptionHandle
from schemas import endpoints as api
from schemas.api import (
    DRY_RUN_ID,
    DistributeReply,
    DistributeRequest,
    Distribution,
    DistributionActionRequest,
    DistributionGetRequest,
    DistributionListRequest,
    DistributionPlan,
    GatewayDelivery,
    GatewaySnapshot,
    Origin,
    ReconcileRequest,
    RollbackRequest,
    Rollout,
)
from schemas.codec import encode
from schemas.events import (
    EVENT_MAX_IDS,
    Alarm,
    DistributionEvent,
    QueuedStep,
    RollingBackStep,
    utc_now,
)
from schemas.stored import DesiredConfig, DistributionSpec
from schemas.types import DistributionStatus

log = logging.getLogger(__name__)

# Hold their type's queue without pushing.
HOLDING = frozenset[DistributionStatus]({"scheduled", "paused"})
# A rollout that got this far sets its desired state as it ends.
SUCCEEDED = frozenset[DistributionStatus]({"completed", "partially_failed"})
# Counted as failed in the status (with failed and partially_failed).
UNSUCCESSFUL = frozenset[DistributionStatus](
    {"failed", "partially_failed", "halted", "aborted", "rolled_back"}
)
# When the store refused a rollback, it is tried again after this long.
ROLLBACK_RETRY_S = 5.0
# A distribution whose actor dies more often than this is failed, not started again.
MAX_RESTARTS = 3
# How long a distribute request_id is remembered (a retry after that starts anew).
REQUEST_ID_TTL = timedelta(hours=24)
# What each control endpoint asks of a running distribution.
CONTROLS: dict[api.Endpoint[Any, Any], ControlAction] = {
    api.DISTRIBUTIONS_PAUSE: "pause",
    api.DISTRIBUTIONS_RESUME: "resume",
    api.DISTRIBUTIONS_ABORT: "abort",
}


class DistributorActor(SafeActor):
    def __init__(self, context: Context) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "distributor"))
        self.ctx = context
        self.bus = context.bus
        self.store = DistributionStore(context.buckets["distributions"], context.buckets["desired"])
        self.leading = False  # only the leading replica holds distributions (issue 16)
        self.epoch: int | None = None  # the lease's while leading: each actor acts in it
        # The newest snapshot of each gateway, kept while standing by too, so that a
        # replica that starts leading knows the fleet at once.
        self.fleet: dict[str, GatewaySnapshot] = {}
        self._forget()
        self.durations = HistogramRecorder(DISTRIBUTION_BOUNDS_S)  # of those ended since start
        self.supervisor: pykka.ActorRef[Any] | None = None  # told DistributionCounts
        self._subscriptions: list[SubscriptionHandle] = []
        # Standing by: the stored distributions' statuses, which the counts follow.
        self.stored: StoredStatuses | None = None
        self._stored_watch: KvWatch | None = None

    def _forget(self) -> None:
        """No distributions in memory: at start, and after leading (the store keeps them)."""
        settings = self.ctx.settings.orchestrator
        # The first cooldown of a gateway whose push timed out: what one distribution has
        # just spent on it (every attempt's ack timeout and retry delay).
        attempt_ms = settings.distribution_ack_timeout_ms + settings.distribution_retry_delay_ms
        self.reconcile = ReconcileDriver(
            self,
            bus=self.ctx.bus,
            me=self.actor_ref,
            emit=self.ctx.emit,
            clock=self.ctx.clock,
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

    # Life cycle --------------------------------------------------------------------------

    def on_start(self) -> None:
        leading = Leading.of(self.ctx.lease.view)
        if leading.leading and self.ctx.lease.still_leader():
            self.handle(leading)
        else:
            self._watch_store()
        self._subscriptions = self.serve("distributor", self.ctx)

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        self._unwatch_store()
        stop_all(self.running.values(), timeout=5)

    def _lead(self) -> None:
        """This replica leads: the store's distributions loaded, the unfinished resumed."""
        self.leading = True
        self._unwatch_store()
        for snapshot in self.fleet.values():
            self.reconcile.reconciler.on_gateway(snapshot)
        self._load()
        # What a stop cut short: a rolled back distribution not ended yet, a completed
        # rollout whose desired state is not stored.
        for record in list(self.records.values()):
            if record.status == "rolling_back" and record.rollbacks:
                self._rollback_ended(self.records[record.rollbacks[-1]])
        self._desire_completed_rollouts()
        self._prune()
        for config_type in list(self.queues):
            self._start_head(config_type)

    def _standing_by(self, message: Any) -> bool:
        """Keeps what every replica knows of the fleet; True if, standing by, there is
        nothing more to do with `message`."""
        match message:
            case GatewayUpdated(snapshot=snapshot):
                self.fleet[snapshot.gateway_id] = snapshot
            case GatewayRemoved(gateway_id=gateway_id):
                self.fleet.pop(gateway_id, None)
            case StoredChanged(key=key, value=value):
                self._stored_changed(key, value)
                return True
        if self.leading or isinstance(message, Leading | ReportTo):
            return False
        # A standby holds no distributions: the leader acts on these (requests reach it
        # forwarded; one that slipped in during a change of leader is refused).
        if isinstance(message, Request):
            reply_error(self.replies, message.reply, "unavailable", NOT_LEADING, RETRY_AFTER_MS)
        return True

    def _set_leading(self, leading: bool, epoch: int | None) -> None:
        if self.leading and (not leading or epoch != self.epoch):
            self._stand_by()
        if leading and not self.leading:
            self.epoch = epoch
            self._lead()
        if self.supervisor is not None:
            self.supervisor.tell(self._counts())

    def _stand_by(self) -> None:
        """Another replica leads (or will): the running distributions stop where their
        store has them, for the leader to resume; nothing is marked failed."""
        self.leading = False
        log.warning(
            "this replica stopped leading: %d running distributions left to the leader",
            len(self.running),
        )
        stop_all(self.running.values(), timeout=5)
        self._forget()
        self._watch_store()

    def _watch_store(self) -> None:
        """Standing by: the counts follow the stored records (they are the leader's), so
        that `status` counts the same distributions on every replica."""
        self.stored = StoredStatuses(self.ctx.settings.orchestrator.distribution_history)
        ref = self.actor_ref

        def changed(key: str, value: bytes | None, _age_s: float) -> None:  # on the bus loop
            tell_latest(ref, ("stored", key), StoredChanged(key, value))

        self._stored_watch = self.ctx.buckets["distributions"].watch(changed)
        self._stored_watch.start()

    def _unwatch_store(self) -> None:
        if self._stored_watch is not None:
            self._stored_watch.stop()
        self._stored_watch, self.stored = None, None

    def _stored_changed(self, key: str, value: bytes | None) -> None:
        if self.stored is None or not self.stored.apply(key, value):
            return  # leading (told before the watch stopped), or no status changed
        now = self.stored.statuses()
        self._recount({s: now[s] - self.statuses[s] for s in now.keys() | self.statuses.keys()})

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
            self.reconcile.learn(record, record.target_gateways)
            original = self.records.get(record.rollback_of or "")
            if original is not None:
                self.records[original.id] = replace(original, rollbacks=[record.id])
        # Unfinished ones in the order of the versions they were created with, that of
        # their queues (one whose version moved keeps its place); one rolling back waits
        # at its queue's head until its rollback exists (which then runs in its place).
        unfinished = [
            r
            for r in self.records.values()
            if r.status not in TERMINAL_STATUSES
            and not (r.status == "rolling_back" and r.rollbacks)
        ]
        created = loaded.created_versions
        for record in sorted(unfinished, key=lambda r: created.get(r.id, r.version)):
            self.queues.setdefault(record.config_type, deque()).append(record.id)
            self.reconcile.started(record)
        self.statuses = Counter(r.status for r in self.records.values())
        if self.records:
            log.info("%d distributions loaded, %d to resume", len(self.records), len(unfinished))

    # Messages ----------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        try:
            return self._handle(message)
        except Fenced as fenced:
            self._fenced(fenced, message)
            return None

    def _fenced(self, fenced: Fenced, message: Any) -> None:
        """A write was refused: another replica has written that key since this one read
        it, so leads now. This replica steps down, as when it loses the lease, and leaves
        the store as the other wrote it (what `message` had done is forgotten with the
        rest); a request is answered as one reaching a standby."""
        self.ctx.lease.step_down(why=str(fenced), epoch=self.epoch)
        self._set_leading(False, None)
        if isinstance(message, Request):
            reply_error(self.replies, message.reply, "unavailable", NOT_LEADING, RETRY_AFTER_MS)

    def _handle(self, message: Any) -> Any:
        if self._standing_by(message):
            return None
        match message:
            case Leading(leading=leading, epoch=epoch):
                self._set_leading(leading, epoch)
            case ReportTo(supervisor=supervisor):
                self.supervisor = supervisor
                supervisor.tell(self._counts())
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
                    page = distributions_page(
                        self.records.values(), request, annotate=self._annotate
                    )
                except BadCursor as exc:
                    reply_error(self.replies, reply, "bad_request", str(exc))
                else:
                    self.replies.publish(reply, page)
            case Request(
                endpoint=api.DISTRIBUTIONS_PAUSE
                | api.DISTRIBUTIONS_RESUME
                | api.DISTRIBUTIONS_ABORT as endpoint,
                body=DistributionActionRequest() as request,
                reply=reply,
            ):
                self._control(CONTROLS[endpoint], request.distribution_id, reply)
            case Request(endpoint=api.ROLLBACK, body=RollbackRequest() as request, reply=reply):
                self._rollback_request(request, reply)
            case Request(endpoint=api.RECONCILE, body=ReconcileRequest() as request, reply=reply):
                answer = self.reconcile.request(request.gateway_id, request.config_type)
                if isinstance(answer, str):
                    reply_error(self.replies, reply, "not_found", answer)
                else:
                    self.replies.publish(reply, answer)
            case DistributionChanged(record=record, gateways=gateways):
                self._changed(record, gateways)
            case GatewayUpdated(snapshot=snapshot, old_status=old_status):
                if old_status != snapshot.status:
                    self._tell_health(snapshot)
                self.reconcile.on_gateway(snapshot)
            case StartHead(config_type=config_type):
                self._start_head(config_type)
            case GatewayRemoved(gateway_id=gateway_id):
                self.reconcile.forget(gateway_id)
            case ReconcileDue(gateway_id=gateway_id):
                self.reconcile.check([gateway_id])
            case CounterBehind(distribution_id=dist_id, held_version=held, content=content):
                self._move_version(dist_id, held, content)
            case ChildDied(kind="DistributionActor", key=dist_id, error=error, urn=urn):
                if self._runs(dist_id, urn):
                    self._restart(dist_id, error)
            case NotLeading(distribution_id=dist_id, urn=urn):
                if self._runs(dist_id, urn):
                    del self.running[dist_id]  # as stored: the leader resumes it
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
        if request.dry_run:
            plan = self._plan(request)
            self.replies.publish(
                reply, DistributeReply(distribution_id=DRY_RUN_ID, status="dry_run", plan=plan)
            )
            return
        earlier = self._by_request_id(request.request_id)
        if earlier is not None:  # a retry: the same answer, nothing new started
            self.replies.publish(reply, DistributeReply(distribution_id=earlier.id))
            return
        self._new_version(
            reply,
            request.config_type,
            request.config_data,
            request.target_gateways,
            origin="distribute",
            request_id=request.request_id,
            rollout=request.rollout,
        )

    def _new_version(
        self,
        reply: str,
        config_type: str,
        content: dict[str, Any],
        requested: list[str] | None,
        *,
        origin: Origin,
        request_id: str | None = None,
        rollout: Rollout | None = None,
    ) -> None:
        """Stores a distribution of a new version of `content` and answers `reply`."""
        version = self.versions.get(config_type, 0) + 1
        targets, unknown = resolve_targets(requested, self.reconcile.active)
        spec = DistributionSpec(
            config_type=config_type,
            version=version,
            fleet_wide=requested is None,
            created_at=utc_now(),
            request_id=request_id,
            origin=origin,
            rollout=rollout,
        )
        try:
            record = self._create(spec, targets, unknown, content)
        except KvError as exc:
            reply_error(self.replies, reply, "unavailable", f"cannot store it: {exc}")
            return
        self.versions[config_type] = last_version(spec)
        try:
            self.store.put_version(config_type, self.versions[config_type])
        except KvError as exc:  # its spec, stored, holds the version all the same
            log.warning("version counter of %s not stored: %s", config_type, exc)
        self.replies.publish(reply, DistributeReply(distribution_id=record.id))
        self._enqueue(record)

    def _move_version(self, dist_id: str, held: int, content: dict[str, Any]) -> None:
        """A gateway holds version `held` of a running distribution's type, above its
        version: the counter was behind (gatefleet's state was reset). The distribution
        moves to a version above it (and its desired state with it, if it set it), and
        its actor hears which. Once moved past `held`, the same version is answered again
        (a resumed actor may ask twice)."""
        record, ref = self.records.get(dist_id), self.running.get(dist_id)
        if record is None or ref is None or record.status in HANDED_OVER:
            return
        config_type = record.config_type
        try:
            spec = self.store.spec(dist_id)
            if spec is None:
                safe_tell(ref, VersionMoved(version=None, reason="its spec is lost"))
                return
            version = spec.moved_to or 0
            if version <= held:
                version = max(self.versions.get(config_type, 0), held) + 1
                spec = replace(spec, moved_to=version)
                self.store.move_version(dist_id, spec, content)
                self.contents.add((config_type, version))
        except KvError as exc:
            safe_tell(ref, VersionMoved(version=None, reason=f"cannot store a new version: {exc}"))
            return
        if last_version(spec) > self.versions.get(config_type, 0):
            self.versions[config_type] = last_version(spec)
            try:
                self.store.put_version(config_type, self.versions[config_type])
            except KvError as exc:  # its spec, stored, holds the version all the same
                log.warning("version counter of %s not stored: %s", config_type, exc)
        log.warning(
            "the version counter of %s was behind: a gateway holds version %d; %s moves "
            "from version %d to %d (the same content)",
            config_type,
            held,
            dist_id,
            record.version,
            version,
        )
        if _desired_at_start(record):
            try:
                self._set_desired(replace(record, version=version), spec)
            except KvError as exc:
                log.warning(
                    "desired state of %s not moved to version %d: %s", dist_id, version, exc
                )
        safe_tell(ref, VersionMoved(version=version))

    def _plan(self, request: DistributeRequest) -> DistributionPlan:
        """What `request` would do now (a dry run)."""
        config_type = request.config_type
        targets, unknown = resolve_targets(request.target_gateways, self.reconcile.active)
        batch_size = self.ctx.settings.orchestrator.distribution_batch_size
        canary = canary_count(request.rollout, len(targets))
        queue = self.queues.get(config_type)
        running = self.reconcile.reconciler.running
        return DistributionPlan(
            config_type=config_type,
            version=self.versions.get(config_type, 0) + 1,
            batches=split_batches(targets, batch_size, canary),
            canary=targets[:canary],
            versions_now={gw: running(gw, config_type) for gw in targets},
            unknown_gateways=unknown,
            waits_behind=queue[-1] if queue else None,
            not_before=request.rollout.not_before if request.rollout else None,
        )

    def _get(self, request: DistributionGetRequest, reply: str) -> None:
        record = self.records.get(request.distribution_id)
        if record is None:
            message = f"no distribution {request.distribution_id}"
            reply_error(self.replies, reply, "not_found", message)
            return
        current, blocked_by = self._annotate(record)
        try:
            page = distribution_page(
                record,
                limit=request.limit,
                cursor=request.cursor,
                phase=current,
                blocked_by=blocked_by,
            )
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
        skipped: dict[str, str] | None = None,
    ) -> Distribution:
        """Stores a new distribution (with its version's `content`, unless stored already
        or none: a rollback with nothing to push) and keeps its (pending) record. Raises
        KvError, and then keeps nothing."""
        record = new_distribution(
            f"dist-{uuid.uuid4()}",
            spec.config_type,
            spec.version,
            targets=targets,
            unknown=unknown,
            created_at=spec.created_at,
            skipped=skipped,
            rollout=spec.rollout,
        )
        record = replace(
            record, origin=spec.origin, request_id=spec.request_id, rollback_of=spec.rollback_of
        )
        self.store.create(record, spec, content)
        self.contents.add((spec.config_type, spec.version))
        self._update(record)
        if spec.request_id is not None:
            self.request_ids[spec.request_id] = record.id
        return record

    def _enqueue(self, record: Distribution) -> None:
        queue = self.queues.setdefault(record.config_type, deque())
        queue.append(record.id)
        self._start_head(record.config_type)
        if record.id in queue and record.id not in self.running:
            before = queue[queue.index(record.id) - 1]
            step = QueuedStep(after=before)
            self.ctx.emit(DistributionEvent.of(record.id, record.config_type, record.version, step))

    def _start_head(self, config_type: str) -> None:
        """Starts the first distribution queued for `config_type`, if any. One that cannot
        start ends failed, and the next one is started instead. One rolling back at the
        head is replaced there by its rollback, created now."""
        queue = self.queues.get(config_type)
        failed = []
        while queue:
            record = self.records[queue[0]]
            if record.id in self.running:
                failed += self._start_alongside(queue)
                break
            if record.status == "rolling_back":
                if not self._roll_back(record):
                    break  # the store refused it: tried again later, the queue waits
                continue
            reason = self._start(record)
            if reason is None:
                break
            queue.popleft()
            failed.append(self._fail(record, reason))
        if not queue:
            self.queues.pop(config_type, None)
        for record in failed:
            self.reconcile.finished(record)
            self._rollback_ended(record)

    def _start_alongside(self, queue: deque[str]) -> list[Distribution]:
        """While the head holds its queue (scheduled, paused), the reconciliations right
        behind it run (they push no gateway it targets: see ReconcileDriver); those that
        cannot start end failed (returned)."""
        failed = []
        if self.records[queue[0]].status in HOLDING:
            for dist_id in list(queue)[1:]:
                record = self.records[dist_id]
                if record.origin != "reconcile":
                    break
                if dist_id not in self.running and (reason := self._start(record)):
                    queue.remove(dist_id)
                    failed.append(self._fail(record, reason))
        return failed

    def _start(self, record: Distribution, *, unstored: bool = False) -> str | None:
        """Starts its DistributionActor (writing desired state first if it sets it);
        or why it cannot start. `unstored`: the record may be ahead of the store."""
        try:
            spec = self.store.spec(record.id)
            content = self.store.content(record.config_type, record.version)
            if spec is None:
                return "spec lost"
            if content is None:
                if any(d.state == "pending" for d in record.gateways.values()):
                    return "content lost"
                content = {}  # nothing to push: a rollback listing its gateways only
            sets_desired = record.status == "pending" and _desired_at_start(record)
            if sets_desired:
                self._set_desired(record, spec)
        except KvError as exc:
            return f"cannot start it: {exc}"
        unhealthy = None
        if record.rollout is not None:
            status = self.reconcile.status
            unhealthy = {
                gw: why
                for gw in record.target_gateways
                if (why := status(gw) or "unknown") != "healthy"
            }
        assert self.epoch is not None  # only the leader starts distributions
        self.running[record.id] = DistributionActor.start(
            self.ctx,
            record,
            content,
            parent=self.actor_ref,
            store=self.store,
            epoch=self.epoch,
            unhealthy=unhealthy,
            unstored=unstored,
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
            gateways = [gw for gw, d in record.gateways.items() if d.error != UNKNOWN_GATEWAY]
        for gw in gateways:
            self.store.put_desired(record.config_type, gw, value)
        desired = Desired(record.version, record.id)
        for gw in gateways:
            self.reconcile.set_desired(record.config_type, gw, desired)

    def _changed(self, record: Distribution, gateways: frozenset[str]) -> None:
        """A record as its DistributionActor has it after a step (`gateways` changed)."""
        old = self.records.get(record.id)
        self._update(record)
        self.reconcile.learn(record, gateways)
        if old is not None and old.status in HANDED_OVER:
            return
        if record.status in HOLDING and (old is None or old.status not in HOLDING):
            self._start_head(record.config_type)  # reconciliations may run alongside
        if record.status == "rolling_back":
            self._handed_over(record)
            self._start_head(record.config_type)
        elif record.status in TERMINAL_STATUSES:
            self._finished(record)

    def _handed_over(self, record: Distribution) -> None:
        """Its actor's part is over (it stops itself)."""
        self.running.pop(record.id, None)
        self.restarts.pop(record.id, None)

    def _finished(self, record: Distribution) -> None:
        """It has ended: the next of its type starts, and the gateways it targeted are checked."""
        self._handed_over(record)
        if record.completed_at is not None:
            self.durations.observe((record.completed_at - record.created_at).total_seconds())
            if self.supervisor is not None:
                self.supervisor.tell(self._counts())
        if record.rollout is not None and record.status in SUCCEEDED:
            self._desire(record)
        queue = self.queues.get(record.config_type)
        if queue and record.id in queue:
            queue.remove(record.id)
            self._start_head(record.config_type)
        self.reconcile.finished(record)
        self._rollback_ended(record)
        self._prune()

    def _desire(self, record: Distribution) -> None:
        """A rollout that went through: its version becomes desired state now. If that
        cannot be stored, it is tried again at the next start."""
        try:
            spec = self.store.spec(record.id)
            if spec is not None:
                self._set_desired(record, spec)
        except KvError as exc:
            log.error(  # noqa: TRY400 - a known failure: one line, no traceback
                "desired state of %s (%s v%d) not stored (%s): tried again at the next start",
                record.id,
                record.config_type,
                record.version,
                exc,
            )
            return
        self.reconcile.check(None, [record.config_type])

    def _desire_completed_rollouts(self) -> None:
        """At start: the newest rollout of each type that went through sets desired state,
        if its end could not (desired state lags it)."""
        newest: dict[str, Distribution] = {}
        for record in self.records.values():
            if record.rollout is None or record.status not in SUCCEEDED:
                continue
            found = newest.get(record.config_type)
            if found is None or record.version > found.version:
                newest[record.config_type] = record
        desired = self.reconcile.desired_versions()
        for record in newest.values():
            later = any(t == record.config_type and v >= record.version for t, v in desired)
            if not later:
                self._desire(record)

    # Rollbacks ---------------------------------------------------------------------------

    def _roll_back(self, original: Distribution) -> bool:
        """Creates the rollback of a rollout that halted (auto_rollback), in its place at
        the head of its type's queue, and says so (`rolling_back` step). False if the
        store refused it: tried again after ROLLBACK_RETRY_S."""
        config_type = original.config_type
        gateways = rollback_targets(original)
        if not gateways:
            self.queues[config_type].popleft()
            self._end(original, "halted", "nothing to roll back: no gateway took it", utc_now())
            return True
        previous: dict[str, int | None] = {}
        for gw in gateways:
            desired = self.reconcile.reconciler.desired(gw, config_type)
            previous[gw] = None if desired is None else desired.version
        restores, pushed, listed = split_by_previous(gateways, previous)
        spec = DistributionSpec(
            config_type=config_type,
            version=original.version + 1,  # kept for it
            fleet_wide=False,
            origin="rollback",
            created_at=utc_now(),
            rollback_of=original.id,
        )
        try:
            content = None if restores is None else self.store.content(config_type, restores)
            if content is None:
                lost = f"the content of version {restores} is lost: not rolled back"
                listed.update(dict.fromkeys(pushed, lost))
                pushed = []
            rollback = self._create(spec, pushed, [], content, skipped=listed)
        except KvError as exc:
            log.error(  # noqa: TRY400 - a known failure: one line, no traceback
                "cannot create the rollback of %s now (%s): tried again in %.0fs",
                original.id,
                exc,
                ROLLBACK_RETRY_S,
            )
            self.bus.call_later(
                ROLLBACK_RETRY_S, safe_tell, self.actor_ref, StartHead(config_type=config_type)
            )
            return False
        self._update(replace(original, rollbacks=[rollback.id]))
        queue = self.queues[config_type]
        queue[0] = rollback.id
        step = RollingBackStep(
            rollback_id=rollback.id,
            version=rollback.version,
            restores=restores,
            gateway_count=len(pushed),
            not_pushed=list(listed)[:EVENT_MAX_IDS],
        )
        self.ctx.emit(DistributionEvent.of(original.id, config_type, original.version, step))
        log.warning(
            "distribution %s halted: %s rolls %d gateways back to the content of version %s",
            original.id,
            rollback.id,
            len(pushed),
            restores,
        )
        return True

    def _rollback_ended(self, rollback: Distribution) -> None:
        """A rollback has ended: the distribution it rolled back ends `rolled_back` if it
        completed (`halted` if it had nothing to restore), else `failed` with the reason."""
        original = self.records.get(rollback.rollback_of or "")
        if original is None or original.status != "rolling_back":
            return
        if rollback.status not in TERMINAL_STATUSES:
            return
        not_pushed = sum(d.state == "skipped" for d in rollback.gateways.values())
        status: DistributionStatus = "rolled_back"
        if rollback.status == "completed" and not_pushed == len(rollback.target_gateways):
            status = "halted"  # nothing was there to restore
            outcome = f"not rolled back: no gateway had a version to restore ({rollback.id})"
        elif rollback.status == "completed":
            outcome = f"rolled back by {rollback.id}"
            if not_pushed:
                outcome += f" ({not_pushed} gateways listed, not rolled back)"
        else:
            status = "failed"
            outcome = f"its rollback {rollback.id} ended {rollback.status}: {rollback.reason}"
        self._end(original, status, outcome, rollback.completed_at or utc_now())

    def _end(
        self, original: Distribution, status: DistributionStatus, outcome: str, at: datetime
    ) -> None:
        """Ends a distribution that was rolling back (its actor has stopped: its progress
        is written here; if that fails, this is done again at the next start)."""
        ended = replace(
            original,
            status=status,
            completed_at=at,
            reason=f"{original.reason}; {outcome}" if original.reason else outcome,
        )
        try:
            self.store.put_progress(ended, [])
        except KvError as exc:
            log.error(  # noqa: TRY400 - a known failure: one line, no traceback
                "the end of %s is not stored (%s): stored again at the next start",
                original.id,
                exc,
            )
        self._update(ended)
        self.ctx.emit(
            DistributionEvent.of(ended.id, ended.config_type, ended.version, finished_step(ended))
        )
        self._finished(ended)

    # Requests of a running one -------------------------------------------------------------

    def _control(self, action: ControlAction, dist_id: str, reply: str) -> None:
        """Pause, resume or abort: the running distribution's actor does it and answers;
        one waiting in its queue can only be aborted, which is done here."""
        record = self.records.get(dist_id)
        if record is None:
            reply_error(self.replies, reply, "not_found", f"no distribution {dist_id}")
            return
        ref = self.running.get(dist_id)
        if ref is not None:
            try:
                ref.tell(Control(action=action, reply=reply))
            except pykka.ActorDeadError:
                reply_error(self.replies, reply, "unavailable", f"{dist_id} is ending; retry")
            return
        if record.status == "pending" and action == "abort":
            self._abort_queued(record, reply)
            return
        why = f"distribution {dist_id} is {record.status}"
        if record.status == "pending":
            why += ": it waits in its queue (only a running distribution can be paused)"
        elif record.status == "rolling_back":
            why += f": its rollback ({', '.join(record.rollbacks) or 'being created'}) can be"
        else:
            why += ": it has ended"
        reply_error(self.replies, reply, "bad_request", why)

    def _abort_queued(self, record: Distribution, reply: str) -> None:
        """A distribution aborted before it started (no actor writes it): it ends here."""
        aborted = unstarted_aborted(record, utc_now())
        try:
            self.store.put_progress(aborted, range(len(aborted.target_gateways)))
        except KvError as exc:
            reply_error(self.replies, reply, "unavailable", f"cannot store it: {exc}")
            return
        self._update(aborted)
        self.ctx.emit(
            DistributionEvent.of(
                aborted.id, aborted.config_type, aborted.version, finished_step(aborted)
            )
        )
        self.replies.publish(reply, distribution_page(aborted, phase=phase(aborted, utc_now())))
        self._finished(aborted)

    def _rollback_request(self, request: RollbackRequest, reply: str) -> None:
        """`P.api.rollback`: an earlier version's content as a new version, made desired."""
        config_type = request.config_type
        version = request.to_version or self._previous_version(config_type, request)
        if version is None:
            message = f"no earlier version of {config_type} to roll back to"
            reply_error(self.replies, reply, "not_found", message)
            return
        try:
            content = self.store.content(config_type, version)
        except KvError as exc:
            reply_error(self.replies, reply, "unavailable", f"cannot read it: {exc}")
            return
        if content is None:
            message = f"the content of {config_type} version {version} is not kept"
            reply_error(self.replies, reply, "not_found", message)
            return
        self._new_version(reply, config_type, content, request.target_gateways, origin="rollback")

    def _previous_version(self, config_type: str, request: RollbackRequest) -> int | None:
        """The newest version older than the one desired now (the fleet's, or the newest
        of the named gateways') that a distribution made desired."""
        gateways: list[str | None] = [None]
        if request.target_gateways:
            gateways = [*request.target_gateways]
        now = [d.version for gw in gateways if (d := self._desired_of(gw, config_type))]
        if not now:
            return None
        earlier = [
            r.version
            for r in self.records.values()
            if r.config_type == config_type
            and r.version < max(now)
            and (_desired_at_start(r) or (r.rollout is not None and r.status in SUCCEEDED))
            and (config_type, r.version) in self.contents
        ]
        return max(earlier, default=None)

    def _desired_of(self, gateway_id: str | None, config_type: str) -> Desired | None:
        if gateway_id is None:
            return self.reconcile.reconciler.fleet_desired(config_type)
        return self.reconcile.reconciler.desired(gateway_id, config_type)

    # Health, for rollouts' gates ------------------------------------------------------------

    def _tell_health(self, snapshot: GatewaySnapshot) -> None:
        """A gateway's status changed: the running rollouts targeting it hear whether it
        is healthy now."""
        gw, healthy = snapshot.gateway_id, snapshot.status == "healthy"
        message = GatewayHealth(
            gateway_id=gw, healthy=healthy, reason=f"{snapshot.status} (score {snapshot.score:.1f})"
        )
        for dist_id, ref in self.running.items():
            record = self.records[dist_id]
            if record.rollout is not None and gw in record.gateways:
                safe_tell(ref, message)

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
                if r.status not in TERMINAL_STATUSES
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

    def _runs(self, dist_id: str, urn: str) -> bool:
        """Whether that actor runs the distribution: not ended, and not one of this
        replica's earlier tenure whose message comes late (another runs it now)."""
        running = self.running.get(dist_id)
        return running is not None and running.actor_urn == urn

    def _restart(self, dist_id: str, error: str) -> None:
        """Its DistributionActor died: a new one resumes it from the newest record.

        That is the one it told us last (it tells every step, and ChildDied comes after
        them), not the stored one, which lags by the acks since the last send: the new
        actor stores every state with its first step (a chunk otherwise unchanged would
        keep them unacked in the store)."""
        del self.running[dist_id]
        record = self.records[dist_id]
        if record.status in HANDED_OVER:
            return
        self.restarts[dist_id] += 1
        if self.restarts[dist_id] > MAX_RESTARTS:
            log.error("distribution actor %s died again (%s): failing it", dist_id, error)
            self._finished(self._fail(record, f"its actor died {self.restarts[dist_id]} times"))
            return
        self.ctx.restarts.add("DistributionActor")
        log.warning("distribution actor %s died (%s): restarting it", dist_id, error)
        cannot = self._start(record, unstored=True)
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
            active=sum(n for state, n in s.items() if state not in TERMINAL_STATUSES),
            completed=s["completed"],
            failed=sum(n for state, n in s.items() if state in UNSUCCESSFUL),
            durations=self.durations.snapshot(),
            by_state={state: n for state, n in s.items() if n},
            blockers={t: holder.id for t in self.queues if (holder := self._holder(t))},
        )

    def _holder(self, config_type: str) -> Distribution | None:
        """The scheduled or paused distribution holding this type's queue, if one is."""
        queue = self.queues.get(config_type)
        head = self.records.get(queue[0]) if queue else None
        return head if head is not None and head.status in HOLDING else None

    def _annotate(self, record: Distribution) -> tuple[str, str | None]:
        """Its phase, and the distribution it is blocked by (DistributionPage)."""
        holder = self._holder(record.config_type) if record.status == "pending" else None
        return phase(record, utc_now(), holder), holder.id if holder else None

    # The ReconcileDriver's desk ------------------------------------------------------------

    def queued(self, config_type: str) -> Sequence[Distribution]:
        return [self.records[dist_id] for dist_id in self.queues.get(config_type, ())]

    def record(self, dist_id: str) -> Distribution | None:
        return self.records.get(dist_id)

    def reconcile_with(self, resync: Resync, joining: Distribution | None) -> str | None:
        gw = resync.gateway_id
        if joining is not None and joining.id not in self.running:
            # Waiting in its queue: it takes in one more gateway.
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


def _desired_at_start(record: Distribution) -> bool:
    """Whether it sets desired state as it starts: one without a rollout made by
    distribute or P.api.rollback (a rollout's is set as it ends; an automatic rollback
    restores what is desired already; a reconciliation pushes it)."""
    return record.rollout is None and record.rollback_of is None and record.origin != "reconcile"
