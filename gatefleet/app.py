"""Process wiring: start-up and shut-down of the whole orchestrator, in one place.

Start: embedded nats-server (when no URL is configured) -> bus -> JetStream -> actors
(load balancer, distributor, then the supervisor, which spawns the gateway actors and
opens the gateway routes) -> a ping barrier. Every actor gets its collaborators here, as
named fields. Stop: the same in reverse inside `finally`, then a sweep that loudly stops
any actor still alive.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import pykka

from actors.base import PING, safe_tell
from actors.context import Context
from actors.distributor import DistributorActor
from actors.load_balancer import LoadBalancerActor
from actors.messages import Leading, ReportTo
from actors.routes import GatewayRoutes
from actors.runtime import Runtime
from actors.supervisor import SupervisorActor
from bus.connection import ClientAuth
from bus.edge import Drops, Tally
from bus.jetstream import JetStream, KvStore
from bus.leadership import Lease, LeaseTerms, LeaseView
from bus.lease import LeaseKeeper, lease_bucket
from bus.outbox import EventOutbox, unclean_stop_gap
from bus.runtime import Bus
from bus.server import EmbeddedServer, ServerError
from bus.subjects import Subjects
from gatefleet import replica_config
from gatefleet.config import URL_FILE, resolve_data_dir, resolve_replica_id
from gatefleet.security.access import own_auth, server_tls
from gatefleet.security.authority import Authority
from gatefleet.security.violations import ViolationWatch
from schemas.events import Event, OrchestratorLeader
from schemas.settings import Settings

log = logging.getLogger(__name__)
A = TypeVar("A", bound=pykka.Actor)

# An embedded server that dies is started again, but not more often than this.
SERVER_RESTARTS = 3
SERVER_RESTART_WINDOW_S = 300.0
# How long start waits to learn who leads. A leader is known at the lease's first read
# (a live one, or a dead one's, which is then waited out in the background, as a
# standby), and a lone replica takes a free lease in a few ms: this bounds only a slow
# JetStream, and must outlast a loaded machine's first read and write (2 s did not: an
# upgraded store was then migrated after start returned, by the late leader).
FIRST_LEADER_WAIT_S = 10.0
# Orchestrators of this process not stopped yet: the last to stop sweeps leftover actors.
_RUNNING: set[Orchestrator] = set()
# The events only the leading replica records (by type prefix).
LEADER_EVENTS = ("gateway.", "ha.", "distribution.")


class Orchestrator:
    """The running gatefleet: a bus, its durable state and the actors."""

    def __init__(
        self,
        settings: Settings,
        *,
        env: dict[str, str] | None = None,
        on_fatal: Callable[[str], object] | None = None,
    ) -> None:
        self.settings = settings
        # Told why, once, when gatefleet cannot go on (its embedded server keeps dying).
        self.on_fatal = on_fatal
        self._server_deaths: deque[float] = deque()
        self._deaths: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.data_dir = resolve_data_dir(settings, os.environ if env is None else env)
        self.subjects = Subjects(settings.bus.subject_prefix)
        self.drops = Drops()
        self.violations = Tally()
        self.server: EmbeddedServer | None = None
        self.bus: Bus | None = None
        self.runtime: Runtime | None = None
        self.events: EventOutbox | None = None
        self._actors: list[pykka.ActorRef[Any]] = []
        self.url = settings.bus.url
        # The keys and credentials of the embedded server when it runs with auth.
        self.authority: Authority | None = None
        # What gatefleet's own connections (this bus, the HTTP API's) prove who they are with.
        self.client_auth = ClientAuth()
        # Which replica leads (issue 16): made at start, once the bus is up.
        self.lease = Lease(
            resolve_replica_id(settings), LeaseTerms(settings.cluster.lease_ms / 1000)
        )
        self._lease_keeper: LeaseKeeper | None = None
        self._stopping = False

    def start(self) -> str:
        """Starts everything; on any failure stops what did start and re-raises."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _start(self) -> None:
        _RUNNING.add(self)
        if not self.url:
            if self.settings.bus.auth:
                self.authority = Authority(self.data_dir)
            self.server = EmbeddedServer(
                self.data_dir,
                port=self.settings.bus.port,
                host=self.settings.bus.listen,
                auth=self.authority.server_auth() if self.authority else None,
                tls=server_tls(self.settings, self.data_dir),
                on_exit=self._server_died,
            )
            watchdog = threading.Thread(
                target=self._watch_server, name="gatefleet-server-watchdog", daemon=True
            )
            watchdog.start()
            self.url = self.server.start()
            (self.data_dir / URL_FILE).write_text(self.url + "\n")
        self.client_auth = own_auth(self.settings, self.data_dir)
        self.bus = Bus(self.url, auth=self.client_auth)
        self.bus.start()
        jetstream = JetStream(self.bus, self.subjects)
        audit = self.settings.audit
        jetstream.setup(
            max_age_s=audit.max_age_hours * 3600,
            max_bytes=audit.max_bytes,
            replicas=self.settings.bus.replicas,
            kv_retries=self.settings.orchestrator.kv_write_retries,
            kv_backoff_s=self.settings.orchestrator.kv_write_backoff_ms / 1000,
            sticky_ttl_s=self.settings.load_balancing.sticky_ttl_s,
        )
        events = EventOutbox(self.bus, self.subjects, retry_for_s=audit.event_retry_ms / 1000)
        events.start()
        self.events = events  # from here on, a stop flushes it
        self.runtime = Runtime.start(self.bus, self.subjects, self.settings.health, self.lease)
        self._start_lease(self.runtime.api_bus)
        self._check_last_run(jetstream, events)
        self._agree_with_leader(jetstream.buckets["settings"])
        context = Context(
            bus=self.bus,
            runtime=self.runtime,
            subjects=self.subjects,
            settings=self.settings,
            emit=self._leader_filter(events.emit),
            emit_stored=events.emit,
            events_lost=lambda: events.lost,
            drops=self.drops,
            buckets=jetstream.buckets,
            violations=self.violations,
            test_credentials=self.authority.test_credentials if self.authority else list,
            lease=self.lease,
        )
        if self.server is not None and self.authority is not None:
            self.server.on_violation = ViolationWatch(self.authority, events.emit, self.violations)
        # Each actor has finished on_start (loaded its state, subscribed) once it answers a
        # ping: started one after the other, so the order below is the order of their work.
        load_balancer = self._started(LoadBalancerActor.start(context))
        # Before the supervisor, so it hears of every gateway the supervisor spawns.
        distributor = self._started(DistributorActor.start(context))
        routes = GatewayRoutes(
            self.bus, self.subjects, self.drops, context.shed, self.runtime.awareness
        )
        supervisor = self._started(
            SupervisorActor.start(
                context, load_balancer=load_balancer, distributor=distributor, routes=routes
            )
        )
        # What the status reply reports, from the actors that own it.
        load_balancer.tell(ReportTo(supervisor=supervisor))
        distributor.tell(ReportTo(supervisor=supervisor))
        # Only the leader distributes: the distributor hears each change of role (and the
        # role now, in case it changed while the distributor started).
        lease = self.lease
        lease.on_change(lambda view: safe_tell(distributor, Leading.of(view)))
        safe_tell(distributor, Leading.of(lease.view))
        self._report_leadership(context.emit)  # orchestrator.started told the first view
        # What start-up built lives as long as the process: keep it out of every collection.
        gc.freeze()

    def _start_lease(self, bus: Bus) -> None:
        """Joins the replicas: keeps the leader lease going on `bus` (the API lane's,
        which heartbeats never crowd: a renewal stuck behind them would cost the lead),
        and waits (briefly) to know who leads, so that a lone replica acts as leader from
        its first message."""
        lease = self.lease
        known = threading.Event()
        lease.on_change(lambda view: known.set() if view.leader is not None else None)
        bucket = lease_bucket(bus, self.subjects.prefix, self.settings.bus.replicas)
        self._lease_keeper = LeaseKeeper(bus, bucket, lease)
        self._lease_keeper.start()
        if not known.wait(FIRST_LEADER_WAIT_S):
            log.info("replica %s: no leader known yet; acting as a standby", lease.replica_id)

    def _leader_filter(self, emit: Callable[[Event], None]) -> Callable[[Event], None]:
        """One voice per fact: of what every replica sees, only the leader records the
        gateway.*, ha.* and distribution.* events, so the audit trail holds each once."""
        still_leader = self.lease.still_leader

        def leader_only(event: Event) -> None:
            if event.type.startswith(LEADER_EVENTS) and not still_leader():
                return
            emit(event)

        return leader_only

    def _report_leadership(self, emit: Callable[[Event], None]) -> None:
        """An `orchestrator.leader` event at each change of this replica's view."""
        lease = self.lease

        def report(view: LeaseView) -> None:
            if self._stopping:
                return  # its release at a stop: the next leader's take-over tells
            log.info(
                "replica %s is %s (leader %s, epoch %s)",
                lease.replica_id,
                view.role,
                view.leader or "unknown",
                view.epoch,
            )
            emit(
                OrchestratorLeader(
                    replica_id=lease.replica_id,
                    role=view.role,
                    leader=view.leader,
                    epoch=view.epoch,
                )
            )

        lease.on_change(report)

    def _agree_with_leader(self, bucket: KvStore) -> None:
        """The leader publishes its deciding settings; a standby compares its own at start."""
        lease, settings = self.lease, self.settings

        def on_change(view: LeaseView) -> None:
            if view.role == "leader":
                replica_config.publish(bucket, lease.replica_id, settings)

        lease.on_change(on_change)
        view = lease.view
        if view.role == "leader":
            replica_config.publish(bucket, lease.replica_id, settings)
        elif view.leader is not None:
            replica_config.compare_with_leader(bucket, view.leader, settings)

    def _check_last_run(self, jetstream: JetStream, events: EventOutbox) -> None:
        """Records an audit gap when the previous run did not stop cleanly: at once if
        this replica leads, else once it takes over a lease nobody renewed since it
        started (the holder was that run); a standby joining live replicas records none."""
        last = jetstream.last_event()
        gap = None if last is None else unclean_stop_gap(*last)
        if gap is None:
            return
        lease = self.lease

        def record() -> None:
            log.warning("%s; since %s", gap.reason, gap.since.isoformat())
            events.emit(gap)

        if lease.still_leader():
            record()
            return
        recorded = threading.Event()

        def on_change(view: LeaseView) -> None:
            if view.role == "leader" and lease.took_over_unrenewed and not recorded.is_set():
                recorded.set()
                record()

        lease.on_change(on_change)

    def _server_died(self, status: int | None) -> None:
        """The embedded nats-server ended on its own (called on its log reader's thread,
        which is about to end: the restart is the watchdog thread's, since a child dies
        with the thread that started it, PR_SET_PDEATHSIG)."""
        self._deaths.put(status)

    def _watch_server(self) -> None:
        """The watchdog thread: each death of the embedded server starts it again on the
        same port and store, at most SERVER_RESTARTS times in SERVER_RESTART_WINDOW_S;
        the bus reconnects by itself meanwhile."""
        while True:
            status = self._deaths.get()
            if self.server is None:  # stopped: nothing to watch any more
                return
            self._restart_server(status)

    def _restart_server(self, status: int | None) -> None:
        server, now = self.server, time.monotonic()
        if server is None:
            return
        deaths = self._server_deaths
        deaths.append(now)
        while deaths and now - deaths[0] > SERVER_RESTART_WINDOW_S:
            deaths.popleft()
        if len(deaths) > SERVER_RESTARTS:
            why = (
                f"the embedded nats-server died {len(deaths)} times in "
                f"{SERVER_RESTART_WINDOW_S / 60:g} minutes (last exit status {status}); giving up"
            )
            log.error("%s", why)
            if self.on_fatal is not None:
                self.on_fatal(why)
            return
        log.warning("embedded nats-server exited (status %s); starting it again", status)
        try:
            server.start()
        except ServerError as exc:
            log.error("the embedded nats-server did not start again: %s", exc)  # noqa: TRY400 - one line
            if self.on_fatal is not None:
                self.on_fatal(f"the embedded nats-server did not start again: {exc}")

    def _started(self, ref: pykka.ActorRef[A]) -> pykka.ActorRef[A]:
        self._actors.append(ref)
        ref.ask(PING, timeout=10)
        return ref

    def stop(self) -> None:
        self._stopping = True
        try:
            for ref in reversed(self._actors):
                ref.stop(timeout=10)
            self._actors.clear()
        finally:
            try:
                if self._lease_keeper is not None:
                    self._lease_keeper.stop()  # released: another replica leads at once
                    self._lease_keeper = None
                if self.runtime is not None:
                    self.runtime.stop()
                    self.runtime = None
                if self.events is not None:
                    self.events.close()
                    self.events = None
                if self.bus is not None:
                    self.bus.stop()
                    self.bus = None
            finally:
                if self.server is not None:
                    self.server.stop()
                    (self.data_dir / URL_FILE).unlink(missing_ok=True)
                    self.server = None
                    self._deaths.put(None)  # ends the watchdog
                _RUNNING.discard(self)
                if not _RUNNING:  # replicas in one process (tests) keep each other's
                    _sweep_actors()

    def __enter__(self) -> Orchestrator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _sweep_actors() -> None:
    leftovers = pykka.ActorRegistry.get_all()
    if leftovers:
        log.error("%d actors still alive after shutdown: %s", len(leftovers), leftovers)
        pykka.ActorRegistry.stop_all(block=True, timeout=5)
