"""LogThrottle: one line per kind per interval, and the count of those held back."""

from __future__ import annotations

from bus.log_throttle import LogThrottle, held_back
from bus.server import complaint_kind


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_per_interval_then_the_count_held_back() -> None:
    clock = FakeClock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.admit("is flapping") == 0
    assert [throttle.admit("is flapping") for _ in range(3)] == [None, None, None]
    # Another kind has its own budget.
    assert throttle.admit("stopped flapping") == 0
    clock.now += 9.9
    assert throttle.admit("is flapping") is None
    clock.now += 0.1
    assert throttle.admit("is flapping") == 4
    assert throttle.admit("stopped flapping") == 0
    clock.now += 10
    assert throttle.admit("is flapping") == 0


def test_the_suffix_names_the_lines_held_back_only_when_there_were_some() -> None:
    assert held_back(0) == ""
    assert held_back(4) == " (4 more like it since the last one, not logged)"


def test_a_server_complaint_is_throttled_by_its_kind_not_by_its_client() -> None:
    lines = [
        b'[6935] 2026/12/01 10:14:22.908376 [ERR] 127.0.0.1:57030 - cid:5 - authentication error - User "x"',
        b'[6935] 2026/12/01 10:14:23.1 [ERR] 127.0.0.1:57031 - cid:6 - "v2.16.0:python:sim" - authentication error',
    ]
    assert {complaint_kind(line) for line in lines} == {"authentication error"}
    assert complaint_kind(b"[1] 2026/12/01 10:00:00.0 [FTL] Error listening on port: 4222") == (
        "Error listening on port"
    )
