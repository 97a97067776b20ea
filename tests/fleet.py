"""Test helpers: gateway agents on the test bus's loop, and API calls from a test thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from bus.runtime import Bus, Inbound
from gatefleet.gateway import GatewayAgent, Metrics
from schemas.api import Empty, GatewaySnapshot, GatewaysReply, StatusReply
from schemas.codec import decode
from schemas.wire import Heartbeat

T = TypeVar("T", bound=msgspec.Struct)

IDLE = Metrics(
    cpu_percent=5.0,
    memory_percent=20.0,
    active_connections=10,
    max_connections=1000,
    latency_ms=5.0,
)
BUSY = Metrics(
    cpu_percent=95.0,
    memory_percent=95.0,
    active_connections=900,
    max_connections=1000,
    latency_ms=5.0,
)


class MutableMetrics:
    """A metrics source a test can change while the agent beats."""

    def __init__(self, metrics: Metrics = IDLE) -> None:
        self.metrics = metrics

    def __call__(self) -> Metrics:
        return self.metrics


class Fleet:
    """Agents sharing the test bus's connection, started and stopped from test threads."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        self.bus = bus
        self.prefix = prefix
        self.agents: dict[str, GatewayAgent] = {}

    def add(
        self,
        gateway_id: str,
        region: str = "us-west",
        *,
        interval_s: float = 0.1,
        metrics: Callable[[], Metrics] | None = None,
        **kwargs: Any,
    ) -> GatewayAgent:
        agent = GatewayAgent(
            self.bus.nc,
            gateway_id,
            region,
            prefix=self.prefix,
            interval_s=interval_s,
            metrics=metrics or MutableMetrics(),
            **kwargs,
        )
        self.bus.run(agent.start())
        self.agents[gateway_id] = agent
        return agent

    def stop(self, gateway_id: str, *, goodbye: bool = True) -> None:
        self.bus.run(self.agents.pop(gateway_id).stop(goodbye=goodbye))

    def close(self) -> None:
        for gateway_id in list(self.agents):
            self.stop(gateway_id, goodbye=False)

    def call(self, name: str, body: msgspec.Struct | bytes, kind: type[T]) -> T:
        return decode(self.bus.ask(f"{self.prefix}.api.{name}", body, 5.0), kind)

    def raw_call(self, name: str, body: bytes) -> dict[str, Any]:
        data = self.bus.ask(f"{self.prefix}.api.{name}", body, 5.0)
        result: dict[str, Any] = msgspec.json.decode(data)
        return result

    def gateways(self) -> dict[str, GatewaySnapshot]:
        reply = self.call("gateways", Empty(), GatewaysReply)
        return {g.gateway_id: g for g in reply.gateways}

    def status(self) -> StatusReply:
        return self.call("status", Empty(), StatusReply)

    def publish_raw(self, subject: str, data: bytes) -> None:
        self.bus.publish(subject, data)

    def beat_once(
        self, gateway_ids: Iterable[str], region: str = "us-west", metrics: Metrics = IDLE
    ) -> None:
        """One heartbeat per id, no agent: the cheap way to register many gateways (they
        go down after `fall` intervals unless the test's heartbeat interval is long)."""
        for gateway_id in gateway_ids:
            beat = Heartbeat(
                gateway_id=gateway_id,
                region=region,
                seq=1,
                ts=datetime.now(UTC),
                cpu_percent=metrics.cpu_percent,
                memory_percent=metrics.memory_percent,
                active_connections=metrics.active_connections,
                max_connections=metrics.max_connections,
                latency_ms=metrics.latency_ms,
            )
            self.bus.publish(f"{self.prefix}.gw.{gateway_id}.heartbeat", beat)


class ArrivalClock:
    """Records when messages on a subject arrive (receiver's clock), e.g. heartbeats."""

    def __init__(self, bus: Bus, subject: str) -> None:
        self.last: float | None = None
        self.count = 0
        self._lock = threading.Lock()
        bus.subscribe(subject, self._on_message)

    def _on_message(self, _msg: Inbound) -> None:
        with self._lock:
            self.last = time.monotonic()
            self.count += 1
