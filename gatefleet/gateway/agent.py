"""The gateway side of the wire contract (PROTOCOL.md section 1), as a small asyncio library.

A `GatewayAgent` heartbeats on `P.gw.<id>.heartbeat`, answers `P.gw.<id>.ping` and
`P.gw.<id>.config`, and says goodbye on `P.gw.<id>.goodbye` when stopped. Many agents
can share one nats-py connection (`python -m bench distribution` runs a thousand that
way):

    nc = await connect(url)
    agent = GatewayAgent(nc, "edge-1", "us-west", metrics=read_metrics, on_config=apply)
    await agent.start()
    ...
    await agent.stop()            # goodbye; the shared connection stays open

or let the agent own its connection: `agent = await GatewayAgent.connect(url, ...)`,
with `creds="gw.creds"` on a bus with auth (see `gatefleet credentials gateway`).

Config pushes are idempotent on (distribution_id, version): the result of the first
application is remembered and sent again for a repeat, without calling `on_config`.
A push of a version lower than the one held for its config type is never applied (a
rollback comes as a new, higher version with older content): it is answered with a
NACK whose error is `stale_version` and whose `held_version` is the version held, which
tells gatefleet that its version counter is behind (it pushes again above it).
Fencing between gatefleet replicas: the agent keeps the highest `epoch` seen in a push
(`highest_epoch`, of every config type) and refuses a push with a lower one before
anything else, with a NACK whose error is `stale_epoch` and whose `held_epoch` is that
highest epoch: it came from a leader another replica has replaced. A push without an
epoch is not fenced.
A push that does not decode is logged and gets no answer. The fault-injection knobs
(`pause_heartbeats`, `ack_delay_s`, `pong_delay_s`, `fail_acks`, `silent_config`,
`crash`, `restart`)
exist for tests and benchmarks (the simulator, `gatefleet simulate`, is an engine of its
own: gatefleet/simulate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import CONNECT_ERRORS, ClientAuth, close_connection, open_connection
from bus.subjects import Subjects, check_gateway_id
from schemas.codec import DecodeError, decode, encode
from schemas.wire import (
    STALE_EPOCH,
    STALE_VERSION,
    ConfigAck,
    ConfigPush,
    Goodbye,
    Heartbeat,
    Pong,
)

log = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 4096  # ConfigAck.error's limit
_NATS_ERRORS = CONNECT_ERRORS


@dataclass(frozen=True, slots=True)
class Metrics:
    """One sample of a gateway's load, sent in its next heartbeat.

    Percentages are clamped to 0-100 and connections to >= 0, so a heartbeat is always valid.
    """

    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    active_connections: int = 0
    latency_ms: float | None = None
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class ConfigResult:
    """What applying a ConfigPush came to: `ConfigResult()` applied, `reject(text)` a NACK,
    `stale(held)` a NACK of a version lower than the one held, `stale_epoch(held)` one of
    an epoch lower than the highest seen."""

    ok: bool = True
    error: str | None = None
    held_version: int | None = None
    held_epoch: int | None = None

    @classmethod
    def reject(cls, error: str) -> ConfigResult:
        return cls(ok=False, error=error[:_MAX_ERROR_CHARS] or "rejected")

    @classmethod
    def stale(cls, held_version: int) -> ConfigResult:
        return cls(ok=False, error=STALE_VERSION, held_version=held_version)

    @classmethod
    def stale_epoch(cls, held_epoch: int) -> ConfigResult:
        return cls(ok=False, error=STALE_EPOCH, held_epoch=held_epoch)


ACCEPTED = ConfigResult()
# None counts as accepted, so a plain `def apply(push): ...` handler works.
ConfigHandler = Callable[[ConfigPush], Awaitable[ConfigResult | None] | ConfigResult | None]
MetricsSource = Callable[[], Metrics]


async def connect(
    url: str, *, name: str = "gatefleet-agent", connect_timeout_s: float = 10.0, **options: Any
) -> Client:
    """A nats-py connection for one agent or many to share (see bus.connection)."""
    return await open_connection(url, name=name, connect_timeout_s=connect_timeout_s, **options)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


class GatewayAgent:
    """One simulated or real gateway speaking the gatefleet wire protocol."""

    def __init__(
        self,
        nc: Client | str,
        gateway_id: str,
        region: str,
        *,
        prefix: str = "gatefleet",
        metrics: MetricsSource | None = None,
        interval_s: float = 1.0,
        role: Literal["primary", "backup"] | None = None,
        backup_for: str | None = None,
        labels: Mapping[str, str] | None = None,
        on_config: ConfigHandler | None = None,
        config_versions: Mapping[str, int] | None = None,
        received_limit: int = 1000,
        creds: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        """`nc` is a shared connection (left open by stop) or a URL (owned, closed by stop).

        An owned connection proves who it is with `creds`, the gateway's NATS `.creds`
        file (`gatefleet credentials gateway ID`), and checks the server with `tls_ca`."""
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if not 1 <= len(region) <= 64:
            raise ValueError("region must be 1-64 characters")
        self.gateway_id = check_gateway_id(gateway_id)
        if backup_for is not None:
            check_gateway_id(backup_for)
        self.region = region
        self.role = role
        self.backup_for = backup_for
        self.labels = dict(labels or {})
        self.interval_s = interval_s
        self.metrics = metrics or Metrics
        self.on_config = on_config
        self.config_versions: dict[str, int] = dict(config_versions or {})
        self.highest_epoch = 0  # of the pushes seen; 0: none carried one
        # (monotonic time, push) for every push that decoded, newest last.
        self.received: deque[tuple[float, ConfigPush]] = deque(maxlen=received_limit)
        # Fault injection.
        self.ack_delay_s = 0.0
        self.pong_delay_s = 0.0
        self.fail_acks = False
        self.silent_config = False

        self._url = nc if isinstance(nc, str) else None
        self._auth = ClientAuth(creds=creds or "", tls_ca=tls_ca or "")
        self._nc = None if isinstance(nc, str) else nc
        self._subjects = Subjects(prefix)
        self._seq = 0
        self._paused = False
        self._results: dict[tuple[str, int], ConfigResult] = {}
        self._subs: list[Subscription] = []
        self._beat_task: asyncio.Task[None] | None = None
        self.beats_sent = 0
        self.pings = 0  # received
        self.malformed_pushes = 0
        self.publish_errors = 0
        self._failing_since: int | None = None  # publish_errors when the current outage began

    @classmethod
    async def connect(cls, url: str, gateway_id: str, region: str, **kwargs: Any) -> GatewayAgent:
        """An agent on its own connection to `url`, started."""
        agent = cls(url, gateway_id, region, **kwargs)
        await agent.start()
        return agent

    # State -------------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The seq of the last heartbeat sent (0 before the first)."""
        return self._seq

    @property
    def running(self) -> bool:
        return self._beat_task is not None

    @property
    def connection(self) -> Client | None:
        return self._nc

    @property
    def heartbeats_paused(self) -> bool:
        return self._paused

    # Life cycle --------------------------------------------------------------------------

    async def start(self, *, initial_delay_s: float = 0.0, flush: bool = True) -> None:
        """Subscribes to ping and config, then beats (first beat after `initial_delay_s`).

        `flush=False` skips the round trip that confirms the subscriptions, for callers
        starting many agents on one connection who flush once themselves.
        """
        if self.running:
            return
        if self._nc is None:
            assert self._url is not None
            self._nc = await connect(
                self._url, name=f"gatefleet-agent-{self.gateway_id}", **self._auth.options()
            )
        nc = self._nc
        self._subs = [
            await nc.subscribe(self._subjects.ping(self.gateway_id), cb=self._on_ping),
            await nc.subscribe(self._subjects.config(self.gateway_id), cb=self._on_config),
        ]
        if flush:
            await nc.flush()
        self._beat_task = asyncio.get_running_loop().create_task(
            self._beat_loop(initial_delay_s), name=f"heartbeat-{self.gateway_id}"
        )

    async def stop(self, *, goodbye: bool = True, flush: bool = True) -> None:
        """Stops beating and answering, then publishes Goodbye unless `goodbye=False`."""
        if not self.running:
            return
        await self._halt()
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        if goodbye:
            await self._publish(
                self._subjects.goodbye(self.gateway_id), Goodbye(gateway_id=self.gateway_id)
            )
        if flush or self._url is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await nc.flush()
        await self._close_own_connection()

    async def crash(self) -> None:
        """Stops everything abruptly: no goodbye, and an owned connection is just dropped."""
        if self.running:
            await self._halt()
            await self._close_own_connection()

    async def restart(self, *, initial_delay_s: float = 0.0) -> None:
        """A new gateway process: crash (if running), then start again with seq from 1.

        Applied config versions, the highest epoch and remembered push results survive,
        as a gateway's applied configuration would on disk.
        """
        await self.crash()
        self._seq = 0
        self._paused = False
        await self.start(initial_delay_s=initial_delay_s)

    def pause_heartbeats(self) -> None:
        """Stops beating while still connected and answering ping and config."""
        self._paused = True

    def resume_heartbeats(self) -> None:
        self._paused = False

    async def _halt(self) -> None:
        task, self._beat_task = self._beat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()
        await asyncio.sleep(0)  # let the subscriptions' cancelled reader tasks finish

    async def _close_own_connection(self) -> None:
        if self._url is not None and self._nc is not None:
            nc, self._nc = self._nc, None
            await close_connection(nc)

    # Heartbeats --------------------------------------------------------------------------

    async def _beat_loop(self, initial_delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + max(initial_delay_s, 0.0)
        while True:
            await asyncio.sleep(max(due - loop.time(), 0.0))
            if not self._paused:
                await self._beat()
            due += self.interval_s
            if due < loop.time():  # fell behind (a stalled loop): skip, don't burst
                due = loop.time() + self.interval_s

    def heartbeat(self) -> Heartbeat | None:
        """The next heartbeat (takes a seq), or None when the metrics source fails."""
        try:
            m = self.metrics()
        except Exception:
            log.exception("metrics for %s failed; skipping a heartbeat", self.gateway_id)
            return None
        self._seq += 1
        return Heartbeat(
            gateway_id=self.gateway_id,
            region=self.region,
            seq=self._seq,
            ts=datetime.now(UTC),
            cpu_percent=_clamp(m.cpu_percent, 0.0, 100.0),
            memory_percent=_clamp(m.memory_percent, 0.0, 100.0),
            active_connections=max(int(m.active_connections), 0),
            latency_ms=None if m.latency_ms is None else max(m.latency_ms, 0.0),
            max_connections=m.max_connections,
            role=self.role,
            backup_for=self.backup_for,
            config_versions=dict(self.config_versions),
            labels=self.labels,
        )

    async def _beat(self) -> None:
        beat = self.heartbeat()
        if beat is not None and await self._publish(
            self._subjects.heartbeat(self.gateway_id), beat
        ):
            self.beats_sent += 1

    async def _publish(self, subject: str, body: Any) -> bool:
        """Publishes, tolerating a connection that is down: logs once per outage."""
        nc = self._nc
        try:
            if nc is None:
                raise nats.errors.ConnectionClosedError
            await nc.publish(subject, encode(body))
        except _NATS_ERRORS as exc:
            self.publish_errors += 1
            if self._failing_since is None:
                self._failing_since = self.publish_errors - 1
                log.warning("%s: publish to %s failed: %r", self.gateway_id, subject, exc)
            return False
        if self._failing_since is not None:
            lost = self.publish_errors - self._failing_since
            log.info("%s: publishing again after %d failed publishes", self.gateway_id, lost)
            self._failing_since = None
        return True

    # Requests ----------------------------------------------------------------------------

    async def _reply(self, msg: Msg, body: Any) -> None:
        if msg.reply:
            await self._publish(msg.reply, body)

    async def _on_ping(self, msg: Msg) -> None:
        self.pings += 1
        if self.pong_delay_s > 0:
            await asyncio.sleep(self.pong_delay_s)
        await self._reply(msg, Pong(gateway_id=self.gateway_id))

    async def _on_config(self, msg: Msg) -> None:
        try:
            push = decode(msg.data, ConfigPush)
        except DecodeError as exc:
            self.malformed_pushes += 1
            log.warning("%s: malformed config push dropped: %s", self.gateway_id, exc)
            return
        self.received.append((time.monotonic(), push))
        if self.silent_config:
            return
        result = await self._apply(push)
        if self.ack_delay_s > 0:
            await asyncio.sleep(self.ack_delay_s)
        ack = ConfigAck(
            distribution_id=push.distribution_id,
            gateway_id=self.gateway_id,
            ok=result.ok,
            version=push.version,
            error=None if result.ok else result.error,
            held_version=result.held_version,
            held_epoch=result.held_epoch,
        )
        await self._reply(msg, ack)

    async def _apply(self, push: ConfigPush) -> ConfigResult:
        if self.fail_acks:  # injected, so not remembered: clearing the fault heals a retry
            return ConfigResult.reject("injected failure (fail_acks)")
        if push.epoch is not None:
            if push.epoch < self.highest_epoch:  # from a replaced leader: nothing of it
                log.warning(
                    "%s: %s v%d refused: epoch %d is below %d",
                    self.gateway_id,
                    push.config_type,
                    push.version,
                    push.epoch,
                    self.highest_epoch,
                )
                return ConfigResult.stale_epoch(self.highest_epoch)
            self.highest_epoch = push.epoch
        key = (push.distribution_id, push.version)
        known = self._results.get(key)
        if known is not None:
            return known
        held = self.config_versions.get(push.config_type, 0)
        if push.version < held:  # not remembered: what is held only grows
            log.warning(
                "%s: %s v%d refused: version %d is held",
                self.gateway_id,
                push.config_type,
                push.version,
                held,
            )
            return ConfigResult.stale(held)
        result = await self._call_handler(push)
        self._results[key] = result
        if result.ok and push.version > self.config_versions.get(push.config_type, 0):
            self.config_versions[push.config_type] = push.version
        return result

    async def _call_handler(self, push: ConfigPush) -> ConfigResult:
        if self.on_config is None:
            return ACCEPTED
        try:
            outcome = self.on_config(push)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        except Exception as exc:
            log.exception("%s: on_config failed for %s", self.gateway_id, push.distribution_id)
            return ConfigResult.reject(f"{type(exc).__name__}: {exc}")
        return ACCEPTED if outcome is None else outcome
