"""Shared fixtures: one real nats-server per test session, and orchestrators on it; a
three-node cluster for the tests that need one.

Every orchestrator test gets its own subject prefix (so its own stream and buckets) on
the shared server: tests cannot see each other's traffic. Actors are swept after each
test so a forgotten one fails loudly instead of hanging the interpreter.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pykka
import pytest

from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from schemas.events import Event, decode_event
from schemas.settings import Settings
from tests.cluster import NatsCluster
from tests.fleet import Fleet

E = TypeVar("E")

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"), port=0)
    server.start()
    # Identity check: the server we connect to is the one we started, not someone's 4222.
    bus = Bus(server.url, use_uvloop=False)
    bus.start()
    try:
        assert bus.server_name == server.server_name, (bus.server_name, server.server_name)
    finally:
        bus.stop()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A three-node nats-server cluster of its own per test (tests kill its nodes)."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def prefix() -> str:
    """A subject prefix no other test uses."""
    return f"t{next(_prefixes)}"


@pytest.fixture
def bus(nats_server: EmbeddedServer) -> Iterator[Bus]:
    bus = Bus(nats_server.url)
    bus.start()
    yield bus
    bus.stop()


@pytest.fixture
def fleet(bus: Bus, prefix: str) -> Iterator[Fleet]:
    """Gateway agents on the test bus, stopped (without goodbye) after the test."""
    fleet = Fleet(bus, prefix)
    yield fleet
    fleet.close()


@pytest.fixture
def client(nats_server: EmbeddedServer, prefix: str) -> Iterator[GatefleetClient]:
    """The Python client, on the test server and this test's prefix."""
    with GatefleetClient(nats_server.url, prefix=prefix) as client:
        yield client


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(nats_server: EmbeddedServer, prefix: str, tmp_path: Path) -> SettingsFactory:
    """Settings on the test server with this test's prefix; keyword sections override."""

    def make(**sections: dict[str, Any]) -> Settings:
        raw: dict[str, Any] = {
            "bus": {"url": nats_server.url, "subject_prefix": prefix, "data_dir": str(tmp_path)},
            "health": {"probe_interval_ms": 0},
            # Each test's stream reserves this much of the shared server's storage.
            "audit": {"max_bytes": 16 * 1024 * 1024},
        }
        for name, values in sections.items():
            if isinstance(values, dict):
                raw.setdefault(name, {}).update(values)
            else:
                raw[name] = values
        return msgspec.convert(raw, Settings)

    return make


@pytest.fixture
def start_orchestrator() -> Iterator[Callable[[Settings], Orchestrator]]:
    started: list[Orchestrator] = []

    def start(settings: Settings) -> Orchestrator:
        orchestrator = Orchestrator(settings)
        orchestrator.start()
        started.append(orchestrator)
        return orchestrator

    yield start
    for orchestrator in reversed(started):
        orchestrator.stop()
    assert not pykka.ActorRegistry.get_all(), "the orchestrator left actors running"


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """pykka threads are not daemons: whatever a test started is stopped here."""
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=5)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


class EventLog:
    """Collects every event published under a prefix; tests wait on it, never sleep."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[Event] = []

    def add(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def mark(self) -> int:
        """A position in the log: pass it as `since` to wait only for later events."""
        with self._cond:
            return len(self.events)

    def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float = 5.0, since: int = 0
    ) -> Event:
        """The first event after `since` (already seen or arriving) matching `predicate`."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    types = [e.type for e in self.events[-20:]]
                    raise AssertionError(f"no matching event within {timeout}s; last: {types}")
                self._cond.wait(left)

    def of_type(self, kind: type[E]) -> list[E]:
        with self._cond:
            return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def event_log(bus: Bus, prefix: str) -> EventLog:
    log = EventLog()

    def on_event(msg: Inbound) -> None:
        log.add(decode_event(msg.data))

    bus.subscribe(f"{prefix}.events.>", on_event)
    return log


def wait_until(
    condition: Callable[[], bool],
    timeout: float = 5.0,
    what: str = "condition",
    show: Callable[[], object] | None = None,
) -> None:
    """For state with no event to wait on (e.g. a reply): re-checks until true or timeout.

    `show()` describes the state in the failure message."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            seen = f"; last seen: {show()}" if show else ""
            raise AssertionError(f"{what} not met within {timeout}s{seen}")
        time.sleep(0.01)
