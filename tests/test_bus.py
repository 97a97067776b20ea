"""The bus facade against a real nats-server: actors publish, subscribe, request, time."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from actors.base import PING, SafeActor, tell_latest
from actors.coalescer import Coalescer
from actors.dispatch import OwnThread
from bus.connection import BusError
from bus.runtime import Bus, Inbound, Reply, RequestFailed
from bus.server import EmbeddedServer
from bus.subjects import InvalidGatewayId, Subjects
from schemas.codec import decode
from schemas.wire import Pong


class Recorder(pykka.ThreadingActor):
    """Collects what it is told; answers requests by publishing the reply itself."""

    def __init__(self, bus: Bus, expected: int = 1) -> None:
        super().__init__()
        self.bus = bus
        self.received: list[Any] = []
        self.done = threading.Event()
        self.expected = expected

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Inbound) and message.reply:
            self.bus.publish(message.reply, Pong(gateway_id="answered-by-actor"))
        self.received.append(message)
        if len(self.received) >= self.expected:
            self.done.set()
        return None


def received(ref: pykka.ActorRef[Recorder], timeout: float = 5.0) -> list[Any]:
    proxy = ref.proxy()
    assert proxy.done.get().wait(timeout), "the actor did not receive everything in time"
    return list(proxy.received.get())


def test_server_is_ours(nats_server: EmbeddedServer, bus: Bus) -> None:
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert bus.server_name == nats_server.server_name


def test_publish_reaches_an_actor(bus: Bus, prefix: str) -> None:
    recorder = Recorder.start(bus)
    bus.subscribe(f"{prefix}.x", recorder.tell)
    bus.publish(f"{prefix}.x", b"hello", headers={"k": "v"})
    [message] = received(recorder)
    assert message.data == b"hello"
    assert message.subject == f"{prefix}.x"
    assert message.headers == {"k": "v"}


def test_request_answered_by_an_actor(bus: Bus, prefix: str) -> None:
    responder = Recorder.start(bus)
    bus.subscribe(f"{prefix}.api", responder.tell)
    caller = Recorder.start(bus)
    bus.request(f"{prefix}.api", b"{}", 2.0, caller.tell)
    [result] = received(caller)
    assert isinstance(result, Reply)
    assert decode(result.data, Pong).gateway_id == "answered-by-actor"


def test_request_without_responders_fails_fast(bus: Bus, prefix: str) -> None:
    caller = Recorder.start(bus)
    started = time.monotonic()
    bus.request(f"{prefix}.nobody", b"{}", 5.0, caller.tell)
    [result] = received(caller)
    assert result == RequestFailed("no_responders")
    assert time.monotonic() - started < 2.0


def test_request_times_out(bus: Bus, prefix: str) -> None:
    bus.subscribe(f"{prefix}.silent", lambda _msg: None)  # interest, but never a reply
    caller = Recorder.start(bus)
    bus.request(f"{prefix}.silent", b"{}", 0.2, caller.tell)
    [result] = received(caller)
    assert result == RequestFailed("timeout")


def test_call_later_tells_an_actor_after_the_delay(bus: Bus) -> None:
    recorder = Recorder.start(bus)
    started = time.monotonic()
    bus.call_later(0.15, recorder.tell, "tick")
    assert received(recorder) == ["tick"]
    assert time.monotonic() - started >= 0.15


def test_cancelled_timer_never_fires(bus: Bus) -> None:
    recorder = Recorder.start(bus)
    timer = bus.call_later(0.1, recorder.tell, "cancelled")
    timer.cancel()
    bus.call_later(0.3, recorder.tell, "kept")
    assert received(recorder) == ["kept"]


def test_eight_threads_publishing_lose_nothing(bus: Bus, prefix: str) -> None:
    threads, per_thread = 8, 2_000
    recorder = Recorder.start(bus, expected=threads * per_thread)
    bus.subscribe(f"{prefix}.load", recorder.tell)

    def publish_many(n: int) -> None:
        for i in range(per_thread):
            bus.publish(f"{prefix}.load", f"{n}:{i}".encode())

    workers = [threading.Thread(target=publish_many, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    messages = received(recorder, timeout=20)
    assert len(messages) == threads * per_thread
    assert len({m.data for m in messages}) == threads * per_thread
    for n in range(threads):  # each thread's messages arrive in the order it sent them
        mine = [int(m.data.split(b":")[1]) for m in messages if m.data.startswith(f"{n}:".encode())]
        assert mine == list(range(per_thread))


def test_failed_publish_is_counted_and_the_rest_still_go_out(
    bus: Bus, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder.start(bus, expected=2)
    bus.subscribe(f"{prefix}.after", recorder.tell)
    bus.publish(f"{prefix}.after", b"before")
    bus.publish("", b"no subject")  # refused by nats-py on the loop
    bus.publish(f"{prefix}.after", b"after")
    assert [m.data for m in received(recorder)] == [b"before", b"after"]
    assert bus.publish_errors == 1
    assert any("publish to  failed" in r.getMessage() for r in caplog.records)


def test_publish_after_stop_is_a_clear_error(nats_server: EmbeddedServer) -> None:
    bus = Bus(nats_server.url, use_uvloop=False)
    bus.start()
    bus.stop()
    with pytest.raises(BusError, match="not running"):
        bus.publish("anything", b"x")


def test_a_stop_ends_the_tasks_still_running_on_the_loop(nats_server: EmbeddedServer) -> None:
    """A task left running at a stop (a watch stopped just before it, whose cancel was
    only scheduled) is cancelled and ends on its loop, its cleanup run, instead of being
    destroyed pending when the loop closes."""
    bus = Bus(nats_server.url)
    bus.start()
    started, cleaned_up = threading.Event(), threading.Event()

    async def follow() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()

    bus.call_soon(lambda: bus.loop.create_task(follow()))
    assert started.wait(5)
    bus.stop()
    assert cleaned_up.is_set()


def test_run_on_the_loop_thread_is_refused(bus: Bus) -> None:
    errors: list[BaseException] = []

    async def nested() -> None:
        async def inner() -> None:
            return None

        try:
            bus.run(inner())
        except BusError as exc:
            errors.append(exc)

    bus.run(nested())
    assert len(errors) == 1


def test_a_url_may_list_several_servers(nats_server: EmbeddedServer) -> None:
    # Whichever nats-py tries first, it connects to the one that answers.
    bus = Bus(f"nats://127.0.0.1:1, {nats_server.url}", use_uvloop=False)
    bus.start(connect_timeout=5)
    try:
        assert bus.server_name == nats_server.server_name
    finally:
        bus.stop()


def test_connect_to_nothing_is_a_clear_error() -> None:
    bus = Bus("nats://127.0.0.1:1", use_uvloop=False)
    with pytest.raises(BusError, match=re.escape("cannot connect to NATS at nats://127.0.0.1:1")):
        bus.start(connect_timeout=1)


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "a b", "", "x" * 65])
def test_subjects_refuse_invalid_gateway_ids(bad: str) -> None:
    with pytest.raises(InvalidGatewayId):
        Subjects("gatefleet").heartbeat(bad)


def test_subjects_follow_the_protocol() -> None:
    subjects = Subjects("gf")
    assert subjects.heartbeat("edge-1") == "gf.gw.edge-1.heartbeat"
    assert subjects.config("edge-1") == "gf.gw.edge-1.config"
    assert subjects.ping("edge-1") == "gf.gw.edge-1.ping"
    assert subjects.goodbye("edge-1") == "gf.gw.edge-1.goodbye"
    assert subjects.redirect("edge-1") == "gf.redirect.edge-1"
    assert subjects.api("select-gateway") == "gf.api.select-gateway"
    assert subjects.all_events == "gf.events.>"


# --- actor inboxes (actors/base.py): what the bus loop and actors hand each other ----------


class Observed:
    """What a Collector handled, shared with the test that started it."""

    def __init__(self) -> None:
        self.handled: list[Any] = []
        self.holding = threading.Event()
        self.release = threading.Event()


class Collector(SafeActor):
    """Records what it handles; `"hold"` keeps it busy until released, `"boom"` raises."""

    def __init__(self, bus: Bus, seen: Observed, dispatcher: OwnThread) -> None:
        super().__init__(dispatcher)
        self.bus = bus
        self.seen = seen

    def handle(self, message: Any) -> Any:
        if message == "hold":
            self.seen.holding.set()
            self.seen.release.wait(5)
        elif message == "boom":
            raise RuntimeError("a handler bug")
        self.seen.handled.append(message)
        return None


@pytest.fixture
def own_thread() -> Iterator[OwnThread]:
    dispatcher = OwnThread("collector")
    dispatcher.start()
    yield dispatcher
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    dispatcher.stop()


def held(bus: Bus, dispatcher: OwnThread) -> tuple[pykka.ActorRef[Collector], Observed]:
    """A Collector busy on "hold", so what is told next waits in its inbox."""
    seen = Observed()
    ref = Collector.start(bus, seen, dispatcher)
    ref.tell("hold")
    assert seen.holding.wait(5)
    return ref, seen


def test_latest_lane_keeps_the_newest_per_key_and_the_order_of_later_tells(
    bus: Bus, own_thread: OwnThread
) -> None:
    ref, actor = held(bus, own_thread)
    tell_latest(ref, "a", ("a", 1))
    tell_latest(ref, "b", ("b", 1))
    tell_latest(ref, "a", ("a", 2))
    ref.tell("after")  # told after the lane's entries: handled after them
    actor.release.set()
    assert ref.ask(PING, timeout=5) == PING
    assert actor.handled == ["hold", ("a", 2), ("b", 1), "after"]


def test_latest_lane_entry_newer_than_a_tell_can_overtake_it(
    bus: Bus, own_thread: OwnThread
) -> None:
    ref, actor = held(bus, own_thread)
    tell_latest(ref, "a", ("a", 1))
    ref.tell("between")
    tell_latest(ref, "a", ("a", 2))  # replaces 1 while it waits: handled where 1 was
    tell_latest(ref, "b", ("b", 1))
    actor.release.set()
    assert ref.ask(PING, timeout=5) == PING
    assert actor.handled == ["hold", ("a", 2), ("b", 1), "between"]
    tell_latest(ref, "a", ("a", 3))  # the lane was emptied: a new wake-up
    assert ref.ask(PING, timeout=5) == PING
    assert actor.handled[-1] == ("a", 3)


def test_latest_lane_isolates_errors_and_tolerates_a_stopped_actor(
    bus: Bus, own_thread: OwnThread
) -> None:
    ref, actor = held(bus, own_thread)
    tell_latest(ref, "x", "boom")
    tell_latest(ref, "y", "fine")
    actor.release.set()
    assert ref.ask(PING, timeout=5) == PING
    assert actor.handled == ["hold", "fine"]
    assert ref.proxy().handler_errors.get(timeout=5) == 1
    ref.stop()
    tell_latest(ref, "x", "too late")  # dropped, like safe_tell


def test_coalescer_wakes_once_per_batch() -> None:
    pending: Coalescer[int] = Coalescer()
    assert pending.take() == []
    assert pending.put(1) is True  # the caller must wake the actor
    assert pending.put(2) is False  # a wake-up is already on its way
    assert len(pending) == 2
    assert pending.take() == [1, 2]
    assert pending.put(3) is True
    assert pending.take() == [3]


def test_coalescer_drop_oldest_says_whether_it_dropped() -> None:
    """The edge counts a shed heartbeat only when one went: the actor may have taken
    them all between the edge's length check and the drop."""
    pending: Coalescer[int] = Coalescer()
    pending.put(1)
    pending.put(2)
    assert pending.drop_oldest() is True
    assert pending.take() == [2]
    assert pending.drop_oldest() is False


def test_coalescer_loses_nothing_between_threads() -> None:
    pending: Coalescer[int] = Coalescer()
    wakes: list[int] = []
    taken: list[int] = []
    total = 50_000
    wake = threading.Semaphore(0)
    done = threading.Event()

    def consumer() -> None:
        while not done.is_set() or len(pending):
            if wake.acquire(timeout=0.01):
                taken.extend(pending.take())

    thread = threading.Thread(target=consumer)
    thread.start()
    for i in range(total):
        if pending.put(i):
            wakes.append(i)
            wake.release()
    done.set()
    thread.join(10)
    taken.extend(pending.take())
    assert taken == list(range(total))
    assert len(wakes) <= total
