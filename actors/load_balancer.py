"""LoadBalancerActor: answers "which gateway should this client use?".

Owns: a `Balancer` (actors/balancer.py: the selection `Pool`, fed by GatewayActors' tells
and never asked at selection time, the strategy and threshold in force, persisted in
the `settings` bucket by the leader (each write fenced: a compare-and-set on the revision
it last wrote, issue 16), round-robin cursors, sticky clients, slow start), and the
`sticky` bucket, which every replica shares (actors/sticky.py): written and watched on
the API lane's connection.
Receives: GatewayUpdated, GatewayRemoved, the requests below, ReportTo (from app.py:
whom to tell LoadBalancingInForce); from the supervisor FindReplacementFor (answered with
ReplacementFound) and Hold/ReleaseGateway (failed-over primaries kept out of the pool
until a manual failback); from the watch, each change of a sticky client's gateway
(`_StickyChanged`, latest lane: the newest value of a client replaces an unread one);
asked by tests, StickyOf (a client's gateway in this replica's copy).
Emits: when audit.record_selections, its `SelectionLog` (actors/selection_log.py):
`lb.selections` batches (each selection's inputs, and the pool's changes between them)
and `lb.snapshot`, recorded after the reply is published, so that `gatefleet audit`
can explain and re-run any selection; `lb.changed`; tells the supervisor
LoadBalancingInForce.
Serves: `P.api.select-gateway`, `P.api.load-balancing.get|set`, `P.api.gateways`.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pykka

from actors.balancer import Balancer, selection_rules
from actors.base import SafeActor, safe_tell, tell_latest
from actors.context import Context
from actors.messages import (
    FindReplacementFor,
    GatewayRemoved,
    GatewayUpdated,
    HoldGateway,
    LoadBalancingInForce,
    ReleaseGateway,
    ReplacementFound,
    ReportTo,
    Request,
    TableStats,
)
from actors.paging import BadCursor, gateways_page
from actors.pool import Pool
from actors.selection_log import SelectionLog
from actors.sticky import bucket_key
from bus.edge import NOT_LEADING, RETRY_AFTER_MS, reply_error
from bus.fenced_kv import Fenced
from bus.jetstream import STICKY_BUCKET, WrongRevision, failure_reason, open_bucket
from bus.kv_watch import KvWatch
from bus.log_throttle import LogThrottle, held_back
from schemas import endpoints as api
from schemas.api import (
    GatewaysRequest,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    SelectReply,
    SelectRequest,
)
from schemas.codec import DecodeError, decode
from schemas.events import (
    LoadBalancingChanged,
    OrchestratorStarted,
)
from schemas.stored import StickyAssignment

log = logging.getLogger(__name__)

SETTINGS_KEY = "load_balancing"
# How long start-up waits for the sticky clients the bucket holds (then they follow).
STICKY_LOAD_TIMEOUT_S = 10.0
# At most one line per kind of sticky-bucket trouble in this many seconds.
STICKY_LOG_S = 60.0


class LoadBalancerActor(SafeActor):
    # On the API lane's loop: requests arrive there and replies leave from there, so a
    # selection costs no thread hop. It must never block: its blocking start-up runs in
    # __init__ (the starting thread), its settings are stored without waiting.
    dispatch = "api"

    def __init__(self, context: Context) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "load-balancer"))
        self.ctx = context
        self.bus = context.bus
        settings = context.settings
        orchestrator = settings.orchestrator
        config = self._stored_config() or LoadBalancingConfig(
            strategy=orchestrator.load_balancing_strategy,
            health_threshold=orchestrator.health_threshold_percent,
        )
        self.lb = Balancer(
            settings,
            config,
            log=self._selection_log(config) if settings.audit.record_selections else None,
            clock=context.clock,
            share=self._share,
        )
        self.supervisor: pykka.ActorRef[Any] | None = None
        # The settings asked for last (in force, or being stored), and the writes asked
        # for and not ended, one after the other (the first being written).
        self._requested = config
        self._storing: deque[tuple[LoadBalancingConfig, str]] = deque()
        # (epoch, revision) of the settings key as this replica last wrote it: its next
        # write in the same tenure is a compare-and-set on it (issue 16). None, or
        # another epoch: the first write of a tenure is at the revision read then.
        self._settings_at: tuple[int | None, int] | None = None
        # First of this run's events (the load balancer starts first): what is in force now.
        self.ctx.emit(
            OrchestratorStarted(
                strategy=config.strategy,
                threshold=config.health_threshold,
                ha_enabled=orchestrator.ha_enabled,
                replica_id=self.ctx.lease.replica_id,
                role=self.ctx.lease.view.role,
                leader=self.ctx.lease.view.leader,
                epoch=self.ctx.lease.view.epoch,
            )
        )
        self._sticky_trouble = LogThrottle(STICKY_LOG_S)
        self._sticky = open_bucket(context.runtime.api_bus, context.subjects.prefix, STICKY_BUCKET)
        self._sticky_watch = self._watch_sticky()
        self._settings_watch = self._watch_settings()
        # Requests wait in the inbox until the actor has started.
        self._subscriptions = self.serve("load_balancer", self.ctx)

    @property
    def config(self) -> LoadBalancingConfig:
        return self.lb.config

    @property
    def pool(self) -> Pool:
        return self.lb.pool

    def _selection_log(self, config: LoadBalancingConfig) -> SelectionLog:
        timers, ref = self.ctx.runtime.timers, self.actor_ref
        return SelectionLog(
            self.ctx.emit,
            rules=selection_rules(self.ctx.settings),
            config=config,
            events_lost=self.ctx.events_lost,
            schedule_flush=lambda delay: timers.schedule(delay, safe_tell, ref, _FlushSelections()),
            clock=self.ctx.clock,
            replica_id=self.ctx.lease.replica_id,
        )

    def _watch_sticky(self) -> KvWatch:
        """Starts the watch of the sticky clients, and waits (a while) until it has told
        every client the bucket holds: they are in the inbox before any request."""
        ref = self.actor_ref

        def changed(key: str, value: bytes | None, age_s: float) -> None:  # on the API loop
            tell_latest(ref, ("sticky", key), _StickyChanged(key, value, age_s))

        watch = self._sticky.watch(changed)
        watch.start()
        if not watch.caught_up.wait(STICKY_LOAD_TIMEOUT_S):
            log.warning(
                "sticky clients not read within %.0f s: they follow as the bucket's watch"
                " catches up",
                STICKY_LOAD_TIMEOUT_S,
            )
        return watch

    def _watch_settings(self) -> KvWatch:
        """Settings stored by another replica (the leader, to which `load-balancing.set`
        is forwarded) come into force here too, as soon as the bucket tells."""
        ref = self.actor_ref

        def changed(key: str, value: bytes | None, _age_s: float) -> None:  # on the bus loop
            if key == SETTINGS_KEY and value is not None:
                safe_tell(ref, _SettingsChanged(value))

        watch = self.ctx.buckets["settings"].watch(changed)
        watch.start()
        return watch

    def _settings_changed(self, value: bytes) -> None:
        try:
            config = decode(value, LoadBalancingConfig)
        except DecodeError as exc:
            self.ctx.unreadable("load-balancing settings", exc, "keeping those in force")
            return
        if self.ctx.lease.still_leader() or config == self.config:
            return  # the leader's own writes come into force as stored (`_stored`)
        self._requested = config
        self._in_force(config)

    def _share(self, client_id: str, gateway_id: str | None) -> None:
        """Tells the other replicas (the `sticky` bucket) a client's gateway, without
        waiting; a write that fails is logged, and made again at the client's next change
        or refresh."""
        key = bucket_key(client_id)
        if gateway_id is None:
            written: Future[Any] = self._sticky.delete_soon(key)
        else:
            written = self._sticky.put_soon(key, StickyAssignment(gateway_id=gateway_id))
        written.add_done_callback(self._shared)

    def _shared(self, written: Future[Any]) -> None:
        """A sticky client's write ended (on the API lane's loop)."""
        error = None if written.cancelled() else written.exception()
        if error is not None:
            self._sticky_log("write", f"a sticky client not shared: {failure_reason(error)}")

    def _sticky_changed(self, change: _StickyChanged) -> None:
        if not self.lb.sticky.apply_stored(
            change.key, change.value, change.age_s, self.ctx.clock()
        ):
            self._sticky_log("read", f"sticky bucket: key {change.key[:80]!r} does not read")

    def _sticky_log(self, kind: str, line: str) -> None:
        held = self._sticky_trouble.admit(kind)
        if held is not None:
            log.warning("%s%s", line, held_back(held))

    def _stored_config(self) -> LoadBalancingConfig | None:
        try:
            stored = self.ctx.buckets["settings"].get(SETTINGS_KEY, LoadBalancingConfig)
        except DecodeError as exc:
            self.ctx.unreadable("load-balancing settings", exc, "using the configured ones")
            return None
        if stored is not None:
            log.info(
                "load balancing from store: %s, threshold %.1f",
                stored.strategy,
                stored.health_threshold,
            )
        return stored

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        self._sticky_watch.stop()
        self._settings_watch.stop()
        if self.lb.log is not None:
            self.lb.log.flush()

    def handle(self, message: Any) -> Any:
        if type(message) is Request and message.endpoint is api.SELECT_GATEWAY:
            self._select(message.body, message.reply)  # the hot path, ahead of the match
            return None
        match message:
            case GatewayUpdated(snapshot=snapshot):
                self.lb.update(snapshot)
            case GatewayRemoved(gateway_id=gateway_id):
                self.lb.remove(gateway_id)
            case _StickyChanged():
                self._sticky_changed(message)
            case StickyOf(client_id=client_id):
                return self.lb.sticky.gateway(client_id, self.ctx.clock())
            case _FlushSelections():
                if self.lb.log is not None:
                    self.lb.log.flush()
            case Request(endpoint=api.LOAD_BALANCING_GET, reply=reply):
                self.replies.publish(reply, self.config)
            case Request(
                endpoint=api.LOAD_BALANCING_SET, body=LoadBalancingUpdate() as update, reply=reply
            ):
                self._set(update, reply)
            case _SettingsStored():
                self._stored(message)
            case _SettingsChanged(value=value):
                self._settings_changed(value)
            case Request(endpoint=api.GATEWAYS, body=GatewaysRequest() as request, reply=reply):
                try:
                    page = gateways_page(self.pool.gateways.values(), request)
                except BadCursor as exc:
                    reply_error(self.replies, reply, "bad_request", str(exc))
                else:
                    self.replies.publish(reply, page)
            case TableStats():
                table = self.pool.gateways
                healthy = sum(1 for row in table.values() if row.status == "healthy")
                return len(table), sum(row.heartbeats for row in table.values()), healthy
            case ReportTo(supervisor=supervisor):
                self.supervisor = supervisor
                supervisor.tell(LoadBalancingInForce(config=self.config))
            case FindReplacementFor(gateway_id=gateway_id, reply_to=reply_to):
                reply_to.tell(self._replacement(gateway_id))
            case HoldGateway(gateway_id=gateway_id):
                self.lb.hold(gateway_id)
            case ReleaseGateway(gateway_id=gateway_id):
                self.lb.release(gateway_id)
            case _:
                return super().handle(message)
        return None

    def _select(self, request: SelectRequest, reply: str) -> None:
        strategy = self.config.strategy
        choice = self.lb.choose(request)
        selection = choice.selection
        self.ctx.selections.add(strategy)
        waited_ns = self.ctx.runtime.service.waited_ns(reply)  # before the reply ends it
        self.replies.publish(
            reply,
            SelectReply(
                gateway_id=selection.gateway_id,
                strategy=strategy,
                reason=selection.reason,
                selection_id=choice.selection_id,
            ),
        )
        if waited_ns is not None:
            self.ctx.selection_latency.observe(strategy, waited_ns / 1e9)
        self.lb.commit(choice)  # the client has its answer: now the audit record

    def _replacement(self, gateway_id: str) -> ReplacementFound:
        failed = self.pool.gateways.get(gateway_id)
        if failed is None:
            return ReplacementFound(gateway_id=gateway_id, to=None, reason="unknown gateway")
        choice = self.lb.replacement(failed)
        return ReplacementFound(gateway_id=gateway_id, to=choice.gateway_id, reason=choice.reason)

    def _set(self, update: LoadBalancingUpdate, reply: str) -> None:
        """Stores the new settings without waiting; they are in force (and the reply
        sent) once stored (`_stored`). Settings asked for meanwhile build on these, and
        are written after them."""
        old = self._requested
        new = LoadBalancingConfig(
            strategy=update.strategy or old.strategy,
            health_threshold=(
                old.health_threshold if update.health_threshold is None else update.health_threshold
            ),
        )
        if new == old and not self._storing:
            self.replies.publish(reply, new)
            return
        self._requested = new
        self._storing.append((new, reply))
        if len(self._storing) == 1:
            self._write_next()

    def _write_next(self) -> None:
        """Starts the first write waiting, fenced: a compare-and-set on the revision this
        replica wrote last in this tenure (a stale leader's is refused)."""
        config, reply = self._storing[0]
        epoch, known = self.ctx.lease.view.epoch, self._settings_at
        last = known[1] if known is not None and known[0] == epoch else None
        ref = self.actor_ref
        written = self.ctx.buckets["settings"].update_soon(SETTINGS_KEY, config, last)

        def done(written: Future[int]) -> None:
            error = written.exception()
            revision = None if error is not None else written.result()
            safe_tell(ref, _SettingsStored(config, reply, epoch, revision, error))

        written.add_done_callback(done)

    def _stored(self, stored: _SettingsStored) -> None:
        self._storing.popleft()
        if isinstance(stored.error, WrongRevision):
            self._fenced(stored.error, stored.reply, stored.epoch)
            return
        self._settings_at = None if stored.revision is None else (stored.epoch, stored.revision)
        if self._storing:
            self._write_next()
        if stored.error is not None:
            error_id = f"err-{uuid.uuid4().hex[:12]}"
            log.error(
                "load-balancing settings not stored (error id %s): %r", error_id, stored.error
            )
            if not self._storing:
                self._requested = self.config
            reply_error(self.replies, stored.reply, "internal", f"internal error, id {error_id}")
            return
        if stored.config != self.config:
            self._in_force(stored.config)
        self.replies.publish(stored.reply, stored.config)

    def _fenced(self, refused: WrongRevision, reply: str, epoch: int | None) -> None:
        """Another replica has written the settings since this one did: it leads now.
        This replica steps down (unless it leads in a newer tenure than the write's
        already); the writes asked of it are answered as a standby answers them (the
        client's retry reaches the leader), and the settings stored are read again (a
        leader ignores the watch: what it writes comes into force as stored). `epoch`:
        the tenure the refused write was made in."""
        why = str(Fenced(refused.bucket, refused.key))
        self.ctx.lease.step_down(why=why, epoch=epoch)
        for waiting in [reply, *(r for _, r in self._storing)]:
            reply_error(self.replies, waiting, "unavailable", NOT_LEADING, RETRY_AFTER_MS)
        self._storing.clear()
        self._requested = self.config
        self._settings_at = None
        self._settings_watch.stop()
        self._settings_watch = self._watch_settings()

    def _in_force(self, new: LoadBalancingConfig) -> None:
        old = self.config
        self.lb.set_config(new)
        self.ctx.emit(
            LoadBalancingChanged(
                old_strategy=old.strategy,
                new_strategy=new.strategy,
                old_threshold=old.health_threshold,
                new_threshold=new.health_threshold,
            )
        )
        if self.supervisor is not None:
            self.supervisor.tell(LoadBalancingInForce(config=new))


@dataclass(frozen=True, slots=True)
class _SettingsChanged:
    """The stored load-balancing settings, as the bucket's watch told them."""

    value: bytes


@dataclass(frozen=True, slots=True)
class _SettingsStored:
    """A settings write ended (told by the write's own callback): `error` None if stored."""

    config: LoadBalancingConfig
    reply: str
    epoch: int | None  # the tenure it was written in
    revision: int | None  # its revision, once stored
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class StickyOf:
    """Asked by tests: the client's gateway as this replica knows it (None: none)."""

    client_id: str


@dataclass(frozen=True, slots=True)
class _StickyChanged:
    """A sticky client's value in the bucket (None: deleted), written `age_s` ago."""

    key: str
    value: bytes | None
    age_s: float


@dataclass(frozen=True, slots=True)
class _FlushSelections:
    """The audit batch is due (told by a timer): emit it."""
