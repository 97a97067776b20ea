"""Local health awareness: gatefleet does not blame gateways for what it could not see.

As in HashiCorp's Lifeguard (memberlist's "local health awareness"): before a failure
detector counts a missed heartbeat against a gateway, it asks whether *we* were in a
position to see that heartbeat. We were not while

- our NATS connection was down (nothing reached us), or
- we lagged by more than `lag_threshold_s` (default: half the heartbeat interval): the
  worse of the loop's own lag (the timer wheel's) and the round trip of a message we send
  ourselves through the server (`InboundLag`): heartbeats sat unread while the timers
  that check for them were due.

During either, gatefleet is *suspended*: no check counts. It sees again when the cause is
gone and, after a lag, once a round trip begun after the last lagging tick has come back
within the threshold: that echo is read after everything the server queued for us before
it, so the backlog the lag left in the socket and the server has been read too (the
loop's own lag is back to nothing as soon as the loop runs again, long before that).

The detection floor
-------------------
When it sees again it may set a *detection floor*, the monotonic time before which no
missed heartbeat counts; it never moves back. A check counts missed intervals from
``max(last_seen, detection_floor)``.

- after a disconnect: `resume time + reconnect_grace_s` (default 5 s): heartbeats sent
  meanwhile were lost, and the gateways' own clients were probably cut off by the same
  event and reconnect on their own schedule;
- after a lag during which the edge shed heartbeats unread (`shedding`: behind by more
  than two intervals, see actors/routes.py): `resume time`, since heartbeats were lost
  (the edge's other shedding, the oldest of one gateway's waiting heartbeats, keeps the
  newest: a check loses nothing by it);
- after any other lag: the floor does not move. Heartbeats were only delayed, not lost,
  and once we see again they have all been read, up to what is still in flight within
  the threshold. That is the same delay a check tolerates at any time while we see:
  actors/health.py declares a gateway down at ``(fall + 1/2) x interval`` past its last
  heartbeat, so a live gateway survives any delay below ``(fall - 1/2) x interval``,
  and what a seeing gatefleet has not read yet reached the server at most about three
  thresholds plus a ping period (100 ms) ago, 1.6 s with the defaults against 2.5 s
  (and much less in practice: that is a lag, a round trip and a ping's lateness all at
  the threshold). A `lag_suspend_share` near ``(fall - 1/2) / 3`` would void that, with
  or without a floor, and so would a gateway's own delay in sending.
  Moving the floor at every lag as well would buy nothing more and cost
  detection: each short suspension restarted every gateway's clock, so with lag
  hovering around the threshold a gateway that had really stopped would need ``(fall +
  1/2) x interval`` of *uninterrupted* seeing, and could go undetected for minutes.

Where a check is dated
----------------------
A check is dated on the loop, when it falls due (`now_if_seeing`): the date if gatefleet
sees then, else None (the check is parked until it sees again, and dated then). The
gateway actor's worker runs it later, perhaps much later under load: it first takes every
heartbeat waiting for it, which includes every one read before the date (the edge hands
them over on the same loop, before the check was dated), and counts the misses at that
date. So a backlog in the worker pool neither hides a heartbeat from a check nor turns a
check dated while we saw into one we must discard because we were suspended by the time
it ran (with suspensions every few seconds, that could postpone detection forever).

The guarantee: a gateway that really stopped is declared down by the first check dated
while gatefleet sees, at or after ``max(last heartbeat, detection_floor) + (fall + 1/2) x
interval``: within ``reconnect_grace_s + (fall + 1) x interval`` of seeing again after a
disconnect, and at once on seeing again after a mere lag if it was overdue (plus however
long the pool takes to run the check). A gateway that kept beating through our outage is
not declared down by it.

Threading: one owner, on the bus loop (`on_lag`, `on_disconnected`, `on_reconnected`,
`now_if_seeing`, listeners). Any thread reads `snapshot` (an immutable `Awareness`,
replaced whole at each change), `status()`, and may `park`. `watch(bus, wheel)` builds one
and wires it to the wheel's lag measure and the bus's connection callbacks.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from bus.runtime import Bus
    from bus.timers import TimerWheel

log = logging.getLogger(__name__)

DEFAULT_RECONNECT_GRACE_S = 5.0

DISCONNECTED = "disconnected"
LAG = "loop lag"


class Awareness(NamedTuple):
    """One immutable view of local health (monotonic times, seconds)."""

    suspended: bool
    since: float  # when the current state (suspended or seeing) began
    detection_floor: float  # no missed heartbeat before this counts
    reason: str  # why suspended ("disconnected", "loop lag 312 ms", both); "" when seeing
    suspended_total_s: float  # time spent suspended in finished suspensions
    suspensions: int  # how many suspensions began (the current one included)

    def suspended_s(self, now: float) -> float:
        """Total time suspended, the current suspension up to `now` included."""
        if self.suspended:
            return self.suspended_total_s + max(0.0, now - self.since)
        return self.suspended_total_s


class AwarenessStatus(NamedTuple):
    """What a status reply shows."""

    orchestrator_lag_ms: float
    orchestrator_max_lag_ms: float
    suspended: bool
    suspended_s: float
    suspensions: int
    reason: str


Listener = Callable[[Awareness], None]


class LocalAwareness:
    """The owner of the `Awareness` snapshot (see the module docstring)."""

    def __init__(
        self,
        *,
        heartbeat_interval_s: float = 1.0,
        lag_threshold_s: float | None = None,
        reconnect_grace_s: float = DEFAULT_RECONNECT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lag_threshold_s = (
            heartbeat_interval_s / 2 if lag_threshold_s is None else lag_threshold_s
        )
        self.reconnect_grace_s = reconnect_grace_s
        # Behind by more than two heartbeat intervals (a backlog, not a burst): the edge
        # drops heartbeats of known gateways unread rather than fall further behind
        # until the server cuts the connection as a slow consumer. Never below the
        # threshold: heartbeats are lost only while suspended (and probes were shed long
        # before).
        self.shed_lag_s = max(2 * heartbeat_interval_s, self.lag_threshold_s)
        self.shedding = False
        self.clock = clock
        now = clock()
        self._snapshot = Awareness(False, now, now, "", 0.0, 0)
        self._causes: dict[str, str] = {}  # cause -> how it reads in `reason`
        # What the suspension under way lost, which decides the floor at its end.
        self._disconnect_in_episode = False
        self._shed_in_episode = False
        self._lagging_at = -math.inf  # the last tick that measured a lag over the threshold
        self._listeners: list[Listener] = []
        self._wheel: TimerWheel | None = None
        self._inbound: InboundLag | None = None
        self._parked: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()

    # Readers, any thread ----------------------------------------------------------------

    @property
    def snapshot(self) -> Awareness:
        return self._snapshot

    @property
    def suspended(self) -> bool:
        return self._snapshot.suspended

    def status(self, now: float | None = None) -> AwarenessStatus:
        now = self.clock() if now is None else now
        snapshot = self._snapshot
        wheel = self._wheel
        return AwarenessStatus(
            orchestrator_lag_ms=self.lag_s() * 1000,
            orchestrator_max_lag_ms=wheel.max_lag_s * 1000 if wheel else 0.0,
            suspended=snapshot.suspended,
            suspended_s=snapshot.suspended_s(now),
            suspensions=snapshot.suspensions,
            reason=snapshot.reason,
        )

    def park(self, fn: Callable[..., object], *args: object) -> bool:
        """Calls `fn(*args)` on the loop when gatefleet sees again, instead of a check
        that would find it still suspended: a fleet's detection timers stay parked, not
        polling, through a suspension. Any thread. False if it is not suspended (any
        more): the caller plans a check now itself."""
        self._parked.append((fn, args))
        return self._snapshot.suspended

    # Wiring -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """`listener(Awareness)` on the loop after each change. A test hook (tests wait on
        a change with it): gatefleet itself reads `snapshot` and parks checks instead."""
        self._listeners = [*self._listeners, listener]

    def attach_wheel(self, wheel: TimerWheel, inbound: InboundLag | None = None) -> None:
        """Lag from now on: the wheel's (the loop runs late) or, when given, the inbound
        round trip's (messages wait unread), whichever is worse."""
        self._wheel = wheel
        self._inbound = inbound
        if inbound is None:
            wheel.add_lag_listener(self.on_lag)
        else:
            wheel.add_lag_listener(
                lambda now, lag: self.on_lag(now, max(lag, inbound.lag_s(now)), inbound.read_up_to)
            )

    def lag_s(self) -> float:
        """The worse of the loop's lag and the inbound round trip, now (any thread)."""
        wheel, inbound = self._wheel, self._inbound
        loop = wheel.lag_s if wheel is not None else 0.0
        return max(loop, inbound.lag_s()) if inbound is not None else loop

    # The owner, on the loop -------------------------------------------------------------

    def now_if_seeing(self) -> float | None:
        """The date of a check that falls due now: now if gatefleet sees, else None. On
        the loop only (at a wheel tick, after its lag was heard, or when parked calls
        run), where the snapshot is current: a stalled loop dates nothing."""
        return None if self._snapshot.suspended else self.clock()

    def on_lag(self, now: float, lag_s: float, read_up_to: float = math.inf) -> None:
        """Each wheel tick: suspended while the lag exceeds the threshold (dated from when
        the loop stopped seeing, `now - lag_s`); seeing again once it no longer does and
        everything sent to us since the last lagging tick has been read (`read_up_to`:
        the inbound measure's, see `InboundLag`; inf without one)."""
        self.shedding = lag_s > self.shed_lag_s
        self._shed_in_episode |= self.shedding
        if lag_s > self.lag_threshold_s:
            self._lagging_at = now
            self._suspend(LAG, f"loop lag {lag_s * 1000:.0f} ms", now - lag_s)
        elif LAG in self._causes and read_up_to >= self._lagging_at:
            self._resume(LAG, now)

    def on_disconnected(self) -> None:
        self._disconnect_in_episode = True
        self._suspend(DISCONNECTED, DISCONNECTED, self.clock())

    def on_reconnected(self) -> None:
        self._resume(DISCONNECTED, self.clock())

    def _suspend(self, cause: str, text: str, since: float) -> None:
        causes = self._causes
        if causes.get(cause) == text:
            return
        was_suspended = bool(causes)
        causes[cause] = text
        old = self._snapshot
        reason = ", ".join(causes.values())
        if was_suspended:  # another cause, or a new lag figure: no new suspension
            self._publish(old._replace(reason=reason))
            return
        since = max(since, old.since)  # a retroactive start never overlaps the last state
        log.warning(
            "local awareness: suspended (%s): missed heartbeats do not count until we see again",
            reason,
        )
        self._publish(
            old._replace(
                suspended=True, since=since, reason=reason, suspensions=old.suspensions + 1
            )
        )

    def _resume(self, cause: str, now: float) -> None:
        causes = self._causes
        if causes.pop(cause, None) is None:
            return
        old = self._snapshot
        if causes:  # still suspended for another cause
            self._publish(old._replace(reason=", ".join(causes.values())))
            return
        floor = old.detection_floor  # a mere lag: heartbeats were delayed, not lost
        if self._disconnect_in_episode:
            floor = max(floor, now + self.reconnect_grace_s)
        elif self._shed_in_episode:
            floor = max(floor, now)
        self._disconnect_in_episode = self._shed_in_episode = False
        duration = max(0.0, now - old.since)
        log.info(
            "local awareness: resumed after %.3f s suspended (%s); missed heartbeats count "
            "again in %.1f s",
            duration,
            old.reason,
            max(0.0, floor - now),
        )
        self._publish(
            Awareness(
                suspended=False,
                since=now,
                detection_floor=floor,
                reason="",
                suspended_total_s=old.suspended_total_s + duration,
                suspensions=old.suspensions,
            )
        )

    def _publish(self, snapshot: Awareness) -> None:
        self._snapshot = snapshot
        if not snapshot.suspended:  # published first: a late park() sees it, checks itself
            parked = self._parked
            for _ in range(len(parked)):
                fn, args = parked.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception("parked call %r failed", fn)
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("awareness listener %r failed", listener)


class InboundLag:
    """How long what reaches gatefleet waits unread: a message sent to ourselves through
    the server every `period_s`, timed on its way back. The loop's own lag says when the
    loop runs late; this also sees a backlog in the socket and the server's buffers (the
    loop busy reading an endless stream of heartbeats is not late, but behind). The
    server sends us what it has for us in order, so when an echo is read, everything the
    server queued for us before that ping has been read too (`read_up_to`).

    On the loop only, but for `lag_s`, which any thread may read."""

    def __init__(self, bus: Bus, wheel: TimerWheel, period_s: float = 0.1) -> None:
        self.bus = bus
        self.wheel = wheel
        self.period_s = period_s
        self.last_s = 0.0  # the last round trip measured
        # When that round trip began: all the server queued for us before it has been read.
        self.read_up_to = -math.inf
        self._sent_at: float | None = None  # the round trip under way, if any
        self._subject = ""

    def start(self) -> None:
        """Subscribes (blocks the caller until the server has it), then pings."""

        async def subscribe() -> None:
            nc = self.bus.nc
            self._subject = nc.new_inbox()
            await nc.subscribe(self._subject, cb=self._on_echo)
            await nc.flush()

        self.bus.run(subscribe())
        self.wheel.schedule(self.period_s, self._ping)

    def lag_s(self, now: float | None = None) -> float:
        """The last round trip, or the one under way if it is already longer."""
        sent = self._sent_at
        if sent is None:
            return self.last_s
        return max(self.last_s, (self.wheel.clock() if now is None else now) - sent)

    def _ping(self) -> None:
        if self._sent_at is None and self.bus.nc.is_connected:
            self._sent_at = self.wheel.clock()
            self.bus.spawn(self.bus.nc.publish(self._subject, b""))
        self.wheel.schedule(self.period_s, self._ping)

    def reset(self) -> None:
        """After a reconnect: a ping lost with the old connection is not a lag (and one
        that came back on it says nothing of the new one)."""
        self._sent_at = None
        self.last_s = 0.0
        self.read_up_to = -math.inf

    async def _on_echo(self, _msg: object) -> None:
        if self._sent_at is not None:
            self.last_s = self.wheel.clock() - self._sent_at
            self.read_up_to, self._sent_at = self._sent_at, None


def watch(
    bus: Bus,
    wheel: TimerWheel,
    *,
    heartbeat_interval_s: float = 1.0,
    lag_threshold_s: float | None = None,
    reconnect_grace_s: float = DEFAULT_RECONNECT_GRACE_S,
) -> LocalAwareness:
    """A `LocalAwareness` fed by `wheel`'s lag measure and `bus`'s connection callbacks.
    The wheel's clock is used, so floors compare with the times the wheel reports."""
    awareness = LocalAwareness(
        heartbeat_interval_s=heartbeat_interval_s,
        lag_threshold_s=lag_threshold_s,
        reconnect_grace_s=reconnect_grace_s,
        clock=wheel.clock,
    )
    inbound = InboundLag(bus, wheel)
    inbound.start()
    awareness.attach_wheel(wheel, inbound)

    def on_reconnected() -> None:
        inbound.reset()
        awareness.on_reconnected()

    bus.add_connection_listener(awareness.on_disconnected, on_reconnected)
    return awareness
