"""DistributorActor: the API of configuration distribution, and its bookkeeping.

Owns: every distribution record (loaded from the `distributions` bucket at start, then
kept current by the DistributionActors' tells, so get and list never ask anyone), the
last version given per config type, the table of known gateways (active: healthy or
degraded), one FIFO queue per config type whose head alone runs (two distributions of a
type are applied in order, so no gateway ends on the older one; types run side by side),
the running DistributionActors, and the distribution counts of `P.api.status`.
Receives: Distribute, GetDistribution, ListDistributions, DistributionChanged,
GatewayUpdated, GatewayRemoved, AddListener (a listener is told DistributionCounts on
every change: the supervisor).
Emits: `distribution.step` with step "queued" when a distribution waits behind another of
its type (its DistributionActor emits every other step).
Serves: `P.api.distribute`, `P.api.distributions.get`, `P.api.distributions.list`.

A distribution's targets are resolved when it is created, so its record lists them at
once. The spec, the version counter and the record are stored before the reply
(layout: schemas/desired.py); at start, unfinished distributions are queued again per
type in version order and resumed.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter, deque
from typing import Any

import pykka
from msgspec.structs import replace

from actors.base import SafeActor
from actors.context import Context
from actors.distribution import DistributionActor
from actors.distribution_machine import TERMINAL_STATUSES, new_distribution, resolve_targets
from actors.messages import (
    AddListener,
    Distribute,
    DistributionChanged,
    DistributionCounts,
    GatewayRemoved,
    GatewayUpdated,
    GetDistribution,
    ListDistributions,
)
from bus.edge import reply_error, request_handler
from bus.runtime import SubscriptionHandle
from schemas.api import (
    DistributeReply,
    DistributeRequest,
    Distribution,
    DistributionGetRequest,
    DistributionListReply,
    DistributionListRequest,
    DistributionStatus,
)
from schemas.codec import DecodeError, encode
from schemas.desired import DistributionSpec, VersionCounter
from schemas.events import DistributionEvent, utc_now

log = logging.getLogger(__name__)

API_QUEUE = "gatefleet-api"
RECORD_KEY_RE = re.compile(r"^dist-[A-Za-z0-9-]+$")
SPEC_SUFFIX = ".spec"
VERSIONS_PREFIX = "versions."
ACTIVE_GATEWAY_STATUSES = frozenset({"healthy", "degraded"})
OPEN_STATUSES = frozenset[DistributionStatus]({"pending", "in_progress"})


class DistributorActor(SafeActor):
    def __init__(self, context: Context) -> None:
        super().__init__()
        self.ctx = context
        self.bus = context.bus
        self.store = context.buckets["distributions"]
        self.records: dict[str, Distribution] = {}
        self.versions: dict[str, int] = {}
        self.gateways: dict[str, bool] = {}
        self.queues: dict[str, deque[str]] = {}
        self.running: dict[str, pykka.ActorRef[Any]] = {}
        self.statuses: Counter[DistributionStatus] = Counter()
        self.listeners: list[pykka.ActorRef[Any]] = []
        self._subscriptions: list[SubscriptionHandle] = []

    # Life cycle --------------------------------------------------------------------------

    def on_start(self) -> None:
        self._load()
        me, api, drops = self.actor_ref, self.ctx.subjects.api, self.ctx.drops
        routes: list[tuple[str, Any, Any]] = [
            (
                "distribute",
                DistributeRequest,
                lambda r, to: me.tell(Distribute(request=r, reply=to)),
            ),
            (
                "distributions.get",
                DistributionGetRequest,
                lambda r, to: me.tell(GetDistribution(request=r, reply=to)),
            ),
            (
                "distributions.list",
                DistributionListRequest,
                lambda r, to: me.tell(ListDistributions(request=r, reply=to)),
            ),
        ]
        for name, kind, on_request in routes:
            handler = request_handler(self.bus, kind, on_request, drops)
            self._subscriptions.append(self.bus.subscribe(api(name), handler, queue=API_QUEUE))
        for config_type in list(self.queues):
            self._start_head(config_type)

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        for ref in self.running.values():
            ref.stop(timeout=5)

    def _load(self) -> None:
        """Records and version counters from the bucket; unfinished ones queued again."""
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
        for record in sorted(unfinished, key=lambda r: r.version):
            self.queues.setdefault(record.config_type, deque()).append(record.id)
        self.statuses = Counter(r.status for r in self.records.values())
        if self.records:
            log.info("%d distributions loaded, %d to resume", len(self.records), len(unfinished))

    # Messages ----------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case Distribute(request=request, reply=reply):
                self._distribute(request, reply)
            case GetDistribution(request=request, reply=reply):
                record = self.records.get(request.distribution_id)
                if record is None:
                    reply_error(
                        self.bus, reply, "not_found", f"no distribution {request.distribution_id}"
                    )
                else:
                    self.bus.publish(reply, record)
            case ListDistributions(request=request, reply=reply):
                rows = [
                    r
                    for r in self.records.values()
                    if request.include_completed or r.status in OPEN_STATUSES
                ]
                rows.sort(key=lambda r: (r.created_at, r.id))
                self.bus.publish(reply, DistributionListReply(distributions=rows))
            case DistributionChanged(record=record):
                self._update(record)
                if record.status in TERMINAL_STATUSES:
                    self._finished(record)
            case GatewayUpdated(snapshot=snapshot):
                self.gateways[snapshot.gateway_id] = snapshot.status in ACTIVE_GATEWAY_STATUSES
            case GatewayRemoved(gateway_id=gateway_id):
                self.gateways.pop(gateway_id, None)
            case AddListener(listener=listener):
                self.listeners.append(listener)
                listener.tell(self._counts())
            case _:
                return super().handle(message)
        return None

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
        targets, unknown = resolve_targets(request.target_gateways, self.gateways)
        record = new_distribution(
            dist_id, config_type, version, targets=targets, unknown=unknown, created_at=utc_now()
        )
        self.store.put(dist_id, record)
        self._update(record)
        queue = self.queues.setdefault(config_type, deque())
        queue.append(dist_id)
        if len(queue) == 1:
            self._start_head(config_type, spec)
        else:
            self.ctx.emit(
                DistributionEvent(
                    distribution_id=dist_id,
                    config_type=config_type,
                    version=version,
                    step="queued",
                    details={"after": queue[-2]},
                )
            )
        self.bus.publish(reply, DistributeReply(distribution_id=dist_id))

    def _start_head(self, config_type: str, spec: DistributionSpec | None = None) -> None:
        """Starts the first distribution queued for `config_type`, if any."""
        queue = self.queues[config_type]
        while queue:
            record = self.records[queue[0]]
            spec = spec or self.store.get(record.id + SPEC_SUFFIX, DistributionSpec)
            if spec is not None:
                self.running[record.id] = DistributionActor.start(
                    self.ctx, record, spec, self.actor_ref
                )
                return
            log.error("distribution %s has no stored spec: failing it", record.id)
            lost = replace(record, status="failed", completed_at=utc_now(), reason="spec lost")
            self.store.put(record.id, lost)
            self._update(lost)
            queue.popleft()
        del self.queues[config_type]

    def _finished(self, record: Distribution) -> None:
        self.running.pop(record.id, None)
        queue = self.queues.get(record.config_type)
        if queue and queue[0] == record.id:
            queue.popleft()
            self._start_head(record.config_type)

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
        if counts != before:
            for listener in self.listeners:
                listener.tell(counts)

    def _counts(self) -> DistributionCounts:
        s = self.statuses
        return DistributionCounts(
            active=s["pending"] + s["in_progress"],
            completed=s["completed"],
            failed=s["failed"] + s["partially_failed"],
        )
