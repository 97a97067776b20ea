"""The three-node test cluster: routed, JetStream replicated, a node killed and back."""

from __future__ import annotations

import time

import nats.errors
from nats.js.api import KeyValueConfig, StorageType

from bus.runtime import Bus
from tests.cluster import NatsCluster


def test_an_r3_bucket_keeps_its_values_through_the_kill_of_its_leader(
    nats_cluster: NatsCluster,
) -> None:
    bus = Bus(nats_cluster.url, use_uvloop=False)
    bus.start()
    try:
        config = KeyValueConfig(bucket="probe", storage=StorageType.FILE, replicas=3)
        kv = bus.run(bus.js.create_key_value(config))
        first = bus.run(kv.put("key", b"before"))
        leader = nats_cluster.stream_leader("KV_probe")
        nats_cluster.kill(leader)

        deadline = time.monotonic() + 20
        while True:  # writes fail until the two nodes left elect a new stream leader
            try:
                second = bus.run(kv.update("key", b"after", last=first), timeout=3)
                break
            except (nats.errors.Error, TimeoutError):
                assert time.monotonic() < deadline, "no write within 20 s of the kill"
        assert nats_cluster.stream_leader("KV_probe") != leader

        nats_cluster.restart(leader)
        entry = bus.run(kv.get("key"))
        assert (entry.value, entry.revision) == (b"after", second)
    finally:
        bus.stop()
