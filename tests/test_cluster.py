"""The three-node test cluster: routed, JetStream replicated, a node killed and back."""

from __future__ import annotations

import time
from collections.abc import Callable

import nats.errors
import pytest
from nats.js.api import KeyValueConfig, StorageType

from bus.connection import BusError
from bus.jetstream import BUCKETS, JetStream, bucket_name, stream_name
from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from tests.cluster import NatsCluster

MAX_BYTES = 16 * 1024 * 1024


def _written(write: Callable[[], int], within_s: float = 20.0) -> int:
    """A write's revision, tried until it succeeds: writes fail while a new stream's
    group, or one that lost its leader, elects one."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return write()
        except (nats.errors.Error, TimeoutError):
            assert time.monotonic() < deadline, f"no write within {within_s}s"


def test_an_r3_bucket_keeps_its_values_through_the_kill_of_its_leader(
    nats_cluster: NatsCluster,
) -> None:
    bus = Bus(nats_cluster.url, use_uvloop=False)
    bus.start()
    try:
        config = KeyValueConfig(bucket="probe", storage=StorageType.FILE, replicas=3)
        kv = bus.run(bus.js.create_key_value(config))
        first = _written(lambda: bus.run(kv.put("key", b"before"), timeout=3))
        leader = nats_cluster.stream_leader("KV_probe")
        nats_cluster.kill(leader)

        second = _written(lambda: bus.run(kv.update("key", b"after", last=first), timeout=3))
        assert nats_cluster.stream_leader("KV_probe") != leader

        nats_cluster.restart(leader)
        entry = bus.run(kv.get("key"))
        assert (entry.value, entry.revision) == (b"after", second)
    finally:
        bus.stop()


def _replicas(bus: Bus, stream: str) -> int:
    info = bus.run(bus.js.stream_info(stream))
    return info.config.num_replicas or 1


def test_replicas_sets_the_replication_of_the_stream_and_buckets_and_grows_a_store(
    nats_cluster: NatsCluster,
) -> None:
    subjects = Subjects("gf")
    streams = [stream_name("gf"), *(f"KV_{bucket_name('gf', name)}" for name in BUCKETS)]
    bus = Bus(nats_cluster.url, use_uvloop=False)
    bus.start()
    try:
        JetStream(bus, subjects).setup(max_age_s=0, max_bytes=MAX_BYTES)
        assert [_replicas(bus, stream) for stream in streams] == [1] * len(streams)
        # The single-server store, started again with replicas = 3: every copy made.
        JetStream(bus, subjects).setup(max_age_s=0, max_bytes=MAX_BYTES, replicas=3)
        assert [_replicas(bus, stream) for stream in streams] == [3] * len(streams)
    finally:
        bus.stop()


def test_more_replicas_than_servers_is_one_clear_line(nats_server: EmbeddedServer) -> None:
    bus = Bus(nats_server.url, use_uvloop=False)
    bus.start()
    try:
        with pytest.raises(BusError) as caught:
            JetStream(bus, Subjects("r3")).setup(max_age_s=0, max_bytes=MAX_BYTES, replicas=3)
    finally:
        bus.stop()
    message = str(caught.value)
    assert message.startswith("cannot set up the event stream GATEFLEET_EVENTS_R3: JetStream ")
    assert "\n" not in message
    assert "replicas" in message, message
