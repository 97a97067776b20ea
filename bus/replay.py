"""Reading the event stream back, for `gatefleet audit`: an ordered consumer on the bus loop.

A `Replay` is one pass over the stream in stream order, from the start or from a time,
filtered server-side by subject. It runs on the bus loop and hands *batches* of stored
events to the caller's thread (a handoff per message would cost more than the read):

    with Replay(bus, stream, [subjects.all_events], since=t) as replay:
        for batch in replay:            # blocks the calling thread, never the loop
            for seq, stored_ns, data in batch:
                ...

Where it ends: without `follow`, at the end of the stream as it was when the replay
started (its last sequence then, or the consumer's own count of pending messages reaching
0 under a filter), so a replay of a busy stream still ends. With `follow` it keeps
tailing until closed. With `until`, at the first event stored after that time (stream
storage times only grow, so nothing after it can be earlier).

Back-pressure: the loop side stops taking messages (it awaits; the loop stays free) while
the caller has `max_buffered` batches not yet taken; the consumer's flow control then
holds the server back.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.connection import BusError
from bus.runtime import Bus

EPOCH: Final = datetime.fromtimestamp(0, UTC)


def epoch_ns(moment: datetime) -> int:
    """`moment` in ns since the epoch, exactly (a float `timestamp()` is off by up to a
    few hundred ns at today's dates: enough to leave out the message stored at `moment`)."""
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def until_stored(stored_ns: int) -> datetime:
    """A time no earlier than `stored_ns` (datetimes hold microseconds: rounded up)."""
    return EPOCH + timedelta(microseconds=-(-stored_ns // 1000))


# (stream sequence, storage time in ns since the epoch, the stored bytes)
StoredEvent = tuple[int, int, bytes]

BATCH_SIZE: Final = 2048
MAX_BUFFERED_BATCHES: Final = 64
# Generous per-subscription buffers: the ordered consumer pushes as fast as it may.
PENDING_MSGS: Final = 256 * 1024
PENDING_BYTES: Final = 256 * 1024 * 1024
_POLL_S: Final = 0.5
_PROBE_INACTIVE_S: Final = 30.0
_ACK_V1_TOKENS: Final = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>


class ReplayError(BusError):
    """The stream cannot be read (it does not exist, or the server refused the consumer)."""


def position(reply: str) -> tuple[int, int, int]:
    """(stream sequence, storage time ns, messages still pending) from a JetStream reply.

    Both ack-subject layouts are read: v1 (9 tokens) and v2 (with domain and account).
    """
    tokens = reply.split(".")
    if len(tokens) == _ACK_V1_TOKENS:
        return int(tokens[5]), int(tokens[7]), int(tokens[8])
    ack = Msg.Ack
    return int(tokens[ack.StreamSeq]), int(tokens[ack.Timestamp]), int(tokens[ack.NumPending])


class Replay:
    """One ordered pass over `stream`, restricted to `subjects` (filter subjects)."""

    def __init__(
        self,
        bus: Bus,
        stream: str,
        subjects: list[str],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        follow: bool = False,
        batch_size: int = BATCH_SIZE,
        max_buffered: int = MAX_BUFFERED_BATCHES,
    ) -> None:
        if not subjects:
            raise ValueError("a replay needs at least one subject")
        self._bus = bus
        self.stream = stream
        self._subjects = subjects
        self._since = since
        self._until_ns = None if until is None else epoch_ns(until)
        self._follow = follow
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        # Loop side.
        self._batch: list[StoredEvent] = []
        self._sub: nats.js.JetStreamContext.PushSubscription | None = None
        self._resume: asyncio.Event | None = None
        self._paused = False
        self._done = False
        self._closing: asyncio.Task[None] | None = None
        # Handoff: batches, then None at the end.
        self._out: queue.SimpleQueue[list[StoredEvent] | None] = queue.SimpleQueue()
        self._finished = False
        #: Last stream sequence when the replay began (0: the stream was empty).
        self.end_seq = 0
        #: Matching events there were to read when the replay began (for progress).
        self.total = 0

    # The caller's side --------------------------------------------------------------------

    def start(self) -> Replay:
        """Creates the consumer; ReplayError when the stream is missing or refuses it."""
        self._bus.run(self._open())
        return self

    def __iter__(self) -> Iterator[list[StoredEvent]]:
        """Batches in stream order until the end (when following: until closed)."""
        while not self._finished:
            try:
                batch = self._out.get(timeout=_POLL_S)
            except queue.Empty:
                if self._bus.nc.is_closed:
                    raise ReplayError("the NATS connection closed during the replay") from None
                continue
            if batch is None:
                self._finished = True
                return
            if self._paused:
                self._bus.call_soon(self._wake)
            yield batch

    def close(self) -> None:
        """Stops reading (safe to call twice, and after the end)."""
        self._finished = True
        with contextlib.suppress(BusError, TimeoutError):
            self._bus.run(self._close(), timeout=5)

    def __enter__(self) -> Replay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # The loop's side ----------------------------------------------------------------------

    async def _open(self) -> None:
        js = self._bus.js
        self._resume = asyncio.Event()
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            raise ReplayError(f"no event stream {self.stream} on this server") from None
        self.end_seq = info.state.last_seq
        config = ConsumerConfig()
        if len(self._subjects) > 1:
            config.filter_subjects = list(self._subjects)
        if self._since is not None:
            # By sequence, not by time: given several filter subjects and a start time,
            # nats-server 2.15 may start past messages stored since then (it skipped one of
            # the second filter stored before two of the first; cf. nats-server#6076).
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = await self._first_seq_since(self._since)
        try:
            sub = await js.subscribe(
                self._subjects[0],
                stream=self.stream,
                cb=self._on_msg,
                config=config,
                ordered_consumer=True,
                pending_msgs_limit=PENDING_MSGS,
                pending_bytes_limit=PENDING_BYTES,
            )
        except nats.js.errors.Error as exc:
            raise ReplayError(f"cannot read {self.stream}: {exc}") from exc
        self._sub = sub
        try:
            consumer = await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            return  # already read to the end and gone: the end mark is in the handoff
        delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
        self.total = (consumer.num_pending or 0) + delivered
        if not self._follow and self.total == 0:
            self._end()

    async def _first_seq_since(self, since: datetime) -> int:
        """The sequence of the first message stored at or after `since` (the last one's
        plus one if none is), as the server finds it for an unfiltered consumer."""
        js = self._bus.js
        probe = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_PROBE_INACTIVE_S,  # gone on its own if we die before the delete
            mem_storage=True,
        )
        try:
            info = await js.add_consumer(self.stream, probe)
        except nats.js.errors.Error as exc:
            raise ReplayError(f"cannot read {self.stream}: {exc}") from exc
        with contextlib.suppress(nats.js.errors.Error):
            await js.delete_consumer(self.stream, info.name)
        if info.delivered is None:
            raise ReplayError(f"cannot read {self.stream}: the server did not say where to start")
        # A new consumer's "delivered" is the message before its first.
        return info.delivered.stream_seq + 1

    async def _on_msg(self, msg: Msg) -> None:
        if self._done:
            return
        seq, stored_ns, pending = position(msg.reply)
        follow = self._follow
        if (not follow and seq > self.end_seq) or (
            self._until_ns is not None and stored_ns > self._until_ns
        ):
            self._end()
            return
        batch = self._batch
        if not batch:
            # Hand over whatever has arrived once this burst of messages is processed.
            asyncio.get_running_loop().call_soon(self._flush)
        batch.append((seq, stored_ns, msg.data))
        if not follow and (pending == 0 or seq >= self.end_seq):
            self._end()
            return
        if len(batch) >= self._batch_size:
            self._flush()
            if self._out.qsize() >= self._max_buffered and self._resume is not None:
                self._paused = True
                self._resume.clear()
                await self._resume.wait()

    def _flush(self) -> None:
        if self._batch:
            self._out.put(self._batch)
            self._batch = []

    def _wake(self) -> None:
        if self._out.qsize() < self._max_buffered // 2 and self._resume is not None:
            self._paused = False
            self._resume.set()

    def _end(self) -> None:
        """No more batches: hand over the last one, then the end mark; unsubscribe."""
        if self._done:
            return
        self._done = True
        self._flush()
        self._out.put(None)
        if self._resume is not None:
            self._resume.set()
        # A task of its own: unsubscribing cancels the task running the message callback,
        # which may be the caller.
        self._closing = asyncio.get_running_loop().create_task(self._unsubscribe())

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _close(self) -> None:
        self._end()
        if self._closing is not None:
            await self._closing
