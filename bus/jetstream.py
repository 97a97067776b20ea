"""JetStream: the event stream and the key-value buckets, set up idempotently at start.

Names: the stream is `GATEFLEET_EVENTS` (PROTOCOL.md) for the default prefix; a
deployment with another prefix gets `GATEFLEET_EVENTS_<PREFIX>` so that two fleets can
share one NATS account. Buckets are `<prefix>_<name>` likewise.

The `sticky` bucket (actors/sticky.py) forgets a key `sticky_ttl_s` after its last write
(its max_age) and keeps at most MAX_STICKY_CLIENTS keys, the oldest written dropped first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from bus.connection import BusError
from bus.kv_watch import KvWatch, OnChange, watch_all
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.codec import decode, encode
from schemas.events import Event, decode_event
from schemas.settings import DEFAULT_STICKY_TTL_S, MAX_STICKY_CLIENTS

log = logging.getLogger(__name__)
T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R")

DEFAULT_PREFIX = "gatefleet"
BUCKETS = ("settings", "distributions", "desired")
STICKY_BUCKET = "sticky"
DUPLICATE_WINDOW_S = 120.0
# Reading a whole bucket at start: a large store takes longer than one call.
ENTRIES_TIMEOUT_S = 300.0
ENTRY_WAIT_S = 5.0  # for the next value of a read of every entry (then it is tried again)
# No JetStream stream answers while it elects a leader: 4-9 s after the node leading it
# is lost (measured on the three-node test cluster). A key-value call that gets no answer
# is tried again, once a second after its counted retries, until this long after its
# first failure, so that losing one node of three fails no step.
NO_ANSWER_PATIENCE_S = 12.0
NO_ANSWER_WAIT_S = 1.0
# One key-value call (all the writes of an update_many) gets an answer within this.
CALL_TIMEOUT_S = 10.0


def stream_name(prefix: str) -> str:
    if prefix == DEFAULT_PREFIX:
        return "GATEFLEET_EVENTS"
    return "GATEFLEET_EVENTS_" + re.sub(r"[^A-Za-z0-9]", "_", prefix).upper()


def bucket_name(prefix: str, name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix) + "_" + name


def event_stream_config(
    subjects: Subjects, max_age_s: float, max_bytes: int, replicas: int = 1
) -> StreamConfig:
    return StreamConfig(
        name=stream_name(subjects.prefix),
        subjects=[subjects.all_events],
        storage=StorageType.FILE,
        max_age=max_age_s or None,
        max_bytes=max_bytes,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


async def ensure_bucket(bus: Bus, name: str, replicas: int) -> KeyValue:
    """The bucket, created if missing, its replication set to `replicas` if it differs
    (a store that grew from one server to a cluster)."""
    js = bus.js
    try:
        kv = await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=name, storage=StorageType.FILE, history=1, replicas=replicas)
        )
    config = (await js.stream_info(f"KV_{name}")).config
    if config.num_replicas != replicas:
        log.info("bucket %s: replicas %s -> %d", name, config.num_replicas, replicas)
        await js.update_stream(dataclasses.replace(config, num_replicas=replicas))
    return kv


class KvError(Exception):
    """A key-value call that failed after its retries. `str()` is a short reason, fit for a
    reply or a distribution's `reason` (never an exception's text)."""


class WrongRevision(Exception):
    """A compare-and-set write refused: the key is not at the revision the writer gave
    (another writer has written, created or deleted it since). Never tried again."""

    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"{bucket} key {key} is not at the revision this replica last knew")
        self.bucket = bucket
        self.key = key


def failure_reason(exc: BaseException) -> str:
    """Why a call to JetStream failed, in a few words."""
    if isinstance(exc, nats.js.errors.APIError):
        return f"JetStream refused it ({exc.description or exc.code})"
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return "no JetStream stream answers for the bucket"
    if isinstance(exc, TimeoutError):
        return "JetStream did not answer in time"
    if isinstance(exc, nats.errors.MaxPayloadError):
        return "the value is over the server's max payload"
    if isinstance(exc, BusError | nats.errors.ConnectionClosedError):
        return "not connected to NATS"
    return f"NATS error ({type(exc).__name__})"


class KvStore:
    """A typed, blocking view of one bucket for actor threads (never the loop thread).

    A call that fails is tried again `retries` times, after `backoff_s`, then twice that,
    and so on (the calling thread sleeps meanwhile), then raises KvError. One that gets no
    answer (no stream answers, a timeout, a reconnect: a stream electing its leader, a
    server coming back) goes on being tried after those, every NO_ANSWER_WAIT_S, until
    `patience_s` after its first failure. A value over the server's max payload is not
    tried again: it would never fit.
    """

    def __init__(
        self,
        bus: Bus,
        kv: KeyValue,
        bucket: str,
        *,
        retries: int = 0,
        backoff_s: float = 0.0,
        patience_s: float = NO_ANSWER_PATIENCE_S,
    ) -> None:
        self._bus = bus
        self._kv = kv
        self._name = bucket
        # The bucket's stream and subjects, as NATS names them (to purge keys).
        self._stream = f"KV_{bucket}"
        self._subject_prefix = f"$KV.{bucket}."
        self._retries = retries
        self._backoff_s = backoff_s
        self._patience_s = patience_s

    @property
    def name(self) -> str:
        return self._name

    def put(self, key: str, value: msgspec.Struct) -> None:
        """Writes the value whatever the key holds."""
        data = encode(value)
        self._call(f"put {key}", lambda: self._kv.put(key, data))

    def update_many(
        self, writes: Mapping[str, tuple[msgspec.Struct | None, int]]
    ) -> dict[str, int]:
        """Compare-and-set writes, all at once: each key is written only if it is still at
        the revision given with it (0: only if it does not exist, or is deleted); a value
        None deletes the key (at 0: there is none to delete). Returns each key's new revision (0
        for a delete: the key does not exist). Raises WrongRevision for a key that is not
        at its revision (the other keys are written all the same), KvError as `put` does.

        Retried as `put` is, each key until written: a key tried again after an attempt
        that got no answer may find its own value stored (the answer was lost, not the
        write); that is its write, not another writer's."""
        encoded = {
            key: (None if value is None else encode(value), last)
            for key, (value, last) in writes.items()
        }
        written: dict[str, int] = {}
        tried: set[str] = set()

        def attempt() -> dict[str, int]:
            pending = {key: write for key, write in encoded.items() if key not in written}
            retried = tried & pending.keys()
            tried.update(pending)
            # Only this thread reads or changes `written`: an attempt that timed out and
            # ends later tells nobody.
            outcomes = self._bus.run(self._update_all(pending, retried), CALL_TIMEOUT_S)
            written.update((key, o) for key, o in outcomes.items() if isinstance(o, int))
            failures = [o for o in outcomes.values() if isinstance(o, BaseException)]
            refused = [f for f in failures if isinstance(f, WrongRevision)]
            if failures:
                raise (refused or failures)[0]
            return written

        if not encoded:
            return {}
        return self._retrying(f"put {_names(list(encoded))}", attempt)

    def update_soon(
        self, key: str, value: msgspec.Struct, last: int | None
    ) -> concurrent.futures.Future[int]:
        """`update` started like `put_soon`, and not tried again; `last` None: at the
        revision the key has when the write starts. The future ends with the new
        revision, WrongRevision, or the call's error."""
        data = encode(value)

        async def write() -> int:
            at = (await self._fetch(key))[1] if last is None else last
            return await self._written(key, data, at, retried=False)

        return self._bus.submit(write())

    async def _update_all(
        self, writes: Mapping[str, tuple[bytes | None, int]], retried: set[str]
    ) -> dict[str, int | BaseException]:
        results = await asyncio.gather(
            *(
                self._written(key, data, last, retried=key in retried)
                for key, (data, last) in writes.items()
            ),
            return_exceptions=True,
        )
        return dict(zip(writes, results, strict=True))

    async def _written(self, key: str, data: bytes | None, last: int, *, retried: bool) -> int:
        """One compare-and-set write; its new revision, or WrongRevision. `retried`: an
        earlier try may have stored it already (its answer lost), which is no conflict."""
        revision = await self._write(key, data, last)
        if revision is None and retried:
            revision = await self._holding(key, data)
        if revision is None:
            raise WrongRevision(self._name, key)
        return revision

    async def _write(self, key: str, data: bytes | None, last: int) -> int | None:
        """One compare-and-set write (data None: a delete; of a key at revision 0, none
        to make); its new revision (0 after a delete), or None if the key is not at
        `last`."""
        try:
            if data is None:
                if last:
                    await self._kv.delete(key, last=last)
                return 0
            if last:
                return await self._kv.update(key, data, last=last)
            return await self._kv.create(key, data)
        except nats.js.errors.APIError as exc:
            if not _wrong_revision(exc):
                raise
        return None

    async def _holding(self, key: str, data: bytes | None) -> int | None:
        """The key's revision if it holds `data` (None: it is deleted; revision 0), else
        None."""
        found, revision = await self._fetch(key)
        if data is None:
            return 0 if found is None else None
        return revision if found == data else None

    def get_at(self, key: str) -> tuple[bytes | None, int]:
        """The key's value (None: absent or deleted) and revision (0: never written; a
        deleted key's is its delete marker's)."""
        return self._call(f"get {key}", lambda: self._fetch(key))

    async def _fetch(self, key: str) -> tuple[bytes | None, int]:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError as exc:
            return None, (exc.entry.revision or 0) if exc.entry else 0
        return entry.value or b"", entry.revision or 0

    def put_soon(self, key: str, value: msgspec.Struct) -> concurrent.futures.Future[int]:
        """Starts the write and returns at once (for an actor on a loop, which must never
        wait): the future ends with the new revision, or the write's error."""
        return self._bus.submit(self._kv.put(key, encode(value)))

    def delete_soon(self, key: str) -> concurrent.futures.Future[bool]:
        """`delete`, started like `put_soon`."""
        return self._bus.submit(self._kv.delete(key))

    def watch(self, on_change: OnChange) -> KvWatch:
        """Every key's value, then every change, told to `on_change` (bus/kv_watch.py),
        from `start()` on."""
        return KvWatch(self._bus, self._kv, self._name, on_change)

    def get(self, key: str, kind: type[T]) -> T | None:
        data, _ = self.get_at(key)
        return None if data is None else decode(data, kind)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self._kv.delete(key))

    def purge(self, keys: Iterable[str]) -> None:
        """Removes these keys (one ending in `.>`: every key under it) leaving no delete
        marker behind, unlike `delete`, so that a bucket does not grow by one marker per
        key ever deleted."""
        keys = list(keys)

        async def purge_all() -> None:
            js, stream, prefix = self._bus.js, self._stream, self._subject_prefix
            await asyncio.gather(*(js.purge_stream(stream, subject=prefix + key) for key in keys))

        if keys:
            self._call(f"purge {', '.join(keys[:3])}...", purge_all)

    def entries(self) -> dict[str, bytes]:
        """Every live key and its value, read in one pass (a watch of the whole bucket),
        not one round trip per key."""
        return {key: data for key, (data, _) in self.entries_at().items()}

    def entries_at(self) -> dict[str, tuple[bytes, int]]:
        """`entries`, each value with its revision: read until every key the bucket held
        when the read began has come (bus/kv_watch.py, InitialValues)."""

        async def fetch() -> dict[str, tuple[bytes, int]]:
            watcher, initial = await watch_all(self._bus, self._kv, self._name)
            found: dict[str, tuple[bytes, int]] = {}
            try:
                done = False
                while not done:
                    entry = await watcher.updates(timeout=ENTRY_WAIT_S)  # type: ignore[no-untyped-call]
                    done = initial.came(entry)
                    if entry is None:
                        continue
                    if entry.operation in (KV_DEL, KV_PURGE):
                        found.pop(entry.key, None)
                    else:
                        found[entry.key] = (entry.value or b"", entry.revision or 0)
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
            return found

        return self._call("read every entry", fetch, timeout=ENTRIES_TIMEOUT_S)

    def _call(
        self, what: str, call: Callable[[], Coroutine[Any, Any, R]], timeout: float = CALL_TIMEOUT_S
    ) -> R:
        return self._retrying(what, lambda: self._bus.run(call(), timeout))

    def _retrying(self, what: str, attempt: Callable[[], R]) -> R:
        delay, retries, first_failure = self._backoff_s, 0, 0.0
        while True:
            try:
                return attempt()
            except (nats.errors.Error, BusError, TimeoutError) as exc:
                reason = failure_reason(exc)
                first_failure = first_failure or time.monotonic()
                if isinstance(exc, nats.errors.MaxPayloadError):
                    raise KvError(reason) from exc
                if retries < self._retries:
                    retries += 1
                    log.warning(
                        "%s failed (%s): retry %d of %d in %.0f ms",
                        what,
                        reason,
                        retries,
                        self._retries,
                        delay * 1000,
                    )
                    time.sleep(delay)
                    delay *= 2
                elif _no_answer(exc) and time.monotonic() - first_failure < self._patience_s:
                    if retries == self._retries:
                        retries += 1
                        log.warning(
                            "%s failed (%s): tried again every %g s for up to %g s",
                            what,
                            reason,
                            NO_ANSWER_WAIT_S,
                            self._patience_s,
                        )
                    time.sleep(NO_ANSWER_WAIT_S)
                else:
                    raise KvError(reason) from exc


def _wrong_revision(exc: nats.js.errors.APIError) -> bool:
    """Whether JetStream refused a write for its expected last revision (10071, or 10164
    from some servers; nats-py tells it as KeyWrongLastSequenceError for an update)."""
    return isinstance(exc, KeyWrongLastSequenceError) or exc.err_code in (10071, 10164)


def _names(keys: list[str]) -> str:
    """Keys for a log line: the first three."""
    return ", ".join(keys[:3]) + ("..." if len(keys) > 3 else "")


def _no_answer(exc: BaseException) -> bool:
    """Whether a call failed for want of an answer (not refused, nor its bus stopped)."""
    return isinstance(
        exc,
        nats.js.errors.NoStreamResponseError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionReconnectingError
        | TimeoutError,
    )


def open_bucket(bus: Bus, prefix: str, name: str) -> KvStore:
    """A bucket that `JetStream.setup` created, on another connection than its own (the
    API lane's: the sticky clients are written and watched there, next to the selections
    that change them, not on the loop that reads heartbeats). Blocks the caller."""
    bucket = bucket_name(prefix, name)
    return KvStore(bus, bus.run(bus.js.key_value(bucket)), bucket)


class JetStream:
    """The orchestrator's durable state: stream + buckets."""

    def __init__(self, bus: Bus, subjects: Subjects) -> None:
        self._bus = bus
        self._subjects = subjects
        self.buckets: dict[str, KvStore] = {}

    def setup(
        self,
        *,
        max_age_s: float,
        max_bytes: int,
        replicas: int = 1,
        kv_retries: int = 0,
        kv_backoff_s: float = 0.0,
        sticky_ttl_s: float = DEFAULT_STICKY_TTL_S,
    ) -> None:
        """Creates or updates the stream and buckets, each kept on `replicas` servers of
        the cluster; safe to run on every start. The buckets' calls are retried as KvStore
        says. BusError, saying why, when JetStream refuses (say, more replicas than
        servers)."""
        stream = event_stream_config(self._subjects, max_age_s, max_bytes, replicas)
        self._setup_step(f"the event stream {stream.name}", self._ensure_stream(stream))
        for name in (*BUCKETS, STICKY_BUCKET):
            bucket = bucket_name(self._subjects.prefix, name)
            kv = self._setup_step(
                f"the bucket {bucket}", ensure_bucket(self._bus, bucket, replicas)
            )
            if name == STICKY_BUCKET:
                limit = self._limit(f"KV_{bucket}", sticky_ttl_s, MAX_STICKY_CLIENTS)
                self._setup_step(f"the bucket {bucket}'s limits", limit)
            self.buckets[name] = KvStore(
                self._bus,
                kv,
                bucket,
                retries=kv_retries,
                backoff_s=kv_backoff_s,
            )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        js = self._bus.js
        try:
            await js.add_stream(config)
        except BadRequestError:
            # It exists with other settings (retention changed in the config): update it.
            await js.update_stream(config)
        log.info("event stream %s ready", config.name)

    def _setup_step(self, what: str, step: Coroutine[Any, Any, R]) -> R:
        try:
            return self._bus.run(step)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot set up {what}: {failure_reason(exc)}") from exc

    async def _limit(self, stream: str, max_age_s: float, max_msgs: int) -> None:
        """Sets a bucket's max_age and max_msgs (dropping the oldest message when full),
        also when an earlier run set others: the TTL is a setting."""
        js = self._bus.js
        config = (await js.stream_info(stream)).config
        if (config.max_age, config.max_msgs, config.discard) == (
            max_age_s,
            max_msgs,
            DiscardPolicy.OLD,
        ):
            return
        config.max_age, config.max_msgs, config.discard = max_age_s, max_msgs, DiscardPolicy.OLD
        # The server refuses a duplicate window longer than max_age.
        config.duplicate_window = min(config.duplicate_window or max_age_s, max_age_s)
        await js.update_stream(config)

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
