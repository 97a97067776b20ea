"""PooledActor on Pool, OwnThread and OnLoop: ordering, exclusion, failures, the latest
lane, fairness and shutdown, with real threads. Tests wait on events and futures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any, cast

import pykka
import pytest

from actors.dispatch import OnLoop, OwnThread, Pool, PooledActor, PooledInbox

WAIT = 10.0


@pytest.fixture
def pool() -> Iterator[Pool]:
    before = set(threading.enumerate())
    pool = Pool("test", workers=2)
    pool.start()
    yield pool
    pykka.ActorRegistry.stop_all(block=True, timeout=WAIT)
    pool.stop(timeout=WAIT)
    assert set(threading.enumerate()) <= before, "the pool left threads behind"


class Recorder(PooledActor):
    """Records what it receives; replies to asks with the list so far."""

    def __init__(self, dispatcher: Pool | OnLoop, expect: int = 0) -> None:
        super().__init__(dispatcher=dispatcher)
        self.seen: list[Any] = []
        self.expect = expect
        self.done = threading.Event()
        self.started_on = ""
        self.stopped = threading.Event()

    def on_start(self) -> None:
        self.started_on = threading.current_thread().name

    def on_receive(self, message: Any) -> Any:
        if message == "seen":
            return list(self.seen)
        if message == "boom":
            raise ValueError("boom")
        self.seen.append(message)
        if len(self.seen) == self.expect:
            self.done.set()
        return message

    def on_stop(self) -> None:
        self.stopped.set()


def actor_of(ref: pykka.ActorRef[Any]) -> Any:
    inbox = ref.actor_inbox
    assert isinstance(inbox, PooledInbox)
    return inbox.actor


def test_ask_tell_stop_is_alive(pool: Pool) -> None:
    ref = Recorder.start(pool)
    ref.tell("a")
    assert ref.ask("b", timeout=WAIT) == "b"
    assert ref.ask("seen", timeout=WAIT) == ["a", "b"]
    assert actor_of(ref).started_on.startswith("test-")
    assert ref.is_alive()
    assert ref in pykka.ActorRegistry.get_all()
    assert ref.stop(timeout=WAIT) is True
    assert not ref.is_alive()
    assert actor_of(ref).stopped.is_set()
    assert ref not in pykka.ActorRegistry.get_all()
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("late")
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("late", timeout=WAIT)
    assert ref.stop(timeout=WAIT) is False


def test_ask_error_goes_to_caller_and_actor_lives(pool: Pool) -> None:
    ref = Recorder.start(pool)
    with pytest.raises(ValueError, match="boom"):
        ref.ask("boom", timeout=WAIT)
    assert ref.ask("x", timeout=WAIT) == "x"


def test_fifo_per_actor_under_concurrent_senders(pool: Pool) -> None:
    senders, each = 4, 2000
    refs = [Recorder.start(pool, expect=senders * each) for _ in range(3)]
    go = threading.Event()

    def send(sender: int) -> None:
        go.wait(WAIT)
        for i in range(each):
            for ref in refs:
                ref.tell((sender, i))

    threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(WAIT)
    for ref in refs:
        actor = actor_of(ref)
        assert actor.done.wait(WAIT)
        for sender in range(senders):
            mine = [i for s, i in actor.seen if s == sender]
            assert mine == list(range(each))


class OverlapDetector(PooledActor):
    def __init__(self, dispatcher: Pool, expect: int) -> None:
        super().__init__(dispatcher=dispatcher)
        self.inside = 0
        self.overlaps = 0
        self.count = 0
        self.expect = expect
        self.done = threading.Event()

    def on_receive(self, message: Any) -> None:
        self.inside += 1
        if self.inside != 1:
            self.overlaps += 1
        for _ in range(50):  # long enough for the GIL to switch mid-handler
            pass
        self.inside -= 1
        self.count += 1
        if self.count == self.expect:
            self.done.set()


def test_never_two_messages_of_one_actor_at_once() -> None:
    before = set(threading.enumerate())
    pool = Pool("overlap", workers=4, throughput=1)  # re-queued after every message
    pool.start()
    try:
        refs = [OverlapDetector.start(pool, expect=4 * 3000) for _ in range(2)]

        def send() -> None:
            for i in range(3000):
                for ref in refs:
                    ref.tell(i)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        for ref in refs:
            actor = actor_of(ref)
            assert actor.done.wait(WAIT)
            assert actor.overlaps == 0
        pykka.ActorRegistry.stop_all(block=True, timeout=WAIT)
    finally:
        pool.stop(timeout=WAIT)
    assert set(threading.enumerate()) <= before


class Counter(PooledActor):
    all_done = threading.Event()
    remaining = 0
    lock = threading.Lock()

    def on_receive(self, message: Any) -> None:
        with Counter.lock:
            Counter.remaining -= 1
            if Counter.remaining == 0:
                Counter.all_done.set()


def test_ten_thousand_actors_on_two_workers(pool: Pool) -> None:
    refs = [Counter.start(dispatcher=pool) for _ in range(10_000)]
    Counter.all_done.clear()
    Counter.remaining = 3 * len(refs)
    for round_ in range(3):
        for ref in refs:
            ref.tell(round_)
    assert Counter.all_done.wait(WAIT)
    pykka.ActorRegistry.stop_all(block=True, timeout=WAIT)
    pool.stop(timeout=WAIT)  # counts are added after each turn: now they are final
    backlog = pool.backlog()
    assert backlog.handled == 30_000 + 10_000  # the stops are messages too
    assert backlog.ready == 0
    assert backlog.wakeups < 30_000  # busy workers are not woken per message


def test_exception_in_tell_calls_on_failure_others_fine(pool: Pool) -> None:
    failed = threading.Event()

    class Fragile(Recorder):
        def on_failure(self, *exc_info: Any) -> None:
            assert isinstance(exc_info[1], ValueError)
            failed.set()

    fragile, other = Fragile.start(pool), Recorder.start(pool)
    waiting = fragile.ask("seen", block=False)
    fragile.tell("boom")
    late = fragile.ask("after", block=False)
    assert failed.wait(WAIT)
    assert waiting.get(timeout=WAIT) == []
    with pytest.raises(pykka.ActorDeadError):
        late.get(timeout=WAIT)
    assert not fragile.is_alive()
    assert fragile not in pykka.ActorRegistry.get_all()
    assert other.ask("fine", timeout=WAIT) == "fine"


def test_exception_in_on_start_is_a_failure(pool: Pool) -> None:
    failed = threading.Event()

    class BadStart(Recorder):
        def on_start(self) -> None:
            raise RuntimeError("no start")

        def on_failure(self, *exc_info: Any) -> None:
            failed.set()

    ref = BadStart.start(pool)
    asked = ref.ask("hello", block=False)
    assert failed.wait(WAIT)
    with pytest.raises(pykka.ActorDeadError):
        asked.get(timeout=WAIT)
    assert not ref.is_alive()
    assert ref not in pykka.ActorRegistry.get_all()
    assert actor_of(ref).seen == []


def test_latest_lane_keeps_newest_per_key_in_fifo_order() -> None:
    pool = OwnThread("latest")
    pool.start()
    try:
        gate = threading.Event()

        class Gated(Recorder):
            def on_receive(self, message: Any) -> Any:
                if message == "gate":
                    gate.wait(WAIT)
                    return None
                return super().on_receive(message)

        ref = Gated.start(pool, expect=5)
        inbox = cast(PooledInbox, ref.actor_inbox)
        ref.tell("gate")  # the actor is busy while the rest arrive
        ref.tell("before")
        inbox.put_latest("a", "a1")
        inbox.put_latest("b", "b1")
        ref.tell("between")
        inbox.put_latest("a", "a2")  # replaces a1, handled where the lane's wake-up stands
        ref.tell("after")
        gate.set()
        actor = actor_of(ref)
        assert actor.done.wait(WAIT)
        assert ref.ask("seen", timeout=WAIT) == ["before", "a2", "b1", "between", "after"]
        inbox.put_latest("a", "a3")  # the lane wakes the actor again once it was taken
        assert ref.ask("seen", block=True, timeout=WAIT)[-1] == "a3"
        ref.stop(timeout=WAIT)
    finally:
        pool.stop(timeout=WAIT)


def test_flooded_actor_does_not_starve_another_on_one_worker() -> None:
    pool = Pool("fair", workers=1, throughput=8)
    pool.start()
    try:
        gate, holding = threading.Event(), threading.Event()
        order: list[str] = []

        class Logged(PooledActor):
            def on_receive(self, message: Any) -> None:
                if message == "gate":
                    holding.set()
                    gate.wait(WAIT)
                order.append(message)

        flooded, quiet = Logged.start(dispatcher=pool), Logged.start(dispatcher=pool)
        flooded.tell("gate")  # holds the only worker while the flood queues up
        # Only once the worker is inside "gate": were "quiet" told sooner, a worker slow
        # to start could run quiet's first turn (which takes it) before flooded's gate.
        assert holding.wait(WAIT)
        for _ in range(1000):
            flooded.tell("flood")
        quiet.tell("quiet")
        gate.set()
        flooded.stop(timeout=WAIT)
        quiet.stop(timeout=WAIT)
        assert order.index("quiet") == 8  # right after the flood's first turn
        assert len(order) == 1002
    finally:
        pool.stop(timeout=WAIT)


def test_registry_stop_all_stops_pooled_actors(pool: Pool) -> None:
    refs = [Recorder.start(pool) for _ in range(50)]
    assert all(pykka.ActorRegistry.stop_all(block=True, timeout=WAIT))
    assert not any(ref.is_alive() for ref in refs)
    assert all(actor_of(ref).stopped.is_set() for ref in refs)


def test_pool_stop_with_live_actors_is_quick_and_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    pool = Pool("many", workers=2)
    pool.start()
    refs = [Counter.start(dispatcher=pool) for _ in range(10_000)]
    assert len(set(threading.enumerate()) - before) == 2
    pool.stop(timeout=WAIT)
    assert set(threading.enumerate()) <= before
    assert not any(ref.is_alive() for ref in refs[:: len(refs) // 10])
    assert not pykka.ActorRegistry.get_all()
    with pytest.raises(pykka.ActorDeadError):
        refs[0].ask("late", timeout=WAIT)


def test_ask_from_outside_to_an_actor_on_the_loop() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bus-loop")
    thread.start()
    on_loop = OnLoop(loop)
    on_loop.start()
    try:
        ref = Recorder.start(on_loop)
        assert ref.ask("hi", timeout=WAIT) == "hi"
        assert actor_of(ref).started_on == "bus-loop"
        # A burst told while the loop is busy: one wake-up for all of it, not one each.
        busy, release = threading.Event(), threading.Event()

        def hold_the_loop() -> None:
            busy.set()
            release.wait(WAIT)

        loop.call_soon_threadsafe(hold_the_loop)
        assert busy.wait(WAIT)
        before = on_loop.wakeups
        for i in range(100):
            ref.tell(i)
        release.set()
        assert ref.ask("seen", timeout=WAIT) == ["hi", *range(100)]
        # One per pass of `throughput` messages (the loop gets its turn between), and
        # perhaps one for the ask: not one per message.
        passes = -(-100 // on_loop.throughput)
        assert on_loop.wakeups - before <= passes + 1
        assert ref.stop(timeout=WAIT) is True
        ref2 = Recorder.start(on_loop)
    finally:
        on_loop.stop(timeout=WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()
    assert not ref2.is_alive()


@pytest.fixture
def on_loop() -> Iterator[OnLoop]:
    """An OnLoop dispatcher on a loop of its own thread ("bus-loop")."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bus-loop")
    thread.start()
    dispatcher = OnLoop(loop)
    dispatcher.start()
    yield dispatcher
    dispatcher.stop(timeout=WAIT)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


class Relay(PooledActor):
    """Tells `to` what it receives, and records whether `to` had handled it already."""

    def __init__(self, dispatcher: OnLoop, to: pykka.ActorRef[Any]) -> None:
        super().__init__(dispatcher=dispatcher)
        self.to = to
        self.handled_at_once: list[bool] = []

    def on_receive(self, message: Any) -> Any:
        self.to.tell(message)
        self.handled_at_once.append(message in actor_of(self.to).seen)


def test_a_tell_on_the_loop_is_handled_at_once_but_never_nested(on_loop: OnLoop) -> None:
    """On the loop thread, outside a drain, a tell runs the actor's turn before it returns
    (a request handler's reply leaves in the same pass); inside a drain it waits for
    the next one, so one actor's turn never runs inside another's."""
    loop = on_loop.loop
    target = Recorder.start(on_loop)
    relay = Relay.start(on_loop, target)
    assert target.ask("target ready", timeout=WAIT) == "target ready"
    assert relay.ask("relay ready", timeout=WAIT) is None

    async def tell_from_the_loop() -> tuple[bool, bool]:
        target.tell("direct")
        direct = "direct" in actor_of(target).seen
        relay.tell("relayed")
        return direct, "relayed" in actor_of(target).seen

    direct, relayed = asyncio.run_coroutine_threadsafe(tell_from_the_loop(), loop).result(WAIT)
    assert direct  # handled inside the tell
    assert not relayed  # the relay's turn ran inside its tell; the target's in a later pass
    expected = ["target ready", "relay ready", "direct", "relayed"]
    assert target.ask("seen", timeout=WAIT) == expected
    assert actor_of(relay).handled_at_once == [False, False]


def test_receive_now_handles_an_idle_actors_message_at_once_and_keeps_the_order(
    on_loop: OnLoop,
) -> None:
    """The request path's shortcut: on the loop thread, outside a drain, an idle actor
    handles the message before `receive_now` returns; with messages queued (or from
    another thread, or inside a drain) it declines, and a tell keeps the order."""
    loop = on_loop.loop
    target = Recorder.start(on_loop)
    actor = actor_of(target)
    assert target.ask("ready", timeout=WAIT) == "ready"
    assert actor.receive_now("from another thread") is False

    async def on_the_loop() -> list[bool]:
        handled = [actor.receive_now("now")]
        handled.append("now" in actor.seen)
        # Told from another thread while the loop is busy here: queued, not yet run.
        teller = threading.Thread(target=target.tell, args=("queued",))
        teller.start()
        teller.join(WAIT)
        handled.append(actor.receive_now("after it"))
        target.tell("after it")
        return handled

    handled = asyncio.run_coroutine_threadsafe(on_the_loop(), loop).result(WAIT)
    assert handled == [True, True, False]
    assert target.ask("seen", timeout=WAIT) == ["ready", "now", "queued", "after it"]

    class Inner(Recorder):
        def on_receive(self, message: Any) -> Any:
            if message == "try":
                return actor.receive_now("nested")
            return super().on_receive(message)

    inner = Inner.start(on_loop)
    assert inner.ask("try", timeout=WAIT) is False  # inside a drain: never nested


def test_a_burst_in_the_latest_lane_is_taken_a_turn_at_a_time() -> None:
    """Thousands of keys at once: at most `throughput` are handled before what the FIFO
    held then, every key's newest message is handled once, oldest key first."""
    pool = OwnThread("burst", throughput=8)
    pool.start()
    try:
        gate = threading.Event()

        class Gated(Recorder):
            def on_receive(self, message: Any) -> Any:
                if message == "gate":
                    gate.wait(WAIT)
                    return None
                return super().on_receive(message)

        ref = Gated.start(pool, expect=1 + 100)
        inbox = cast(PooledInbox, ref.actor_inbox)
        ref.tell("gate")
        for key in range(100):
            inbox.put_latest(key, f"{key}-old")
        ref.tell("told after the burst")
        for key in range(100):
            inbox.put_latest(key, key)  # replaces each, keeping its place
        gate.set()
        assert actor_of(ref).done.wait(WAIT)
        seen: list[Any] = ref.ask("seen", block=True, timeout=WAIT)
        assert seen.index("told after the burst") == 8  # one turn's worth of the lane first
        assert [m for m in seen if m != "told after the burst"] == list(range(100))
        ref.stop(timeout=WAIT)
    finally:
        pool.stop(timeout=WAIT)
