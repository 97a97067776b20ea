"""Prober against a real nats-server: rtt, timeout, no responders, bad pongs, 1,000 gateways."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bus.probes import Prober
from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from bus.subjects import InvalidGatewayId, Subjects
from bus.timers import TimerWheel
from schemas.codec import encode
from schemas.wire import Pong
from tests.conftest import wait_until

Result = tuple[float | None, str | None]


class Results:
    """Every result per gateway, with the time it arrived; waits on a condition."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.by_gateway: dict[str, list[tuple[float, float | None, str | None]]] = (
            collections.defaultdict(list)
        )

    def callback(self, gateway_id: str) -> Callable[[float | None, str | None], None]:
        def on_result(rtt_ms: float | None, reason: str | None) -> None:
            with self._cond:
                self.by_gateway[gateway_id].append((time.monotonic(), rtt_ms, reason))
                self._cond.notify_all()

        return on_result

    def of(self, gateway_id: str) -> list[Result]:
        with self._cond:
            return [(rtt, reason) for _, rtt, reason in self.by_gateway[gateway_id]]

    def count(self, gateway_id: str) -> int:
        with self._cond:
            return len(self.by_gateway[gateway_id])

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    counts = {k: len(v) for k, v in list(self.by_gateway.items())[:10]}
                    raise AssertionError(f"results not in within {timeout}s: {counts}")
                self._cond.wait(left)

    def wait_for(self, gateway_id: str, n: int, timeout: float = 10.0) -> list[Result]:
        self.wait(lambda: len(self.by_gateway[gateway_id]) >= n, timeout)
        return self.of(gateway_id)


class Responder:
    """Gateways on another connection: one wildcard subscription answering pings.

    `silent-*` never answers, `bad-json` answers garbage, `too-deep` JSON nested past any
    decoder, `not-utf8` bytes that are not UTF-8, `liar` names someone else."""

    def __init__(self, server: EmbeddedServer, prefix: str) -> None:
        self.bus = Bus(server.url, name="responder")
        self.bus.start()
        self.pings: dict[str, list[float]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self.bus.subscribe(f"{prefix}.gw.*.ping", self._on_ping)

    def _on_ping(self, msg: Inbound) -> None:
        gateway_id = msg.subject.split(".")[-2]
        with self._lock:
            self.pings[gateway_id].append(time.monotonic())
        if gateway_id.startswith("silent"):
            return
        if gateway_id == "bad-json":
            self.bus.publish(msg.reply, b"not json")
        elif gateway_id == "too-deep":
            self.bus.publish(msg.reply, b'{"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}")
        elif gateway_id == "not-utf8":
            self.bus.publish(msg.reply, b'{"gateway_id": "\xff"}')
        elif gateway_id == "liar":
            self.bus.publish(msg.reply, Pong(gateway_id="someone-else"))
        else:
            self.bus.publish(msg.reply, encode(Pong(gateway_id=gateway_id)))

    def pinged(self, gateway_id: str) -> int:
        with self._lock:
            return len(self.pings[gateway_id])

    def all_ping_times(self) -> list[float]:
        with self._lock:
            return sorted(t for times in self.pings.values() for t in times)


@pytest.fixture
def wheel(bus: Bus) -> Iterator[TimerWheel]:
    wheel = TimerWheel(bus.loop)
    wheel.start()
    yield wheel
    wheel.stop()


@pytest.fixture
def responder(nats_server: EmbeddedServer, prefix: str) -> Iterator[Responder]:
    responder = Responder(nats_server, prefix)
    yield responder
    responder.bus.stop()


ProberFactory = Callable[..., Prober]


@pytest.fixture
def make_prober(bus: Bus, wheel: TimerWheel, prefix: str) -> Iterator[ProberFactory]:
    started: list[Prober] = []

    def make(*, interval_s: float, timeout_s: float, subjects: Subjects | None = None) -> Prober:
        prober = Prober(
            bus, wheel, subjects or Subjects(prefix), interval_s=interval_s, timeout_s=timeout_s
        )
        prober.start()
        started.append(prober)
        return prober

    yield make
    for prober in started:
        prober.stop()


def test_answered_probes_give_rtt(make_prober: ProberFactory, responder: Responder) -> None:
    prober = make_prober(interval_s=0.2, timeout_s=0.2)
    results = Results()
    for gateway_id in ("gw-a", "gw-b"):
        prober.enroll(gateway_id, results.callback(gateway_id))
    for gateway_id in ("gw-a", "gw-b"):
        for rtt, reason in results.wait_for(gateway_id, 3):
            assert reason is None
            assert rtt is not None
            assert 0 < rtt < 200
    stats = prober.stats()
    assert stats.enrolled == 2
    assert stats.answered >= 6
    assert stats.timed_out == stats.no_responders == stats.bad_answers == stats.errors == 0
    with pytest.raises(InvalidGatewayId):
        prober.enroll("no.dots", results.callback("no.dots"))


def test_a_gateway_that_never_answers_times_out(
    make_prober: ProberFactory, responder: Responder
) -> None:
    prober = make_prober(interval_s=0.3, timeout_s=0.2)
    results = Results()
    prober.enroll("silent-1", results.callback("silent-1"))
    assert results.wait_for("silent-1", 2)[:2] == [(None, "timeout"), (None, "timeout")]
    first_ping = responder.pings["silent-1"][0]
    first_result = results.by_gateway["silent-1"][0][0]
    assert first_result - first_ping >= 0.2 - 0.005  # never before the timeout (clock jitter)
    assert first_result - first_ping < 0.2 + 0.15
    assert prober.stats().timed_out >= 2


def test_no_subscriber_is_no_responders_quickly(make_prober: ProberFactory, prefix: str) -> None:
    prober = make_prober(interval_s=2.0, timeout_s=2.0, subjects=Subjects(f"{prefix}-nobody"))
    results = Results()
    prober.enroll("nobody", results.callback("nobody"))
    wait_until(lambda: prober.stats().sent >= 1, timeout=5.0, what="the probe is sent")
    sent_seen = time.monotonic()
    assert results.wait_for("nobody", 1, timeout=1.0) == [(None, "no_responders")]
    assert results.by_gateway["nobody"][0][0] - sent_seen < 0.5  # the timeout is 2 s
    stats = prober.stats()
    assert stats.no_responders == 1
    assert stats.timed_out == 0


def test_bad_pongs_are_failures_with_a_reason(
    make_prober: ProberFactory, responder: Responder
) -> None:
    prober = make_prober(interval_s=0.2, timeout_s=0.2)
    results = Results()
    prober.enroll("bad-json", results.callback("bad-json"))
    prober.enroll("liar", results.callback("liar"))
    [(rtt, reason)] = results.wait_for("bad-json", 1)[:1]
    assert rtt is None
    assert reason is not None
    assert reason.startswith("bad pong: ")
    assert results.wait_for("liar", 1)[0] == (None, "pong from someone-else")
    assert prober.stats().bad_answers >= 2


def test_pongs_too_deep_or_not_utf8_are_bad_answers_and_probing_goes_on(
    make_prober: ProberFactory, responder: Responder
) -> None:
    """Found by the fuzz: such a pong raised out of the reply callback, uncounted, and the
    gateway's probe stayed in flight forever (every later round skipped)."""
    prober = make_prober(interval_s=0.1, timeout_s=0.1)
    results = Results()
    for gateway_id in ("too-deep", "not-utf8"):
        prober.enroll(gateway_id, results.callback(gateway_id))
    for gateway_id in ("too-deep", "not-utf8"):
        outcomes = results.wait_for(gateway_id, 3)
        assert all(
            rtt is None and (reason or "").startswith("bad pong: ") for rtt, reason in outcomes
        )
    stats = prober.stats()
    assert stats.bad_answers >= 6
    assert stats.skipped == 0


@pytest.mark.slow
def test_a_thousand_gateways_all_answered_and_spread_over_time(
    make_prober: ProberFactory, responder: Responder, bus: Bus
) -> None:
    interval = 0.5
    prober = make_prober(interval_s=interval, timeout_s=interval)
    results = Results()
    ids = [f"gw-{i:04d}" for i in range(1000)]
    for gateway_id in ids:
        prober.enroll(gateway_id, results.callback(gateway_id))
    started = time.monotonic()
    results.wait(lambda: all(len(results.by_gateway[g]) >= 3 for g in ids), timeout=20.0)

    failures = [(g, r) for g in ids for r in results.of(g) if r[1] is not None]
    assert not failures, failures[:5]
    assert prober.stats().in_flight <= 1000

    # Every gateway was pinged about once in a steady interval...
    times = [
        t for t in responder.all_ping_times() if started + interval <= t < started + 2 * interval
    ]
    assert len(times) >= 900, len(times)

    # ... at its own phase of the interval: the rounds planned, in 50 ms bins, hold about
    # 100 each. (Taken from the plan, not from arrival times: on a busy machine a stalled
    # loop, the responder's or the prober's, bunches pings whatever the plan says.)
    async def planned() -> list[float]:
        return [at for at, _, gateway in prober._due if gateway.enrolled]

    due = bus.run(planned())
    assert len(due) == 1000
    # Each gateway's phase (a late step may not have moved every round on yet).
    phases = [(at - min(due)) % interval for at in due]
    bins = collections.Counter(int(phase / 0.05) for phase in phases)
    per_bin = [bins[i] for i in range(int(interval / 0.05))]
    assert max(per_bin) <= 170, per_bin
    assert min(per_bin) >= 30, per_bin


def test_withdraw_and_pause_stop_probing(make_prober: ProberFactory, responder: Responder) -> None:
    prober = make_prober(interval_s=0.1, timeout_s=0.1)
    results = Results()
    for gateway_id in ("gw-keep", "gw-gone", "gw-paused"):
        prober.enroll(gateway_id, results.callback(gateway_id))
    for gateway_id in ("gw-keep", "gw-gone", "gw-paused"):
        results.wait_for(gateway_id, 2)

    prober.withdraw("gw-gone")
    prober.pause("gw-paused")
    wait_until(lambda: prober.stats().enrolled == 2, what="the withdrawal is applied")
    # A probe sent just before the commands were applied may still be answered: let the
    # kept gateway go through a few rounds first, then take the counts.
    keep = results.count("gw-keep")
    results.wait_for("gw-keep", keep + 2)
    gone_pings, paused_pings = responder.pinged("gw-gone"), responder.pinged("gw-paused")
    gone_results = results.count("gw-gone")
    keep = results.count("gw-keep")
    results.wait_for("gw-keep", keep + 5)
    assert responder.pinged("gw-gone") == gone_pings
    assert responder.pinged("gw-paused") == paused_pings
    assert results.count("gw-gone") == gone_results

    paused_results = results.count("gw-paused")
    prober.resume("gw-paused")
    assert results.wait_for("gw-paused", paused_results + 2)[-1][1] is None
