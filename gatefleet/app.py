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
from types import TracebackType
from typing import Any, TypeVar

import pykka

from actors.base import PING
from actors.context import Context
from actors.distributor import DistributorActor
from actors.load_balancer import LoadBalancerActor
from actors.messages import ReportTo
from actors.routes import GatewayRoutes
from actors.runtime import Runtime
from actors.supervisor import SupervisorActor
from bus.edge import Drops
from bus.jetstream import JetStream
from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from gatefleet.config import URL_FILE, resolve_data_dir
from schemas.settings import Settings

log = logging.getLogger(__name__)
A = TypeVar("A", bound=pykka.Actor)


class Orchestrator:
    """The running gatefleet: a bus, its durable state and the actors."""

    def __init__(self, settings: Settings, *, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.data_dir = resolve_data_dir(settings, os.environ if env is None else env)
        self.subjects = Subjects(settings.bus.subject_prefix)
        self.drops = Drops()
        self.server: EmbeddedServer | None = None
        self.bus: Bus | None = None
        self.runtime: Runtime | None = None
        self._actors: list[pykka.ActorRef[Any]] = []
        self.url = settings.bus.url

    def start(self) -> str:
        """Starts everything; on any failure stops what did start and re-raises."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _start(self) -> None:
        if not self.url:
            self.server = EmbeddedServer(self.data_dir, port=self.settings.bus.port)
            self.url = self.server.start()
            (self.data_dir / URL_FILE).write_text(self.url + "\n")
        self.bus = Bus(self.url)
        self.bus.start()
        jetstream = JetStream(self.bus, self.subjects)
        audit = self.settings.audit
        jetstream.setup(max_age_s=audit.max_age_hours * 3600, max_bytes=audit.max_bytes)
        self.runtime = Runtime.start(self.bus, self.subjects, self.settings.health)
        context = Context(
            bus=self.bus,
            runtime=self.runtime,
            subjects=self.subjects,
            settings=self.settings,
            emit=jetstream.emit,
            drops=self.drops,
            buckets=jetstream.buckets,
        )
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
        # What start-up built lives as long as the process: keep it out of every collection.
        gc.freeze()

    def _started(self, ref: pykka.ActorRef[A]) -> pykka.ActorRef[A]:
        self._actors.append(ref)
        ref.ask(PING, timeout=10)
        return ref

    def stop(self) -> None:
        try:
            for ref in reversed(self._actors):
                ref.stop(timeout=10)
            self._actors.clear()
        finally:
            try:
                if self.runtime is not None:
                    self.runtime.stop()
                    self.runtime = None
                if self.bus is not None:
                    self.bus.stop()
                    self.bus = None
            finally:
                if self.server is not None:
                    self.server.stop()
                    (self.data_dir / URL_FILE).unlink(missing_ok=True)
                    self.server = None
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
