"""The bus: one asyncio loop in one thread running nats-py, and a thread-safe facade.

Actors (pykka threads) never touch the loop or nats directly. They call:

- `publish(subject, body)`: fire-and-forget, ordered per calling thread (one outbound
  queue, drained on the loop by one task at a time: see `Bus.publish`);
- `subscribe(subject, handler)`: `handler(Inbound)` runs *on the loop* and must only
  decode and `tell` (it must never block: nats-py delivers a subscription's messages
  one at a time);
- `request(subject, body, timeout, on_result)`: `on_result(Reply | RequestFailed)` runs
  on the loop, typically `actor_ref.tell`;
- `call_later(delay, fn, *args)`: a timer on the loop, typically telling an actor;
- `run(coro)`: blocks the *calling* thread until a coroutine finishes on the loop
  (start-up, key-value reads); refused on the loop thread itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.connection import BusError, ClientAuth, open_connection
from schemas.codec import encode

log = logging.getLogger(__name__)

T = TypeVar("T")
Body = bytes | msgspec.Struct

# How long a stop waits for the tasks still running on the loop to end once cancelled.
END_TASKS_TIMEOUT_S = 2.0
# Deliberately deep buffers: heartbeats from thousands of gateways arrive in bursts.
SUBSCRIPTION_PENDING_MSGS = 512 * 1024
SUBSCRIPTION_PENDING_BYTES = 256 * 1024 * 1024


class Inbound(NamedTuple):
    """A received message, without nats types (actors never import nats)."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


class Reply(NamedTuple):
    data: bytes
    headers: dict[str, str] | None


class RequestFailed(NamedTuple):
    reason: str  # "timeout", "no_responders" or "error: ..."


class Timer:
    """A cancellable `call_later`; cancelling from any thread is safe."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._cancelled = False

    def _arm(self, delay: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        if not self._cancelled:
            self._handle = self._loop.call_later(delay, fn, *args)

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._loop.call_soon_threadsafe(self._handle.cancel)


class SubscriptionHandle:
    def __init__(self, bus: Bus, sub: Any) -> None:
        self._bus = bus
        self._sub = sub

    def unsubscribe(self) -> None:
        self._bus.call_soon(self._bus.spawn, self._sub.unsubscribe())


def _end_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancels the tasks still running on a stopped loop and lets them end (as
    asyncio.run does): a watch stopped just before, or a call given up on, would
    otherwise be destroyed pending ("Task was destroyed but it is pending!")."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    ended = asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        loop.run_until_complete(asyncio.wait_for(ended, END_TASKS_TIMEOUT_S))


class Bus:
    """A NATS connection on a private event loop thread."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "gatefleet",
        use_uvloop: bool = True,
        auth: ClientAuth | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.auth = auth or ClientAuth()
        self._use_uvloop = use_uvloop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.publish_errors = 0
        # Messages from any thread waiting to be published, in the order published.
        self._outbound: deque[tuple[str, bytes, dict[str, str] | None]] = deque()
        self._outbound_armed = False  # a drain is scheduled and has not started taking
        self._draining = False  # the task publishing the outbound queue is running
        self._closing = False
        # Called on the loop with (subject, headers) of each message once published: the
        # API lane's request stats (bus/micro.py) learn there that a request was answered.
        self.on_published: Callable[[str, dict[str, str] | None], None] | None = None
        # (on_disconnected, on_reconnected) pairs, called on the loop: add_connection_listener.
        self._connection_listeners: list[tuple[Callable[[], None], Callable[[], None]]] = []

    # Life cycle --------------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> None:
        loop_ready = threading.Event()

        def run_loop() -> None:
            loop = _new_loop(self._use_uvloop)
            asyncio.set_event_loop(loop)
            self._loop = loop
            loop_ready.set()
            loop.run_forever()
            _end_tasks(loop)
            loop.close()

        self._thread = threading.Thread(target=run_loop, name="gatefleet-bus", daemon=True)
        self._thread.start()
        loop_ready.wait()
        try:
            self.run(self._connect(connect_timeout), timeout=connect_timeout + 5)
        except Exception:
            self._stop_loop()
            raise

    async def _connect(self, connect_timeout: float) -> None:
        self._nc = await open_connection(
            self.url,
            name=self.name,
            connect_timeout_s=connect_timeout,
            closing=lambda: self._closing,
            disconnected_hook=self._on_disconnected,
            reconnected_hook=self._on_reconnected,
            **self.auth.options(),
        )
        self._js = self._nc.jetstream()

    def add_connection_listener(
        self, on_disconnected: Callable[[], None], on_reconnected: Callable[[], None]
    ) -> None:
        """Calls `on_disconnected()` when the connection drops (not when the bus stops) and
        `on_reconnected()` when it is back; both on the loop, and they must not block."""
        self._connection_listeners.append((on_disconnected, on_reconnected))

    def remove_connection_listener(
        self, on_disconnected: Callable[[], None], on_reconnected: Callable[[], None]
    ) -> None:
        """Undoes `add_connection_listener` with the same pair (no error if absent)."""
        with contextlib.suppress(ValueError):
            self._connection_listeners.remove((on_disconnected, on_reconnected))

    def _on_disconnected(self) -> None:
        for on_disconnected, _ in list(self._connection_listeners):
            try:
                on_disconnected()
            except Exception:
                log.exception("disconnect listener %r failed", on_disconnected)

    def _on_reconnected(self) -> None:
        for _, on_reconnected in list(self._connection_listeners):
            try:
                on_reconnected()
            except Exception:
                log.exception("reconnect listener %r failed", on_reconnected)

    def stop(self, timeout: float = 5.0) -> None:
        """Drains the connection (delivering what is in flight), then stops the loop."""
        if self._loop is None:
            return
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            try:
                self.run(self._nc.drain(), timeout=timeout)
            except (concurrent.futures.TimeoutError, nats.errors.Error, RuntimeError) as exc:
                log.warning("nats drain did not finish cleanly: %s", exc)
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise BusError("the bus is not running")
        return self._loop

    @property
    def nc(self) -> Client:
        """The nats client, for code that runs on the loop (bus/ modules only)."""
        if self._nc is None:
            raise BusError("the bus is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusError("the bus is not connected")
        return self._js

    @property
    def server_name(self) -> str:
        """The connected server's name from its INFO, to check we talk to our own server."""
        info: dict[str, Any] = getattr(self.nc, "_server_info", {}) or {}
        return str(info.get("server_name", ""))

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # Thread-safe facade -----------------------------------------------------------------

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Runs a coroutine as a task on the loop (call on the loop thread)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def publish(self, subject: str, body: Body, headers: dict[str, str] | None = None) -> None:
        """Fire and forget, from any thread: the messages of one thread go out in the order
        it published them (the messages of all threads, in the order of these calls).

        One deque for every thread, and one drain on the loop for a burst: a wake-up of the
        loop (`call_soon_threadsafe`) only when no drain is pending, instead of a wake-up
        and a Task per message. No lock: the drain clears the flag *before* it takes
        messages, and a publisher appends *before* it reads the flag, so a message
        appended after the flag was cleared schedules another drain and one appended
        before is taken. Publishers that race can at worst schedule a drain too many.
        """
        loop = self.loop  # BusError when the bus is not running, as before the deque
        data = _encoded(body)
        self._outbound.append((subject, data, headers))
        if not self._outbound_armed:
            self._outbound_armed = True
            if self.on_loop_thread:  # no wake-up needed (a subscription handler, an actor on it)
                loop.call_soon(self._drain_outbound)
            else:
                loop.call_soon_threadsafe(self._drain_outbound)

    def _drain_outbound(self) -> None:
        """On the loop: starts the task that empties the outbound queue, unless it runs."""
        self._outbound_armed = False
        if self._outbound and not self._draining:
            self._draining = True
            self.spawn(self._publish_outbound())

    async def _publish_outbound(self) -> None:
        """The one task publishing the outbound queue, in order, until it is empty."""
        outbound, published = self._outbound, self.on_published
        try:
            while outbound:
                subject, data, headers = outbound.popleft()
                try:
                    await self.nc.publish(subject, data, headers=headers)
                except (nats.errors.Error, BusError) as exc:
                    self.publish_errors += 1
                    log.warning("publish to %s failed: %s", subject, exc)
                else:
                    if published is not None:
                        published(subject, headers)
        finally:
            self._draining = False  # no await since the queue was seen empty

    def subscribe(
        self, subject: str, handler: Callable[[Inbound], None], *, queue: str = ""
    ) -> SubscriptionHandle:
        """Subscribes and waits until the server has the interest (blocks the caller)."""

        outbound = self._outbound

        async def callback(msg: Msg) -> None:
            queued = len(outbound)
            try:
                handler(Inbound(msg.subject, msg.data, msg.reply, msg.headers))
            except Exception:  # a handler bug must not kill the subscription
                log.exception("handler for %s failed", msg.subject)
            if len(outbound) > queued and not self._draining:
                # It published (a reply, from an actor on this loop): send it from here,
                # as a bare responder would, rather than from a task a pass later.
                self._draining = True
                await self._publish_outbound()

        async def do_subscribe() -> Any:
            sub = await self.nc.subscribe(
                subject,
                queue=queue,
                cb=callback,
                pending_msgs_limit=SUBSCRIPTION_PENDING_MSGS,
                pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
            )
            await self.nc.flush()
            return sub

        return SubscriptionHandle(self, self.run(do_subscribe()))

    def request(
        self,
        subject: str,
        body: Body,
        timeout: float,
        on_result: Callable[[Reply | RequestFailed], object],
    ) -> None:
        data = _encoded(body)

        async def do_request() -> None:
            try:
                msg = await self.nc.request(subject, data, timeout=timeout)
            except nats.errors.NoRespondersError:
                on_result(RequestFailed("no_responders"))
            except (nats.errors.TimeoutError, TimeoutError):
                on_result(RequestFailed("timeout"))
            except (nats.errors.Error, BusError) as exc:
                on_result(RequestFailed(f"error: {exc}"))
            else:
                on_result(Reply(msg.data, msg.headers))

        self.call_soon(self.spawn, do_request())

    def ask(self, subject: str, body: Body, timeout: float) -> bytes:
        """A blocking request for client code (not actors): the reply's bytes, or BusError."""
        return self.run(self.ask_on_loop(subject, _encoded(body), timeout), timeout=timeout + 5)

    def gather(self, subject: str, body: Body, wait_s: float) -> list[bytes]:
        """A request every responder answers (as `$SRV.INFO`): the replies that arrive
        within `wait_s`, from client code (not actors)."""

        async def gather() -> list[bytes]:
            inbox = self.nc.new_inbox()
            replies: list[bytes] = []

            async def collect(msg: Msg) -> None:
                replies.append(msg.data)

            subscription = await self.nc.subscribe(inbox, cb=collect)
            try:
                await self.nc.publish(subject, _encoded(body), reply=inbox)
                await asyncio.sleep(wait_s)
            finally:
                await subscription.unsubscribe()
            return replies

        return self.run(gather(), timeout=wait_s + 5)

    async def ask_on_loop(self, subject: str, data: bytes, timeout: float) -> bytes:  # noqa: ASYNC109 - the NATS request's own timeout
        """`ask` for code already on this bus's loop (the HTTP API): reply bytes, or BusError
        saying why nobody answered."""
        try:
            return (await self.nc.request(subject, data, timeout=timeout)).data
        except nats.errors.NoRespondersError as exc:
            raise BusError(f"nobody answers on {subject}: is gatefleet running?") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BusError(f"no answer on {subject} within {timeout:g}s") from exc
        except nats.errors.Error as exc:
            raise BusError(f"request on {subject} failed: {exc}") from exc

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(self.loop)
        self.loop.call_soon_threadsafe(timer._arm, delay, fn, args)
        return timer

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Runs `coro` on the loop and waits for it: never call this on the loop thread."""
        if self.on_loop_thread:
            coro.close()
            raise BusError("Bus.run() called on the bus loop: it would deadlock")
        return self.submit(coro).result(timeout)


def _encoded(body: Body) -> bytes:
    return body if isinstance(body, bytes) else encode(body)


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415 - optional speed-up
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
