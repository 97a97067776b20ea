"""A bucket's watch (bus/kv_watch.py) against a real nats-server: current values first,
then every change in order, and it outlives a server restart."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.jetstream import JetStream, KvStore
from bus.kv_watch import KvWatch
from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from schemas.stored import StickyAssignment
from tests.conftest import wait_until

Change = tuple[str, str | None]  # key, gateway (None: deleted)


class Changes:
    """What a watch told, for tests to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seen: list[Change] = []
        self.ages: list[float] = []

    def on_change(self, key: str, value: bytes | None, age_s: float) -> None:
        gateway = None if value is None else value.decode()
        with self._cond:
            self.seen.append((key, gateway))
            self.ages.append(age_s)
            self._cond.notify_all()

    def keys(self) -> set[str]:
        with self._cond:
            return {key for key, _ in self.seen}

    def wait_for(self, change: Change, timeout: float = 5.0) -> None:
        with self._cond:
            told = self._cond.wait_for(lambda: change in self.seen, timeout)
            assert told, f"{change} not told within {timeout}s; told: {self.seen}"


def store(bus: Bus, prefix: str) -> KvStore:
    jetstream = JetStream(bus, Subjects(prefix))
    # Retried: a test writes as soon as a restarted server is back.
    jetstream.setup(max_age_s=0, max_bytes=16 * 1024 * 1024, kv_retries=5, kv_backoff_s=0.2)
    return jetstream.buckets["sticky"]


def value(gateway_id: str) -> StickyAssignment:
    return StickyAssignment(gateway_id=gateway_id)


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def watching(bus: Bus, prefix: str, changes: Changes) -> Iterator[tuple[KvStore, KvWatch]]:
    bucket = store(bus, prefix)
    bucket.put("before", value("gw-1"))
    watch = bucket.watch(changes.on_change)
    watch.start()
    yield bucket, watch
    watch.stop()


def test_current_values_then_every_change_in_order(
    watching: tuple[KvStore, KvWatch], changes: Changes
) -> None:
    bucket, watch = watching
    assert watch.caught_up.wait(5.0)
    assert changes.seen == [("before", '{"gateway_id":"gw-1"}')]
    bucket.put("a", value("gw-2"))
    bucket.put("a", value("gw-3"))
    bucket.delete("before")
    changes.wait_for(("before", None))
    assert changes.seen[1:] == [
        ("a", '{"gateway_id":"gw-2"}'),
        ("a", '{"gateway_id":"gw-3"}'),
        ("before", None),
    ]
    assert all(0.0 <= age < 5.0 for age in changes.ages)


def test_a_stopped_watch_tells_nothing_more(
    watching: tuple[KvStore, KvWatch], changes: Changes
) -> None:
    bucket, watch = watching
    assert watch.caught_up.wait(5.0)
    watch.stop()
    bucket.put("late", value("gw-9"))
    bucket.put("marker", value("gw-0"))
    # A second watch sees both: the first one had every chance to see them too.
    second = Changes()
    again = bucket.watch(second.on_change)
    again.start()
    try:
        second.wait_for(("marker", '{"gateway_id":"gw-0"}'))
    finally:
        again.stop()
    assert [key for key, _ in changes.seen] == ["before"]


def test_the_watch_outlives_a_server_restart(tmp_path: Path, changes: Changes) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=0)
    server.start()
    bus, writer = Bus(server.url, use_uvloop=False), Bus(server.url, use_uvloop=False)
    bus.start()
    writer.start()
    watch = store(bus, "restart").watch(changes.on_change)
    watch.start()
    try:
        assert watch.caught_up.wait(5.0)
        bucket = store(writer, "restart")
        bucket.put("a", value("gw-1"))
        changes.wait_for(("a", '{"gateway_id":"gw-1"}'))
        server.kill()
        server.start()  # same port and store; the watch's consumer is gone
        wait_until(lambda: writer.nc.is_connected, what="the writer is back")
        bucket.put("a", value("gw-2"))
        # Sooner than nats-py's own recovery (two missed idle heartbeats: 10 to 20 s).
        changes.wait_for(("a", '{"gateway_id":"gw-2"}'), timeout=5.0)
    finally:
        watch.stop()
        writer.stop()
        bus.stop()
        server.stop()


def test_caught_up_only_once_every_value_held_at_the_start_was_told(bus: Bus, prefix: str) -> None:
    """nats-py's "initial values done" marker can come before the values: a reader that
    waits for `caught_up` (the load balancer, for the sticky clients) must find them all."""
    bucket = store(bus, prefix)
    for n in range(30):
        bucket.put(f"client-{n}", value(f"gw-{n}"))
    bucket.delete("client-0")  # a deleted key is told too (as None)
    for _ in range(40):
        changes = Changes()
        watch = bucket.watch(changes.on_change)
        watch.start()
        try:
            assert watch.caught_up.wait(5.0)
            assert changes.keys() == {f"client-{n}" for n in range(30)}
        finally:
            watch.stop()
