"""Runtime: where actors run, and the shared machinery of time on the bus loop.

- Dispatchers (actors/dispatch.py): `gateways`, a pool of worker threads that runs every
  GatewayActor's inbox; `workers`, a pool for DistributionActors (they block on key-value
  writes, so they stay off the gateways' pool); and one `OwnThread` per singleton (load
  balancer, distributor, supervisor), whose blocking start-up and key-value work then
  delays nobody else. An actor picks one with its `dispatch` class attribute.
- `timers`: the coalesced timer wheel on the bus loop (bus/timers.py): scheduling a timer
  from an actor costs a deque append, not a wake-up of the loop.
- `awareness`: local health awareness (bus/awareness.py): whether gatefleet could see
  heartbeats just now (connected, loop not lagging), and from when misses count again.
- `api_bus`: a second NATS connection, on a loop of its own, that the request
  endpoints are served on: the API lane.
- `service`: the API lane as a NATS micro service (bus/micro.py): answers `$SRV` and
  counts each endpoint's requests, errors and processing time.
- `jetstream`: whether JetStream answers, asked every 5 s (for `status` and /healthz).
- `prober`: latency probes of every gateway over one reply inbox (bus/probes.py), sent
  by the leading replica only, whose results it shares with the others
  (bus/probe_sharing.py); None when `health.probe_interval_ms` is 0.

Start: `start()` after the bus is connected; stop: `stop()` after every actor has stopped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from actors.dispatch import Dispatcher, OnLoop, OwnThread, Pool
from bus.awareness import LocalAwareness, watch
from bus.jetstream import JetStreamWatch
from bus.leadership import Lease, replica_metadata
from bus.micro import MicroService
from bus.probe_sharing import ProbeSharing
from bus.probes import Prober
from bus.runtime import Bus
from bus.subjects import Subjects
from bus.timers import TimerWheel
from schemas.settings import HealthSettings

# Worker threads running gateway actors. Their handlers are pure computation under the
# GIL: at 10,000 gateways one worker, two, or the bus loop itself all came to about 0.95
# of a core (`python -m bench fleet`); two let one turn start while the other waits.
GATEWAY_WORKERS = 2
DISTRIBUTION_WORKERS = 2


@dataclass
class Runtime:
    bus: Bus
    # The API lane: `P.api.*` requests arrive on a connection (and loop) of their own, so
    # they are never read behind a backlog of heartbeats on the main connection.
    api_bus: Bus
    service: MicroService
    gateways: Pool
    workers: Pool
    api: OnLoop
    timers: TimerWheel
    awareness: LocalAwareness
    prober: Prober | None
    jetstream: JetStreamWatch
    _own: dict[str, OwnThread] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(
        cls,
        bus: Bus,
        subjects: Subjects,
        health: HealthSettings,
        lease: Lease,
    ) -> Runtime:
        timers = TimerWheel(bus.loop)
        timers.start()
        interval_s = health.heartbeat_interval_ms / 1000
        awareness = watch(
            bus,
            timers,
            heartbeat_interval_s=interval_s,
            lag_threshold_s=interval_s * health.lag_suspend_share,
            reconnect_grace_s=health.reconnect_grace_ms / 1000,
        )
        prober = None
        if health.probe_interval_ms:
            interval = health.probe_interval_ms / 1000
            timeout = min(health.probe_timeout_ms / 1000, interval)
            prober = Prober(
                bus,
                timers,
                subjects,
                interval_s=interval,
                timeout_s=timeout,
                lag=awareness.lag_s,
                leading=lease.still_leader,
                sharing=ProbeSharing(bus, timers, subjects, lease),
            )
            prober.start()
        gateways = Pool("gateway-actors", workers=GATEWAY_WORKERS, loop=bus.loop)
        workers = Pool("distribution-actors", workers=DISTRIBUTION_WORKERS)
        gateways.start()
        workers.start()
        api_bus = Bus(bus.url, name=f"{bus.name}-api", auth=bus.auth)
        api_bus.start()
        service = MicroService(subjects)
        service.describe = lambda: replica_metadata(lease)
        service.start(api_bus)
        api = OnLoop(api_bus.loop, "api-loop")
        api.start()
        jetstream = JetStreamWatch(bus)
        jetstream.start(timers.schedule)
        return cls(
            bus, api_bus, service, gateways, workers, api, timers, awareness, prober, jetstream
        )

    def dispatcher(self, dispatch: str, name: str) -> Dispatcher:
        """The dispatcher for an actor's `dispatch` kind; "own" is a thread per `name`."""
        if dispatch == "gateways":
            return self.gateways
        if dispatch == "workers":
            return self.workers
        if dispatch == "api":
            return self.api
        with self._lock:
            own = self._own.get(name)
            if own is None or not own.running:
                own = self._own[name] = OwnThread(name)
                own.start()
            return own

    def stop(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        for dispatcher in (self.gateways, self.workers, self.api, *self._own.values()):
            dispatcher.stop()
        self.timers.stop()
        self.api_bus.stop()
