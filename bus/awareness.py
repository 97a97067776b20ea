"""Local health awareness: gatefleet does not blame gateways for what it could not see.

As in HashiCorp's Lifeguard (memberlist's "local health awareness"): before a failure
detector counts a missed heartbeat against a gateway, it asks whether *we* were in a
position to see that heartbeat. We were not while

- our NATS connection was down (nothing reached us), or
- the bus loop lagged by more than `lag_threshold_s` (default: half the heartbeat
  interval): heartbeats sat unread in the socket while timers that check for them were
  due.

During either, gatefleet is *suspended*. When it sees again it sets a *detection floor*:
the monotonic time before which no missed heartbeat may count.

- after a lag: `detection_floor = resume time`;
- after a disconnect: `detection_floor = resume time + reconnect_grace_s` (default 5 s),
  because the gateways' own clients were probably cut off by the same event and reconnect
  on their own schedule.

The floor never moves back.

Where a check is dated
----------------------
A check counts missed intervals from ``max(last_seen, detection_floor)``. It is dated on
the loop, when it falls due (`now_if_seeing`): the date if gatefleet sees then, else None
(the check is parked until it sees again, and dated then; a stalled loop dates nothing).
The gateway actor's worker runs it later, perhaps much later under load: it first takes
every heartbeat waiting for it, which includes every one read before the date (the edge
hands them over on the same loop, before the check was dated), and counts the misses at
that date. So a backlog in the worker pool neither hides a heartbeat from a check nor
turns a check dated while we saw into one we must discard because we were suspended by
the time it ran (with suspensions every few seconds, that could postpone detection
forever).

With actors/health.py's rule (down at the first check at or after ``(fall + 1/2) x
interval`` past the reference) a gateway that really stopped is then declared down within
``reconnect_grace_s + (fall + 1) x interval`` of gatefleet seeing again (plus however long
the pool takes to run the check), and a gateway that kept beating through our outage is
never declared down by it.

Threading: one owner, on the bus loop (`on_lag`, `on_disconnected`, `on_reconnected`,
`now_if_seeing`, listeners). Any thread reads `snapshot` (an immutable `Awareness`,
replaced whole at each change), `status()`, and may `park`. `watch(bus, wheel)` builds one
and wires it to the wheel's lag measure and the bus's connection callbacks.
"""

from __future__ import annotations

import logging
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
        # until the server cuts the connection as a slow consumer. Misses do not count
        # meanwhile (suspended), and probes were shed long before.
        self.shed_lag_s = 2 * heartbeat_interval_s
        self.shedding = False
        self.clock = clock
        now = clock()
        self._snapshot = Awareness(False, now, now, "", 0.0, 0)
        self._causes: dict[str, str] = {}  # cause -> how it reads in `reason`
        self._disconnect_in_episode = False
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
            wheel.add_lag_listener(lambda now, lag: self.on_lag(now, max(lag, inbound.lag_s(now))))

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

    def on_lag(self, now: float, lag_s: float) -> None:
        """Each wheel tick: suspended while the lag exceeds the threshold. The suspension
        is dated from when the loop stopped seeing (`now - lag_s`)."""
        self.shedding = lag_s > self.shed_lag_s
        if lag_s > self.lag_threshold_s:
            self._suspend(LAG, f"loop lag {lag_s * 1000:.0f} ms", now - lag_s)
        elif LAG in self._causes:
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
        grace = self.reconnect_grace_s if self._disconnect_in_episode else 0.0
        self._disconnect_in_episode = False
        floor = max(old.detection_floor, now + grace)
        duration = max(0.0, now - old.since)
        log.info(
            "local awareness: resumed after %.3f s suspended (%s); missed heartbeats count "
            "again in %.1f s",
            duration,
            old.reason,
            floor - now,
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
    loop busy reading an endless stream of heartbeats is not late, but behind).

    On the loop only, but for `lag_s`, which any thread may read."""

    def __init__(self, bus: Bus, wheel: TimerWheel, period_s: float = 0.1) -> None:
        self.bus = bus
        self.wheel = wheel
        self.period_s = period_s
        self.last_s = 0.0  # the last round trip measured
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
        """After a reconnect: a ping lost with the old connection is not a lag."""
        self._sent_at = None
        self.last_s = 0.0

    async def _on_echo(self, _msg: object) -> None:
        if self._sent_at is not None:
            self.last_s = self.wheel.clock() - self._sent_at
            self._sent_at = None


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
