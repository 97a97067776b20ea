"""The event outbox: every event stored in the stream with JetStream's ack, without making
anyone wait for it.

`emit(event)` (any thread; it never blocks) encodes the event and queues it. One task on
the bus loop publishes what waits, with up to `window` events in flight: each is a plain
publish carrying the event's id as `Nats-Msg-Id` and a reply subject under one inbox, on
whose subscription the stream's acks arrive. (Awaiting each ack in turn, as nats-py's
`js.publish` does, would hold throughput to one event per round trip.)

An event is done when the stream acks it (a duplicate ack too: an earlier attempt was
stored). One the stream did not store (an error ack, e.g. over its limits; no responders;
no ack within `ack_timeout_s`, e.g. the server restarted) is sent again after a pause that
doubles with each failure in a row, from FIRST_PAUSE_S to MAX_PAUSE_S: the whole outbox
pauses, since it is the stream that refuses, not the event. Nothing is sent while the
connection is down. What was in flight when it dropped is sent again, first, as soon as
it is back: its acks went with the old connection (one the stream did store gets a
duplicate ack), and waiting `ack_timeout_s` for them would leave a clean stop soon after
a server restart with events it cannot store in its time.

Lost events: one the stream still has not stored `retry_for_s` after its first send (so
every attempt falls inside the stream's duplicate window, and an event whose ack alone
was lost is stored once), or one emitted while `max_events` wait. They are counted
(`lost`: `events_lost` in status and /metrics) and reported by an `audit.gap` event sent
ahead of every other as soon as it can be; that report is retried without limit.

`close()` (clean stop) waits up to a deadline until every event is stored; if all are, it
stores `orchestrator.stopped`, the mark that this run left nothing unaccounted for. A
start that finds the stream ending otherwise records an `audit.gap` for the window since
the last stored event (`unclean_stop_gap`): the previous run was killed (or could not
store its last events before it stopped), and what it had not stored then is not vouched
for. Acks come within milliseconds (`python -m bench events`), so after a kill that is
normally its last few milliseconds of events; while the stream refused writes, all since.

Order: events are stored in the order emitted, except around failures, where a retried
event lands after later ones (its `ts` says when it happened).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.connection import BusError
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas.codec import encode
from schemas.events import AuditGap, Event, OrchestratorStopped, utc_now

log = logging.getLogger(__name__)

WINDOW: Final = 1024  # events in flight (sent, ack awaited)
MAX_EVENTS: Final = 100_000  # events waiting, in flight included, before new ones are lost
ACK_TIMEOUT_S: Final = 5.0
FIRST_PAUSE_S: Final = 0.05
MAX_PAUSE_S: Final = 1.0
CLOSE_TIMEOUT_S: Final = 2.0
_TICK_S: Final = 0.1  # how often acks overdue are looked for
_DRAIN_POLL_S: Final = 0.005


class _AckError(msgspec.Struct):
    code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    """A JetStream publish ack (`{"stream": .., "seq": ..}`) or its error."""

    error: _AckError | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


@dataclass(slots=True, eq=False)
class _Pending:
    subject: str
    data: bytes
    headers: dict[str, str]
    ts: datetime  # the event's
    first_sent: float = 0.0  # monotonic; 0: never sent
    sent: float = 0.0  # the last send
    reports: int = 0  # an audit.gap: the lost events it reports (never lost itself)


class EventOutbox:
    """Events to the stream, acked; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        *,
        retry_for_s: float,
        window: int = WINDOW,
        max_events: int = MAX_EVENTS,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:
        self._bus = bus
        self._subjects = subjects
        self.retry_for_s = retry_for_s
        self.window = window
        self.max_events = max_events
        self.ack_timeout_s = ack_timeout_s
        # Counters, read by any thread.
        self.acked = 0
        self.failed = 0  # sends the stream did not ack (each sent again, within budget)
        self.lost = 0
        # Emitted, not yet taken by the loop (any thread appends; see Bus.publish).
        self._incoming: deque[_Pending] = deque()
        self._armed = False
        self._closed = False
        # The loop's.
        self._retries: deque[_Pending] = deque()
        self._in_flight: dict[int, _Pending] = {}  # by token, in the order sent
        self._tokens = itertools.count()
        self._inbox = ""
        self._failures = 0  # in a row
        self._paused_until = 0.0
        self._gap: _Pending | None = None  # the audit.gap report in the works
        self._wake: asyncio.Event | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._ack_sub: Subscription | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        # Lost events not yet in a report, counted by emitters and the loop alike.
        self._lock = threading.Lock()
        self._unreported = 0
        self._lost_window: tuple[datetime, datetime] | None = None  # their first and last ts
        self._last_failure = ""

    # Any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._bus.run(self._start())

    def emit(self, event: Event) -> None:
        """Queues `event` for the stream; never waits."""
        item = _Pending(
            self._subjects.event(event.type), encode(event), {"Nats-Msg-Id": event.id}, event.ts
        )
        if self._closed:
            log.error("event %s %s emitted after the event outbox closed", event.type, event.id)
            self._lose(item, "emitted after stop")
            return
        if self.waiting >= self.max_events:
            self._lose(item, f"outbox full ({self.max_events} events waiting)")
            return
        self._incoming.append(item)
        if not self._armed:  # as Bus.publish: append first, then read the flag
            self._armed = True
            self._bus.call_soon(self._on_incoming)

    @property
    def waiting(self) -> int:
        """Events emitted and not yet stored or lost."""
        return len(self._incoming) + len(self._retries) + len(self._in_flight)

    @property
    def settled(self) -> bool:
        """Every event emitted is stored, or lost and its loss reported in the stream."""
        return not self.waiting and self._gap is None and not self._unreported

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Clean stop: waits up to `timeout_s` until every event emitted is stored, then
        stores `orchestrator.stopped` (if they all were; else counts and logs the rest as
        lost, and the next start records the gap). Emitting afterwards loses the event."""
        try:
            if self._bus.run(self._drain(timeout_s), timeout=timeout_s + 5):
                self.emit(OrchestratorStopped(events_lost=self.lost))
                self._bus.run(self._drain(timeout_s), timeout=timeout_s + 5)
        finally:
            self._closed = True
            self._bus.run(self._stop())

    # The loop ------------------------------------------------------------------------------

    async def _start(self) -> None:
        nc = self._bus.nc
        self._inbox = nc.new_inbox() + "."
        self._ack_sub = await nc.subscribe(self._inbox + "*", cb=self._on_ack)
        self._bus.add_connection_listener(self._on_disconnected, self._poke)
        self._wake = asyncio.Event()
        self._pump_task = asyncio.create_task(self._pump())
        self._tick_handle = self._bus.loop.call_later(_TICK_S, self._tick)

    async def _stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
        if self._ack_sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._ack_sub.unsubscribe()

    def _on_incoming(self) -> None:
        self._armed = False
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _pump(self) -> None:
        """The one task sending events: whenever woken, as many as the window allows."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._send_ready()
            except Exception:  # a bug here must not end the outbox
                log.exception("event outbox: sending failed")

    async def _send_ready(self) -> None:
        nc, in_flight = self._bus.nc, self._in_flight
        while len(in_flight) < self.window and nc.is_connected:
            now = time.monotonic()
            if now < self._paused_until:
                return  # the tick wakes the pump again
            item = self._next(now)
            if item is None:
                return
            token = next(self._tokens)
            item.sent = now
            item.first_sent = item.first_sent or now
            in_flight[token] = item
            try:
                await nc.publish(
                    item.subject, item.data, reply=f"{self._inbox}{token}", headers=item.headers
                )
            except (nats.errors.Error, BusError) as exc:
                if in_flight.pop(token, None) is item:
                    self._failed(item, f"publish failed: {exc}")
                return

    def _next(self, now: float) -> _Pending | None:
        """The next event to send: a loss report first, then retries, then new events.
        Retries past their budget are lost on the way."""
        while self._retries and self._expired(self._retries[0], now):
            self._lose(self._retries.popleft(), self._last_failure)
        if self._gap is None and self._unreported:
            self._gap = self._report()
            return self._gap
        if self._retries:
            return self._retries.popleft()
        return self._incoming.popleft() if self._incoming else None

    def _expired(self, item: _Pending, now: float) -> bool:
        return not item.reports and now - item.first_sent > self.retry_for_s

    def _report(self) -> _Pending:
        """The audit.gap event reporting the losses not yet reported (there are some)."""
        with self._lock:
            count, window = self._unreported, self._lost_window
            self._unreported, self._lost_window = 0, None
        assert window is not None  # set with every loss
        since, until = window
        gap = AuditGap(
            cause="not_stored",
            since=since,
            until=until,
            events_lost=count,
            reason=self._last_failure,
        )
        log.error("audit gap: %d events not stored (%s)", count, gap.reason)
        item = _Pending(
            self._subjects.event(gap.type), encode(gap), {"Nats-Msg-Id": gap.id}, gap.ts
        )
        item.reports = count
        return item

    async def _on_ack(self, msg: Msg) -> None:
        try:
            token = int(msg.subject[len(self._inbox) :])
        except ValueError:
            return
        item = self._in_flight.pop(token, None)
        if item is None:
            return  # it timed out already: its retry gets an answer of its own
        refused = _refusal(msg)
        if refused:
            self._failed(item, refused)
        else:
            self.acked += 1
            self._failures = 0
            if item is self._gap:
                self._gap = None
        if self._incoming or self._retries or self._unreported:
            self._poke()

    def _failed(self, item: _Pending, why: str) -> None:
        self.failed += 1
        self._failures += 1
        pause = min(FIRST_PAUSE_S * 2 ** min(self._failures - 1, 16), MAX_PAUSE_S)
        self._paused_until = max(self._paused_until, time.monotonic() + pause)
        self._last_failure = why
        if item.reports:  # the loss report: first in line again
            self._retries.appendleft(item)
        else:
            self._retries.append(item)

    def _on_disconnected(self) -> None:
        """What is in flight will get no ack: sent again, before the retries waiting (the
        loss report still first), once the connection is back (`_poke`)."""
        if not self._in_flight:
            return
        again = [*self._in_flight.values(), *self._retries]
        self.failed += len(self._in_flight)
        self._last_failure = "the connection to NATS dropped"
        self._in_flight.clear()
        self._retries = deque(sorted(again, key=lambda item: not item.reports))

    def _tick(self) -> None:
        """Every _TICK_S: events without an ack for ack_timeout_s failed; the pump woken
        if there is work (after a pause, or a reconnection)."""
        deadline = time.monotonic() - self.ack_timeout_s
        overdue = []
        for token, item in self._in_flight.items():  # in the order sent
            if item.sent > deadline:
                break
            overdue.append(token)
        for token in overdue:
            self._failed(self._in_flight.pop(token), f"no ack within {self.ack_timeout_s:g}s")
        if self._incoming or self._retries or self._unreported:
            self._poke()
        self._tick_handle = self._bus.loop.call_later(_TICK_S, self._tick)

    async def _drain(self, timeout_s: float) -> bool:
        """Waits until every event is stored and every loss reported: True; or, at the
        deadline, counts what is left as lost (logged): False."""
        deadline = time.monotonic() + timeout_s
        self._poke()
        while not self.settled:
            if time.monotonic() > deadline:
                self._give_up()
                return False
            await asyncio.sleep(_DRAIN_POLL_S)
        return True

    def _give_up(self) -> None:
        left = [*self._in_flight.values(), *self._retries, *self._incoming]
        self._in_flight.clear()
        self._retries.clear()
        self._incoming.clear()
        self._gap = None
        events = [item for item in left if not item.reports]
        why = self._last_failure or "no answer"
        for item in events:
            self._lose(item, "not stored when gatefleet stopped")
        log.error(
            "%d events could not be stored before the stop (%s); %d lost in this run",
            len(events),
            why,
            self.lost,
        )

    # Either ---------------------------------------------------------------------------------

    def _lose(self, item: _Pending, why: str) -> None:
        with self._lock:
            self.lost += 1
            self._unreported += 1
            self._last_failure = why
            window = self._lost_window or (item.ts, item.ts)
            self._lost_window = (min(window[0], item.ts), max(window[1], item.ts))


def _refusal(msg: Msg) -> str:
    """Why the stream did not store a message, from its answer; "" if it did."""
    if msg.headers and msg.headers.get("Status") == "503":
        return "no stream answered (no responders)"
    try:
        ack = _decode_ack(msg.data)
    except msgspec.DecodeError:
        return "unreadable ack"
    if ack.error is not None:
        return f"stream refused: {ack.error.description or ack.error.code}"
    return ""


def unclean_stop_gap(last: Event | None, stored_at: datetime) -> AuditGap | None:
    """The audit.gap a start records when the stream's last event (stored at `stored_at`;
    None if it does not decode) is not a clean stop's `orchestrator.stopped`."""
    if isinstance(last, OrchestratorStopped):
        return None
    since = stored_at if last is None else last.ts
    return AuditGap(
        cause="unclean_stop",
        since=since,
        until=utc_now(),
        events_lost=None,
        reason="the previous run ended without a clean stop (killed, or its last events "
        "could not be stored): events it emitted after its last stored one may be missing",
    )
