"""JetStream: the event stream and the key-value buckets, set up idempotently at start.

Names: the stream is `GATEFLEET_EVENTS` (PROTOCOL.md) for the default prefix; a
deployment with another prefix gets `GATEFLEET_EVENTS_<PREFIX>` so that two fleets can
share one NATS account. Buckets are `<prefix>_<name>` likewise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import nats.errors
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, KeyNotFoundError
from nats.js.kv import KeyValue

from bus.connection import BusError
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.codec import decode, encode
from schemas.events import Event, decode_event

log = logging.getLogger(__name__)
T = TypeVar("T", bound=msgspec.Struct)

DEFAULT_PREFIX = "gatefleet"
BUCKETS = ("settings", "distributions", "desired")
DUPLICATE_WINDOW_S = 120.0


def stream_name(prefix: str) -> str:
    if prefix == DEFAULT_PREFIX:
        return "GATEFLEET_EVENTS"
    return "GATEFLEET_EVENTS_" + re.sub(r"[^A-Za-z0-9]", "_", prefix).upper()


def bucket_name(prefix: str, name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix) + "_" + name


def event_stream_config(subjects: Subjects, max_age_s: float, max_bytes: int) -> StreamConfig:
    return StreamConfig(
        name=stream_name(subjects.prefix),
        subjects=[subjects.all_events],
        storage=StorageType.FILE,
        max_age=max_age_s or None,
        max_bytes=max_bytes,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


class KvStore:
    """A typed, blocking view of one bucket for actor threads (never the loop thread)."""

    def __init__(self, bus: Bus, kv: KeyValue) -> None:
        self._bus = bus
        self._kv = kv

    def put(self, key: str, value: msgspec.Struct) -> None:
        self._bus.run(self._kv.put(key, encode(value)))

    def put_soon(self, key: str, value: msgspec.Struct) -> concurrent.futures.Future[int]:
        """Starts the write and returns at once (for an actor on a loop, which must never
        wait): the future ends with the new revision, or the write's error."""
        return self._bus.submit(self._kv.put(key, encode(value)))

    def get(self, key: str, kind: type[T]) -> T | None:
        async def fetch() -> bytes | None:
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                return None
            return entry.value

        data = self._bus.run(fetch())
        return None if data is None else decode(data, kind)

    def delete(self, key: str) -> None:
        self._bus.run(self._kv.delete(key))

    def keys(self) -> list[str]:
        async def fetch() -> list[str]:
            try:
                return list(await self._kv.keys())
            except nats.js.errors.NoKeysError:
                return []

        return self._bus.run(fetch())

    def items(self, kind: type[T]) -> dict[str, T]:
        """Every live entry decoded as `kind`; an entry that does not decode is logged and skipped."""
        result: dict[str, T] = {}
        for key in self.keys():
            try:
                value = self.get(key, kind)
            except msgspec.DecodeError as exc:
                log.warning("skipping undecodable entry %r: %s", key, exc)
                continue
            if value is not None:
                result[key] = value
        return result


class JetStream:
    """The orchestrator's durable state: stream + buckets."""

    def __init__(self, bus: Bus, subjects: Subjects) -> None:
        self._bus = bus
        self._subjects = subjects
        self.buckets: dict[str, KvStore] = {}

    def setup(self, *, max_age_s: float, max_bytes: int) -> None:
        """Creates or updates the stream and buckets; safe to run on every start."""
        self._bus.run(
            self._ensure_stream(event_stream_config(self._subjects, max_age_s, max_bytes))
        )
        for name in BUCKETS:
            kv = self._bus.run(self._ensure_bucket(bucket_name(self._subjects.prefix, name)))
            self.buckets[name] = KvStore(self._bus, kv)

    async def _ensure_stream(self, config: StreamConfig) -> None:
        js = self._bus.js
        try:
            await js.add_stream(config)
        except BadRequestError:
            # It exists with other settings (retention changed in the config): update it.
            await js.update_stream(config)
        log.info("event stream %s ready", config.name)

    async def _ensure_bucket(self, name: str) -> KeyValue:
        js = self._bus.js
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, storage=StorageType.FILE, history=1)
            )

    def last_event(self) -> tuple[Event | None, datetime] | None:
        """The stream's last event (None if it does not decode) and when it was stored;
        None when the stream holds none."""
        return self._bus.run(self._last_event(stream_name(self._subjects.prefix)))

    async def _last_event(self, stream: str) -> tuple[Event | None, datetime] | None:
        js = self._bus.js
        state = (await js.stream_info(stream)).state
        if not state.messages:
            return None
        stored = await js.get_msg(stream, seq=state.last_seq)
        try:
            event: Event | None = decode_event(stored.data or b"")
        except msgspec.DecodeError:
            event = None
        return event, stored.time or datetime.now(UTC)


class JetStreamWatch:
    """Whether JetStream answers: asked every `period_s` on the bus loop (an account-info
    request), so a status reply can say so without waiting for it."""

    def __init__(self, bus: Bus, period_s: float = 5.0, timeout_s: float = 2.0) -> None:
        self._bus = bus
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.state = "ok"  # or why not, read by any thread

    def start(self, schedule: Callable[[float, Callable[[], object]], object]) -> None:
        """`schedule(delay, fn)` runs `fn` on the bus loop later (the timer wheel)."""
        self._schedule = schedule
        schedule(self.period_s, self._tick)

    def _tick(self) -> None:
        self._bus.spawn(self._check())
        self._schedule(self.period_s, self._tick)

    async def _check(self) -> None:
        try:
            await asyncio.wait_for(self._bus.js.account_info(), self.timeout_s)
        except (nats.errors.Error, BusError, TimeoutError) as exc:
            self.state = f"not answering: {type(exc).__name__}"
        else:
            self.state = "ok"
