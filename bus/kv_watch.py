"""A watch of a whole key-value bucket that outlives reconnects.

`KvWatch` tells `on_change(key, value, age_s)` each key's current value when it starts,
then every change, in the bucket's order, on the bus loop (`on_change` must not block:
it decodes and tells an actor). `value` is None for a deleted or purged key; `age_s` is
how long ago the value was written (by the server's clock against ours, never below 0).
A key whose value the bucket's max_age removes gets no call: readers age values
themselves.

After a reconnect it starts over from the bucket's current values: a server that
restarted has forgotten the watch's consumer, and changes made while we were away were
never delivered. (nats-py's ordered consumer would reset itself too, but only once two
of its idle heartbeats are missed, 10 s and more.) Values already told come again: the
reader applies them idempotently. A watch that cannot start (JetStream not up yet after
a server restart) is tried again every `retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import nats.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from bus.connection import BusError
from bus.log_throttle import LogThrottle, held_back
from bus.runtime import Bus

log = logging.getLogger(__name__)

OnChange = Callable[[str, bytes | None, float], None]

RETRY_S = 1.0


class InitialValues:
    """Whether a whole-bucket watch has told every value the bucket held when it began.
    nats-py's "initial values done" marker (a None) can come before those values, when
    the consumer delivered them all before its first info (an empty read of a full bucket
    was seen here at start-up): so the keys told are also counted against the messages
    the bucket held just before the watch (history=1: one per key, a deleted key's
    marker included)."""

    def __init__(self, held: int) -> None:
        self._held = held
        self._keys: set[str] = set()
        self._marked = False

    def came(self, entry: KeyValue.Entry | None) -> bool:
        """Takes the watch's next item; True once every initial value has come."""
        if entry is None:
            self._marked = True
        else:
            self._keys.add(entry.key)
        return self._marked and len(self._keys) >= self._held


async def watch_all(
    bus: Bus, kv: KeyValue, bucket: str
) -> tuple[KeyValue.KeyWatcher, InitialValues]:
    """A watch of every key (deletes told too), and what tells its initial values done."""
    held = (await bus.js.stream_info(f"KV_{bucket}")).state.messages
    return await kv.watchall(), InitialValues(held)


class KvWatch:
    def __init__(
        self, bus: Bus, kv: KeyValue, name: str, on_change: OnChange, *, retry_s: float = RETRY_S
    ) -> None:
        self._bus = bus
        self._kv = kv
        self._name = name
        self._on_change = on_change
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None  # the one following, on the loop
        self._failures = LogThrottle(60.0)
        # Set once the values the bucket held at the first start have all been told.
        self.caught_up = threading.Event()

    def start(self) -> None:
        """Starts following (from any thread but the loop's; returns at once)."""
        self._bus.add_connection_listener(_nothing, self._start_over)
        self._bus.call_soon(self._start_over)

    def stop(self) -> None:
        """Stops following (from any thread; returns at once)."""
        self._bus.remove_connection_listener(_nothing, self._start_over)
        self._bus.call_soon(self._end)

    def _start_over(self) -> None:
        """On the loop: ends the current watcher, if any, and starts a new one."""
        self._end()
        self._task = self._bus.loop.create_task(self._follow())

    def _end(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _follow(self) -> None:
        watcher, initial = await self._started()
        try:
            async for entry in watcher:
                if not self.caught_up.is_set() and initial.came(entry):
                    self.caught_up.set()
                if entry is None:
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                try:
                    self._on_change(entry.key, None if deleted else entry.value, _age(entry))
                except Exception:  # a reader's bug must not end the watch
                    log.exception("watch of bucket %s: on_change failed", self._name)
        finally:
            await _stopped(watcher)

    async def _started(self) -> tuple[KeyValue.KeyWatcher, InitialValues]:
        while True:
            try:
                return await watch_all(self._bus, self._kv, self._name)
            except (nats.errors.Error, BusError, TimeoutError) as exc:
                held = self._failures.admit("start")
                if held is not None:
                    log.warning(
                        "watch of bucket %s did not start (%s): trying again every %g s%s",
                        self._name,
                        type(exc).__name__,
                        self._retry_s,
                        held_back(held),
                    )
            await asyncio.sleep(self._retry_s)


async def _stopped(watcher: KeyValue.KeyWatcher) -> None:
    """Unsubscribes (which also ends nats-py's heartbeat check of the consumer)."""
    with contextlib.suppress(nats.errors.Error, BusError):  # it went with the connection
        await watcher.stop()  # type: ignore[no-untyped-call]


def _age(entry: KeyValue.Entry) -> float:
    created: Any = entry.created  # nats-py: a datetime (the stream's timestamp)
    if not isinstance(created, datetime):
        return 0.0
    return max(0.0, time.time() - created.timestamp())


def _nothing() -> None:
    """A disconnect needs nothing: the reconnect starts the watch over."""
