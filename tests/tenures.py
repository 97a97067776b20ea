"""Helpers for a replica that leads again (a new tenure, a new epoch) while a write of
its earlier tenure is still on its way."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pykka
from nats.js.kv import KeyValue

from actors.load_balancer import LoadBalancerActor
from bus.jetstream import KvStore, bucket_name
from bus.leadership import Lease
from bus.runtime import Bus
from tests.conftest import wait_until
from tests.test_kv_fencing import Held


class HeldKey(Held):
    """`Held`, for the writes of one key only (others in the bucket pass)."""

    def __init__(self, kv: KeyValue, key: str) -> None:
        super().__init__(kv)
        self.key = key

    async def write(self, key: str, make: Callable[[], Awaitable[int]]) -> int:
        if key != self.key:
            return await make()
        return await super().write(key, make)


def hold_settings_key(key: str) -> HeldKey:
    """Puts a HeldKey around the running orchestrator's `settings` bucket (the load
    balancer's settings and the supervisor's maintenance keys are written there)."""
    [balancer] = pykka.ActorRegistry.get_by_class(LoadBalancerActor)
    store = balancer.proxy().ctx.get().buckets["settings"]
    store._kv = held = HeldKey(store._kv, key)
    return held


def settings_store(bus: Bus, prefix: str) -> KvStore:
    """The `settings` bucket as another writer (another replica) sees it."""
    name = bucket_name(prefix, "settings")
    return KvStore(bus, bus.run(bus.js.key_value(name)), name)


def lead_again(lease: Lease, timeout: float = 15.0) -> int:
    """Steps this replica down and waits until it leads again; the new epoch."""
    first = lease.view.epoch
    lease.step_down()
    wait_until(
        lambda: lease.still_leader() and lease.view.epoch != first,
        timeout=timeout,
        what="this replica leading again",
    )
    epoch = lease.view.epoch
    assert epoch is not None
    return epoch
