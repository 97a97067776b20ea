"""Prober: latency probes of many gateways over one reply inbox, on the TimerWheel.

`nc.request` costs, per probe: a Task, a Future with a done-callback, an
`asyncio.wait_for` (another timer handle and a cancellation), a fresh NUID token; the
gateway actor then pays a `call_soon_threadsafe` to schedule it and another timer to plan
the next one. At 10,000 gateways probed every 2 s that is 5,000 of each per second. Here
instead:

- ONE subscription, to `<inbox>.*` (`inbox` from `nc.new_inbox()`); each probe is a plain
  publish of `{}` to `P.gw.<id>.ping` with reply subject `<inbox>.<token>`, and a dict
  `token -> probe` finds the probe when the pong comes back;
- ONE recurring wheel timer (every `step_s`, default the wheel's resolution) does all the
  work: applies enroll/withdraw/pause/resume commands, sweeps timed-out probes (they time
  out in the order they were sent, so a deque ordered by deadline is swept from the front;
  answered probes are skipped lazily), and takes every probe that is due from a heap;
- the due probes of a step go out in ONE task (one at a time, in order, as
  `Bus.publish` does), which stamps each probe's send time just before its publish.

Scheduling: each enrolled gateway is probed every `interval_s`, at a fixed phase in the
interval. Phases follow the golden-ratio sequence (k x 0.618... mod 1), so however many
gateways are enrolled, and in whatever order, probes are spread evenly over the interval
instead of bursting. A gateway is never probed again while its previous probe is in flight
(`timeout_s <= interval_s` makes that rare; such a round is counted as `skipped`). After a
stall the schedule skips the rounds it missed instead of sending them all at once.

Results: `on_result(rtt_ms, None)` for a pong that decodes as `schemas.wire.Pong` naming the
probed gateway, else `on_result(None, reason)` with reason `"timeout"`, `"no_responders"`
(the server's status-503 message on the reply subject: nats-py announces no_responders
support in CONNECT), `"bad pong: ..."`, `"pong from <other id>"`, `"status <code>"` or
`"error: ..."` (the publish failed). `on_result` runs on the loop and must not block: make
it a `tell`. Nothing is delivered for a gateway once it is withdrawn (or the prober stopped),
even for a probe already in flight.

Replicas: only the leading replica sends probes (`leading`). With `sharing`
(bus/probe_sharing.py) the leader shares every result it delivers with the other
replicas, and a standby delivers the leader's results (`apply_shared`) to its own
enrolled gateways exactly as its own: the same `on_result`, whatever it thinks of the
gateway meanwhile (paused or not), since the leader delivers its own whatever it thinks.

Threading: `enroll`, `withdraw`, `pause`, `resume` from any thread (commands on a deque,
applied by the next step; an invalid gateway id raises at once in the caller). `start` and
`stop` block the calling thread and must not be called on the loop. `stats()` from any
thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import nats.errors
from nats.aio.msg import Msg

from bus.connection import BusError
from bus.probe_sharing import ProbeSharing
from bus.runtime import SUBSCRIPTION_PENDING_BYTES, SUBSCRIPTION_PENDING_MSGS, Bus
from bus.subjects import Subjects
from bus.timers import TimerHandle, TimerWheel
from schemas.codec import DecodeError, decode
from schemas.replica import ProbeRow
from schemas.wire import Pong

log = logging.getLogger(__name__)

OnResult = Callable[[float | None, str | None], None]

PROBE_BODY = b"{}"  # schemas.wire.Ping, encoded
STATUS_HEADER = "Status"  # where nats-py puts an inline status (nats.js.api.Header.STATUS)
NO_RESPONDERS_STATUS = "503"
GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...: the most evenly spreading phase step
# Commands applied per step, in order: enrolling 10,000 gateways at once takes a few steps
# instead of one long one that would show as loop lag.
COMMANDS_PER_STEP = 500


class ProbeStats(NamedTuple):
    enrolled: int
    in_flight: int
    sent: int
    answered: int  # good pongs
    timed_out: int
    no_responders: int
    bad_answers: int  # undecodable pongs, pongs naming another gateway, other statuses
    errors: int  # publishes that failed
    late: int  # replies after their probe timed out (or was dropped): ignored
    skipped: int  # rounds not sent because the previous probe was still in flight
    shed: int  # rounds not sent because the loop lagged (overload)
    shared: int  # results shared with the other replicas (leading)
    from_leader: int  # the leader's results delivered here (standing by)


class _Gateway:
    __slots__ = ("enrolled", "gateway_id", "in_flight", "on_result", "paused", "subject")

    def __init__(self, gateway_id: str, subject: str, on_result: OnResult) -> None:
        self.gateway_id = gateway_id
        self.subject = subject
        self.on_result = on_result
        self.enrolled = True
        self.paused = False
        self.in_flight: str | None = None  # the token of the probe in flight


class _Probe:
    __slots__ = ("gateway", "sent_at", "token")

    def __init__(self, gateway: _Gateway, token: str) -> None:
        self.gateway = gateway
        self.token = token
        self.sent_at = 0.0


class Prober:
    """Probes enrolled gateways every `interval_s` (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        wheel: TimerWheel,
        subjects: Subjects,
        *,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        step_s: float | None = None,
        shed_lag_s: float = 0.1,
        lag: Callable[[], float] | None = None,
        leading: Callable[[], bool] = lambda: True,
        sharing: ProbeSharing | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be positive")
        if timeout_s > interval_s:
            raise ValueError("timeout_s must not exceed interval_s")
        self.bus = bus
        self.wheel = wheel
        self.subjects = subjects
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.step_s = wheel.resolution_s if step_s is None else step_s
        self.clock = wheel.clock
        self._commands: deque[tuple[str, str, Any]] = deque()  # (verb, gateway id, arg)
        self._gateways: dict[str, _Gateway] = {}
        self._due: list[tuple[float, int, _Gateway]] = []  # heap of (due, seq, gateway)
        self._seq = itertools.count()
        self._phases = itertools.count()
        self._pending: dict[str, _Probe] = {}  # token -> probe in flight
        self._deadlines: deque[tuple[float, str]] = deque()  # (timeout at, token), sent order
        self._outgoing: deque[_Probe] = deque()
        self._sending = False
        self._tokens = itertools.count(1)
        self._inbox = ""
        self._token_at = 0
        self._subscription: Any = None
        self._step_timer: TimerHandle | None = None
        self._next_step = 0.0
        self._epoch = 0.0
        self._running = False
        self.sent = self.answered = self.timed_out = self.no_responders = 0
        self.bad_answers = self.errors = self.late = self.skipped = self.shed = 0
        self.from_leader = 0
        # Above this loop lag no probe is sent (see _take_due).
        self.shed_lag_s = shed_lag_s
        # How far behind gatefleet is (default: the wheel's loop lag).
        self.lag = lag or (lambda: wheel.lag_s)
        # Only the leading replica probes: a gateway is pinged once, not once per replica.
        self.leading = leading
        self.sharing = sharing

    # Life cycle (not on the loop) ---------------------------------------------------------

    def start(self) -> None:
        """Subscribes to the reply inbox (waiting until the server has it), then steps."""

        async def subscribe() -> None:
            nc = self.bus.nc
            self._inbox = nc.new_inbox() + "."
            self._token_at = len(self._inbox)
            self._subscription = await nc.subscribe(
                self._inbox + "*",
                cb=self._on_reply,
                pending_msgs_limit=SUBSCRIPTION_PENDING_MSGS,
                pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
            )
            if self.sharing is not None:
                await self.sharing.open(self.apply_shared)
            await nc.flush()
            self._running = True
            self._epoch = self._next_step = self.clock()
            self._step()

        self.bus.run(subscribe())

    def stop(self) -> None:
        """Stops probing and unsubscribes; probes in flight are dropped without results."""

        async def unsubscribe() -> None:
            self._running = False
            if self._step_timer is not None:
                self._step_timer.cancel()
            self._pending.clear()
            self._deadlines.clear()
            if self.sharing is not None:
                await self.sharing.close()
            if self._subscription is not None:
                await self._subscription.unsubscribe()
                self._subscription = None

        try:
            self.bus.run(unsubscribe())
        except BusError:  # the bus stopped first: nothing left to undo
            self._running = False

    # Any thread ---------------------------------------------------------------------------

    def enroll(self, gateway_id: str, on_result: OnResult) -> None:
        """Probes `gateway_id` every interval from now on (a second enroll replaces
        `on_result` and keeps the schedule)."""
        subject = self.subjects.ping(gateway_id)  # InvalidGatewayId here, in the caller
        self._commands.append(("enroll", gateway_id, (subject, on_result)))

    def withdraw(self, gateway_id: str) -> None:
        """No more probes nor results for `gateway_id` (unknown ids are ignored)."""
        self._commands.append(("withdraw", gateway_id, None))

    def pause(self, gateway_id: str) -> None:
        """Keeps `gateway_id` enrolled, on its schedule, but sends nothing until `resume`."""
        self._commands.append(("pause", gateway_id, None))

    def resume(self, gateway_id: str) -> None:
        self._commands.append(("resume", gateway_id, None))

    def stats(self) -> ProbeStats:
        return ProbeStats(
            enrolled=len(self._gateways),
            in_flight=len(self._pending),
            sent=self.sent,
            answered=self.answered,
            timed_out=self.timed_out,
            no_responders=self.no_responders,
            bad_answers=self.bad_answers,
            errors=self.errors,
            late=self.late,
            skipped=self.skipped,
            shed=self.shed,
            shared=0 if self.sharing is None else self.sharing.shared,
            from_leader=self.from_leader,
        )

    # On the loop --------------------------------------------------------------------------

    def _step(self) -> None:
        self._step_timer = None
        if not self._running:
            return
        now = self.clock()
        if self._commands:
            self._apply_commands(now)
        if self._deadlines:
            self._sweep(now)
        if self._due and self._due[0][0] <= now:
            self._take_due(now)
        self._next_step += self.step_s
        if self._next_step <= now:  # a stall: plan from now, no catch-up steps
            self._next_step = now + self.step_s
        self._step_timer = self.wheel.schedule(self._next_step - self.clock(), self._step)

    def _apply_commands(self, now: float) -> None:
        commands = self._commands
        gateways = self._gateways
        for _ in range(min(len(commands), COMMANDS_PER_STEP)):
            verb, gateway_id, arg = commands.popleft()
            gateway = gateways.get(gateway_id)
            if verb == "enroll":
                subject, on_result = arg
                if gateway is not None:
                    gateway.on_result = on_result
                    continue
                gateway = gateways[gateway_id] = _Gateway(gateway_id, subject, on_result)
                heapq.heappush(self._due, (self._first_due(now), next(self._seq), gateway))
            elif gateway is None:
                continue
            elif verb == "withdraw":
                gateway.enrolled = False  # its heap entry is dropped when it comes up
                del gateways[gateway_id]
            else:
                gateway.paused = verb == "pause"

    def _first_due(self, now: float) -> float:
        """The next time after `now` at this gateway's phase of the interval."""
        interval = self.interval_s
        phase = (next(self._phases) * GOLDEN) % 1.0 * interval
        first = self._epoch + phase
        if first <= now:
            first += math.ceil((now - first) / interval) * interval
        return first

    def _sweep(self, now: float) -> None:
        if self.lag() > self.shed_lag_s:
            # While the loop lags, answers may wait unread in our own socket: no probe
            # times out until it has caught up (local health awareness, for probes).
            return
        deadlines = self._deadlines
        pending = self._pending
        while deadlines and deadlines[0][0] <= now:
            _, token = deadlines.popleft()
            probe = pending.pop(token, None)
            if probe is None:
                continue  # answered already
            self.timed_out += 1
            self._deliver(probe, None, "timeout")

    def _take_due(self, now: float) -> None:
        due = self._due
        interval = self.interval_s
        outgoing = self._outgoing
        tokens = self._tokens
        pending = self._pending
        taken = 0
        leading = self.leading()
        while due and due[0][0] <= now:
            at, _, gateway = due[0]
            if not gateway.enrolled:
                heapq.heappop(due)
                continue
            at += interval
            while at <= now:  # rounds missed in a stall are skipped, not sent in a burst
                at += interval
            heapq.heapreplace(due, (at, next(self._seq), gateway))
            if gateway.paused or not leading:
                continue
            if gateway.in_flight is not None:
                self.skipped += 1
                continue
            if self.lag() > self.shed_lag_s:
                # Overloaded: probes are the first work to shed (the gateway's next
                # heartbeat says as much), and a probe answered late would blame it.
                self.shed += 1
                continue
            token = format(next(tokens), "x")
            probe = _Probe(gateway, token)
            gateway.in_flight = token
            pending[token] = probe
            outgoing.append(probe)
            taken += 1
        if taken and not self._sending:
            self._sending = True
            self.bus.spawn(self._send())

    async def _send(self) -> None:
        """The one task publishing due probes, in order, until there are none left."""
        outgoing = self._outgoing
        deadlines = self._deadlines
        clock = self.clock
        timeout = self.timeout_s
        inbox = self._inbox
        try:
            nc = self.bus.nc
            while outgoing:
                probe = outgoing.popleft()
                if self._pending.get(probe.token) is not probe:
                    continue  # dropped by stop()
                probe.sent_at = sent_at = clock()
                deadlines.append((sent_at + timeout, probe.token))
                try:
                    await nc.publish(probe.gateway.subject, PROBE_BODY, reply=inbox + probe.token)
                except (nats.errors.Error, BusError) as exc:
                    self._pending.pop(probe.token, None)
                    self.errors += 1
                    self._deliver(probe, None, f"error: {exc}")
                else:
                    self.sent += 1
        finally:
            self._sending = False

    async def _on_reply(self, msg: Msg) -> None:
        """The inbox subscription's callback: one dict look-up, one decode, one call."""
        probe = self._pending.pop(msg.subject[self._token_at :], None)
        if probe is None:
            self.late += 1
            return
        rtt_ms = (self.clock() - probe.sent_at) * 1000
        headers = msg.headers
        if headers and STATUS_HEADER in headers:
            status = headers[STATUS_HEADER]
            if status == NO_RESPONDERS_STATUS:
                self.no_responders += 1
                self._deliver(probe, None, "no_responders")
            else:
                self.bad_answers += 1
                self._deliver(probe, None, f"status {status}")
            return
        try:
            pong = decode(msg.data, Pong)  # every bad body is a DecodeError, however deep
        except DecodeError as exc:
            self.bad_answers += 1
            self._deliver(probe, None, f"bad pong: {exc}")
            return
        gateway_id = probe.gateway.gateway_id
        if pong.gateway_id != gateway_id:
            self.bad_answers += 1
            self._deliver(probe, None, f"pong from {pong.gateway_id}")
            return
        self.answered += 1
        self._deliver(probe, rtt_ms, None)

    def apply_shared(self, rows: list[ProbeRow]) -> None:
        """The leader's results (on the loop): each one of a gateway enrolled here goes to
        its `on_result`, as this prober's own would."""
        gateways = self._gateways
        for gateway_id, rtt_ms, reason in rows:
            gateway = gateways.get(gateway_id)
            if gateway is not None:
                self.from_leader += 1
                self._hand(gateway, rtt_ms, reason)

    def _deliver(self, probe: _Probe, rtt_ms: float | None, reason: str | None) -> None:
        gateway = probe.gateway
        if gateway.in_flight == probe.token:
            gateway.in_flight = None
        if not gateway.enrolled:
            return
        if self.sharing is not None:
            self.sharing.record(gateway.gateway_id, rtt_ms, reason)
        self._hand(gateway, rtt_ms, reason)

    @staticmethod
    def _hand(gateway: _Gateway, rtt_ms: float | None, reason: str | None) -> None:
        try:
            gateway.on_result(rtt_ms, reason)
        except Exception:
            log.exception("probe result handler of %s failed", gateway.gateway_id)
