"""Local health awareness: suspended on loop lag and on a lost connection, with the floors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from actors.health import HealthTracker
from bus.awareness import Awareness, LocalAwareness, watch
from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.timers import TimerWheel
from schemas.settings import HealthSettings
from schemas.wire import Heartbeat
from tests.conftest import wait_until

WALL = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(gateway_id: str) -> HealthTracker:
    """Interval 1 s, fall 3."""
    return HealthTracker(gateway_id, region="us-west", settings=HealthSettings(), threshold=70.0)


def heartbeat(gateway_id: str, seq: int) -> Heartbeat:
    return Heartbeat(
        gateway_id=gateway_id,
        region="us-west",
        seq=seq,
        ts=WALL,
        cpu_percent=0.0,
        memory_percent=0.0,
        active_connections=0,
    )


class Changes:
    """Every snapshot the owner publishes, and an event per condition waited on."""

    def __init__(self) -> None:
        self.seen: list[Awareness] = []
        self._cond = threading.Condition()

    def __call__(self, snapshot: Awareness) -> None:
        with self._cond:
            self.seen.append(snapshot)
            self._cond.notify_all()

    def wait_for(self, what: str, timeout: float) -> Awareness:
        """The first published snapshot that is suspended (`what="suspended"`) or seeing."""
        want = what == "suspended"
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for snapshot in self.seen:
                    if snapshot.suspended == want:
                        return snapshot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not {what} within {timeout}s: {self.seen}")
                self._cond.wait(left)

    def resumed_after_suspension(self, timeout: float) -> Awareness:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                suspended = [i for i, s in enumerate(self.seen) if s.suspended]
                if suspended:
                    for snapshot in self.seen[suspended[0] :]:
                        if not snapshot.suspended:
                            return snapshot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no suspension and resumption: {self.seen}")
                self._cond.wait(left)


# The rules, on a fake clock ----------------------------------------------------------------


def test_a_lag_suspends_and_resumes_without_moving_the_floor() -> None:
    clock = Clock()
    awareness = LocalAwareness(heartbeat_interval_s=1.0, clock=clock)
    assert awareness.lag_threshold_s == 0.5
    awareness.on_lag(clock.now, 0.01)
    assert not awareness.suspended
    assert awareness.snapshot.detection_floor == 1000.0  # from creation on
    assert awareness.now_if_seeing() == 1000.0

    clock.now = 1010.0
    awareness.on_lag(clock.now, 0.8)
    snap = awareness.snapshot
    assert snap.suspended
    assert snap.since == pytest.approx(1009.2)  # from when the loop stopped seeing
    assert snap.reason == "loop lag 800 ms"
    assert snap.suspensions == 1
    assert awareness.now_if_seeing() is None  # a check due now is parked, not dated

    clock.now = 1010.5
    awareness.on_lag(clock.now, 0.6)  # still lagging: same suspension
    assert awareness.snapshot.suspensions == 1
    clock.now = 1010.51
    awareness.on_lag(clock.now, 0.01)
    snap = awareness.snapshot
    assert not snap.suspended
    assert snap.since == 1010.51
    assert snap.suspended_total_s == pytest.approx(1.31)
    # Heartbeats were only delayed: misses count from each gateway's last heartbeat.
    assert snap.detection_floor == 1000.0
    assert awareness.now_if_seeing() == 1010.51


def test_after_a_lag_it_sees_again_only_once_the_backlog_is_read() -> None:
    """The loop's own lag is gone at its first tick after a stall, while what the server
    queued meanwhile is still unread: seeing again waits for a round trip begun after the
    last lagging tick."""
    clock = Clock()
    awareness = LocalAwareness(heartbeat_interval_s=1.0, clock=clock)
    awareness.on_lag(clock.now, 1.5, read_up_to=999.9)
    assert awareness.suspended
    clock.now += 0.01
    awareness.on_lag(clock.now, 0.0, read_up_to=999.9)  # echo of a ping sent before
    assert awareness.suspended
    clock.now += 0.01
    awareness.on_lag(clock.now, 0.3, read_up_to=1000.0)  # sent at the lagging tick
    assert not awareness.suspended
    assert awareness.snapshot.since == 1000.02


def test_a_lag_that_shed_heartbeats_sets_the_floor_at_resume() -> None:
    clock = Clock()
    awareness = LocalAwareness(heartbeat_interval_s=1.0, clock=clock)
    awareness.on_lag(clock.now, 0.8)
    assert awareness.suspended
    assert not awareness.shedding
    clock.now += 1
    awareness.on_lag(clock.now, 2.5)  # more than two intervals behind: heartbeats dropped
    assert awareness.shedding
    clock.now += 1
    awareness.on_lag(clock.now, 1.0)
    assert awareness.suspended
    assert not awareness.shedding
    clock.now += 1
    awareness.on_lag(clock.now, 0.0)
    assert awareness.snapshot.detection_floor == 1003.0  # heartbeats were lost: restart
    assert awareness.snapshot.suspensions == 1

    clock.now += 1  # then a mere lag: the floor stays
    awareness.on_lag(clock.now, 0.9)
    clock.now += 1
    awareness.on_lag(clock.now, 0.0)
    assert awareness.snapshot.detection_floor == 1003.0
    assert awareness.snapshot.suspensions == 2


def test_the_threshold_is_never_above_shedding() -> None:
    """Heartbeats are dropped unread only while suspended, whatever the share."""
    awareness = LocalAwareness(heartbeat_interval_s=1.0, lag_threshold_s=3.0, clock=Clock())
    awareness.on_lag(1000.0, 2.5)
    assert not awareness.shedding
    assert not awareness.suspended
    awareness.on_lag(1000.0, 3.5)
    assert awareness.shedding
    assert awareness.suspended


def test_disconnect_floor_includes_grace_and_outlasts_a_lag() -> None:
    clock = Clock()
    awareness = LocalAwareness(heartbeat_interval_s=2.0, reconnect_grace_s=5.0, clock=clock)
    awareness.on_disconnected()
    clock.now += 3
    awareness.on_lag(clock.now, 1.5)  # lagging too: one suspension, two causes
    assert awareness.snapshot.suspensions == 1
    assert awareness.snapshot.reason == "disconnected, loop lag 1500 ms"
    clock.now += 1
    awareness.on_reconnected()
    assert awareness.suspended  # the loop still lags
    assert awareness.snapshot.reason == "loop lag 1500 ms"
    clock.now += 1
    awareness.on_lag(clock.now, 0.0)
    snap = awareness.snapshot
    assert not snap.suspended
    assert snap.detection_floor == clock.now + 5.0  # the episode included a disconnect
    assert snap.suspended_total_s == pytest.approx(5.0)
    floor = snap.detection_floor

    clock.now += 1  # a short lag inside the grace: the floor does not move back
    awareness.on_lag(clock.now, 1.1)
    awareness.on_lag(clock.now + 0.01, 0.0)
    assert awareness.snapshot.detection_floor == floor
    assert awareness.snapshot.suspensions == 2


def test_short_lags_neither_hide_a_dead_gateway_nor_accuse_a_live_one() -> None:
    """Loop stalls of 2 s (each shorter than (fall + 1/2) x interval = 3.5 s), with 0.6 s
    of seeing between them, for 30 s: every heartbeat sent during a stall is read when it
    ends. Checks are dated at every wheel tick while gatefleet sees (extra checks are
    harmless), as the gateway actors' are. When the floor moved at every resume, the dead
    gateway needed 3.5 s of uninterrupted seeing: never, here."""
    clock = Clock()
    awareness = LocalAwareness(heartbeat_interval_s=1.0, clock=clock)
    dead, live = tracker("dead"), tracker("live")
    dead.on_heartbeats([(heartbeat("dead", 1), 1000.0)], 1000.0, WALL)  # its last
    sent = [1000.3 + k for k in range(30)]  # the live one's, at 1 Hz
    seq = 0
    stalls = [(1001.0 + 2.6 * n, 1003.0 + 2.6 * n) for n in range(11)]  # until 1029
    down_at: float | None = None
    stalled_since: float | None = None
    for step in range(1, 3000):
        now = round(1000.0 + step * 0.01, 2)  # a wheel tick every 10 ms
        stall = next((start for start, end in stalls if start <= now < end), None)
        if stall is not None:  # the loop is stalled: no tick, nothing read, nothing dated
            stalled_since = stall
            continue
        clock.now = now
        if stalled_since is not None:  # the first tick after a stall measures it
            awareness.on_lag(now, now - stalled_since, read_up_to=stalled_since - 0.05)
            stalled_since = None
        else:  # then the backlog is read, and a round trip begun after that comes back
            awareness.on_lag(now, 0.002, read_up_to=now - 0.002)
        while seq < len(sent) and sent[seq] <= now:
            live.on_heartbeats([(heartbeat("live", seq + 1), now)], now, WALL)
            seq += 1
        seen_at = awareness.now_if_seeing()
        if seen_at is None:
            continue
        floor = awareness.snapshot.detection_floor
        assert live.on_tick(seen_at, since=floor) is None, f"live gateway accused at {now}"
        if dead.on_tick(seen_at, since=floor) is not None and down_at is None:
            down_at = now
    assert live.status == "healthy"
    assert awareness.snapshot.suspensions == len(stalls)
    # Down at the first check dated while seeing past 1000 + 3.5 (1003.5, in the seeing
    # window after the first stall): within (fall + 1) x interval of its last heartbeat.
    assert down_at is not None
    assert 1003.5 <= down_at <= 1004.0


# On a real loop -----------------------------------------------------------------------------


@pytest.fixture
def wheel(bus: Bus) -> Iterator[TimerWheel]:
    wheel = TimerWheel(bus.loop)
    wheel.start()
    yield wheel
    wheel.stop()


def test_loop_lag_suspends_then_resumes(
    bus: Bus, wheel: TimerWheel, caplog: pytest.LogCaptureFixture
) -> None:
    awareness = watch(bus, wheel, heartbeat_interval_s=0.4)  # threshold 200 ms
    changes = Changes()
    awareness.add_listener(changes)
    wait_until(lambda: wheel.max_lag_s > 0.0, what="the wheel ticks")
    floor = awareness.snapshot.detection_floor

    blocked_at = time.monotonic()
    wheel.schedule(0.0, time.sleep, 0.3)
    suspended = changes.wait_for("suspended", 5.0)
    assert suspended.reason.startswith("loop lag")
    assert suspended.since >= blocked_at - 0.02
    resumed = changes.resumed_after_suspension(5.0)
    assert resumed.detection_floor == floor  # a mere lag: nothing was lost
    assert resumed.since >= blocked_at + 0.3
    assert 0.2 <= resumed.suspended_total_s < 1.0
    assert resumed.suspensions == 1
    status = awareness.status()
    assert status.orchestrator_max_lag_ms >= 250
    assert status.suspended_s == resumed.suspended_total_s
    messages = [r.getMessage() for r in caplog.records if r.name == "bus.awareness"]
    assert len([m for m in messages if m.startswith("local awareness: suspended")]) == 1, messages
    assert len([m for m in messages if m.startswith("local awareness: resumed after")]) == 1, (
        messages
    )


@pytest.mark.slow
def test_disconnect_suspends_and_reconnect_resumes_with_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = EmbeddedServer(tmp_path / "first", port=0)
    server.start()
    port = int(server.url.rsplit(":", 1)[1])
    bus = Bus(server.url, name="aware")
    bus.start()
    wheel = TimerWheel(bus.loop)
    wheel.start()
    second: EmbeddedServer | None = None
    try:
        awareness = watch(bus, wheel, heartbeat_interval_s=1.0, reconnect_grace_s=5.0)
        changes = Changes()
        awareness.add_listener(changes)

        killed_at = time.monotonic()
        server.stop()
        suspended = changes.wait_for("suspended", 10.0)
        assert suspended.reason == "disconnected"
        assert suspended.since >= killed_at
        assert awareness.suspended

        second = EmbeddedServer(tmp_path / "second", port=port)
        restarted_at = time.monotonic()
        second.start()
        resumed = changes.resumed_after_suspension(20.0)
        assert resumed.since >= restarted_at
        assert resumed.detection_floor == pytest.approx(resumed.since + 5.0)
        assert resumed.suspensions == 1
        assert resumed.suspended_total_s >= resumed.since - restarted_at
        messages = [r.getMessage() for r in caplog.records if r.name == "bus.awareness"]
        assert (
            len([m for m in messages if m.startswith("local awareness: suspended (disconnected)")])
            == 1
        ), messages
        assert len([m for m in messages if m.startswith("local awareness: resumed after")]) == 1, (
            messages
        )
    finally:
        wheel.stop()
        bus.stop()
        if second is not None:
            second.stop()
        server.stop()
