"""Local health awareness: suspended on loop lag and on a lost connection, with the floors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.awareness import Awareness, LocalAwareness, watch
from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.timers import TimerWheel
from tests.conftest import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_lag_suspends_and_resumes_with_floor_at_resume_time() -> None:
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
    assert snap.detection_floor == 1010.51
    assert snap.since == 1010.51
    assert snap.suspended_total_s == pytest.approx(1.31)
    assert awareness.now_if_seeing() == 1010.51


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

    blocked_at = time.monotonic()
    wheel.schedule(0.0, time.sleep, 0.3)
    suspended = changes.wait_for("suspended", 5.0)
    assert suspended.reason.startswith("loop lag")
    assert suspended.since >= blocked_at - 0.02
    resumed = changes.resumed_after_suspension(5.0)
    assert resumed.detection_floor == resumed.since  # after lag: the resume time itself
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
