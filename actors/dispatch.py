"""Actors without a thread each: `PooledActor`s whose inboxes are run by a `Dispatcher`.

What it owns. A `PooledActor` is a pykka actor (`ActorRef`, `tell`, `ask`, `stop`,
`on_start`/`on_stop`/`on_failure`, `ActorRegistry`) whose inbox (`PooledInbox`) is run
by a dispatcher instead of a thread of its own: `Pool(name, workers=N)` (N daemon
threads sharing one ready-queue of actors), `OwnThread(name)` (a pool of one, for a
singleton) or `OnLoop(loop)` (the asyncio loop of the bus). A subclass picks its
dispatcher with the class attribute `default_dispatcher` or per instance with
`super().__init__(dispatcher=...)` (the argument wins); the dispatcher must be started.

Threading rules.
- One actor's messages are handled one at a time, in FIFO order, on whichever worker
  holds its *run token*; different actors run in parallel on the workers.
- The token is a one-element list: `pop()` takes it, `append()` gives it back; both are
  single C calls, atomic under the GIL (no compare-and-swap, no lock). The actor is
  scheduled (put on its dispatcher's ready-queue) only by whoever took the token, so it
  is never queued twice nor run by two workers at once. A sender appends its message
  *before* it tries the token; a worker that ran the inbox dry gives the token back
  *before* it looks at the inbox once more. So a message is either seen by that last look
  or its sender finds the token free and schedules the actor: nothing is left unseen.
- A turn handles at most `throughput` messages (default 32), then the actor is queued
  again behind the others: a flooded actor cannot starve the rest of a pool.
- Code on a dispatcher must not block on another actor of the same dispatcher: inside an
  actor use `tell`, `ask(block=False)`, `stop(block=False)`. Actors on `OnLoop` run on
  the event loop itself and must never block at all (no blocking I/O, no `ask().get()`).
- The latest lane (`put_latest`): a newer message replaces an unread one of the same key;
  the lane is handled where its wake-up stands in the FIFO, its messages delivered to
  `on_receive` as tells, oldest key first, at most `throughput` at a time (the rest
  after what the FIFO holds then: a burst of thousands of keys does not hold the
  dispatcher, the loop for OnLoop, for its whole length).
- Failures: an exception in `on_start` or in a tell is logged (`_handle_failure`),
  `on_failure` is called and the actor stops; in an ask it goes to the caller. Messages
  left after stop: asks get ActorDeadError (a pending stop gets its reply).
- Stop actors before their dispatcher. `stop()` ends the workers after their current
  turn; actors still alive on it are marked dead (unregistered, no `on_stop`, logged) and
  whatever waits or later arrives in their inboxes is answered as above.

pykka internals used: the extension points `_create_actor_inbox`, `_create_future`,
`_start_actor_loop`; `_handle_receive` (stop and proxy messages) and `_handle_failure`;
`messages._ActorStop` (a stop still waiting in a dead inbox is answered, not failed).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, cast

import pykka
from pykka.messages import _ActorStop

if TYPE_CHECKING:
    from pykka._envelope import Envelope

log = logging.getLogger(__name__)

_TOKEN = None  # the run token's one element: what matters is whether it is there


# The FIFO entry that stands for the latest lane, in the shape of pykka's envelope.
_LATEST_WAKE: Any = SimpleNamespace(message=None, reply_to=None)


class PooledInbox:
    """pykka's inbox protocol (`put`, `get`, `empty`) plus the latest lane and the run
    token. `get` never blocks: only the holder of the token reads the inbox."""

    __slots__ = ("_armed", "_fifo", "_latest", "_token", "actor", "dispatcher")

    def __init__(self) -> None:
        self._fifo: deque[Any] = deque()
        # Oldest key first; a replaced message keeps its key's place (popitem is atomic).
        self._latest: OrderedDict[Hashable, Any] = OrderedDict()
        self._armed = False
        self._token: list[None] = []  # held until the actor is started
        self.actor: PooledActor
        self.dispatcher: Dispatcher

    def put(self, envelope: Envelope[Any], /) -> None:
        self._fifo.append(envelope)
        try:
            self._token.pop()
        except IndexError:
            return  # scheduled or running: its holder will see the message
        self.dispatcher.schedule(self)

    def put_latest(self, key: Hashable, message: Any) -> None:
        """Replaces an unread message of `key`; wakes the actor unless a wake-up waits.
        Racing senders can at worst queue a wake-up too many, which finds the lane empty."""
        self._latest[key] = message
        if not self._armed:
            self._armed = True
            self.put(_LATEST_WAKE)

    def take_latest(self, limit: int) -> list[Any]:
        """Up to `limit` of the lane's messages, oldest key first (clears the flag *before*
        taking). If more remain, the lane's wake-up goes to the back of the FIFO again
        (by the token holder: no scheduling needed)."""
        self._armed = False
        latest, taken = self._latest, []
        for _ in range(limit):
            try:
                taken.append(latest.popitem(last=False)[1])
            except KeyError:
                return taken
        if latest and not self._armed:
            self._armed = True
            self._fifo.append(_LATEST_WAKE)
        return taken

    def get(self) -> Any:
        return self._fifo.popleft()

    def empty(self) -> bool:
        return not self._fifo

    def run(self, budget: int) -> bool:
        """One turn, by the token holder: True if messages remain (queue me again)."""
        actor, fifo = self.actor, self._fifo
        if not actor._pooled_started:
            actor._pooled_start()
        handled = 0
        while not actor.actor_stopped.is_set():
            if handled >= budget:
                self.dispatcher.count(handled)
                return True
            try:
                envelope = fifo.popleft()
            except IndexError:
                self.dispatcher.count(handled)
                if self._release():
                    return False
                handled = 0
                continue
            handled += actor._pooled_handle(envelope)
        self.dispatcher.count(handled)
        self.drain_dead()
        return False

    def _release(self) -> bool:
        """Gives the token back; False if messages came and the token was taken again."""
        self._token.append(_TOKEN)
        if not self._fifo:
            return True
        try:
            self._token.pop()
        except IndexError:
            return True  # a sender took it and scheduled the actor
        return False

    def take_if_idle(self) -> bool:
        """The run token, if the actor is started, alive and has nothing queued; else
        False (tell it). A message another thread queued meanwhile is run first."""
        actor = self.actor
        if self._fifo or not actor._pooled_started or actor.actor_stopped.is_set():
            return False
        try:
            self._token.pop()
        except IndexError:
            return False  # scheduled or running
        if self._fifo:  # a sender queued just now and left it to us: it goes first
            self.dispatcher.schedule(self)
            return False
        return True

    def drain_dead(self) -> None:
        """The actor is stopped: answer what waits (as pykka's teardown) and keep doing so
        for late arrivals (a sender that passed `is_alive()` just before the stop)."""
        while True:
            while self._fifo:
                envelope = self._fifo.popleft()
                if envelope.reply_to is not None:
                    self.actor._pooled_answer_dead(envelope)
            if self._release():
                return

    def abandon(self) -> int:
        """By the token holder, when the dispatcher has stopped: the actor is dead."""
        dead = self.actor._pooled_mark_dead()
        self.drain_dead()
        return dead


@dataclass(frozen=True, slots=True)
class Backlog:
    """A dispatcher's lag: actors waiting for a worker, the age of the oldest (seconds),
    messages handled so far and worker wake-ups (notifies or loop callbacks) sent."""

    name: str
    ready: int
    oldest_s: float
    handled: int
    wakeups: int


class Dispatcher:
    """What runs `PooledInbox`es: a ready-queue of (inbox, queued at) and a way to wake."""

    def __init__(self, name: str, throughput: int = 32) -> None:
        if throughput < 1:
            raise ValueError("throughput must be at least 1")
        self.name = name
        self.throughput = throughput
        self.running = False
        self.wakeups = 0
        self._ready: deque[tuple[PooledInbox, float]] = deque()
        self._handled: dict[int, int] = {}  # per thread: each thread adds to its own

    def count(self, handled: int) -> None:
        ident = threading.get_ident()
        self._handled[ident] = self._handled.get(ident, 0) + handled

    def schedule(self, inbox: PooledInbox) -> None:
        """By the token holder: run this inbox soon (if stopped: answer it as dead)."""
        self._ready.append((inbox, time.monotonic()))
        if self.running:
            self._wake()
        elif self._abandon_ready():
            log.warning("%s: an actor was told something after its dispatcher stopped", self)

    def _wake(self) -> None:
        raise NotImplementedError

    def run_now(self, inbox: PooledInbox, message: Any) -> bool:
        """Handles `message` at once, on the caller's thread, where that is what a tell
        would come to anyway (OnLoop); False: tell it."""
        return False

    def start(self) -> None:
        self.running = True

    def stop(self, timeout: float = 5.0) -> None:  # pragma: no cover
        raise NotImplementedError

    def backlog(self) -> Backlog:
        try:
            oldest = time.monotonic() - self._ready[0][1]
        except IndexError:
            oldest = 0.0
        handled = sum(self._handled.values())
        return Backlog(self.name, len(self._ready), oldest, handled, self.wakeups)

    def _abandon_ready(self) -> int:
        dead = 0
        while True:
            try:
                inbox, _ = self._ready.popleft()
            except IndexError:
                return dead
            dead += inbox.abandon()

    def _abandon_live(self) -> None:
        """After stop: queued actors and idle live ones on this dispatcher are dead."""
        dead = self._abandon_ready()
        for ref in pykka.ActorRegistry.get_all():
            inbox = ref.actor_inbox
            if isinstance(inbox, PooledInbox) and inbox.dispatcher is self:
                dead += inbox.actor._pooled_mark_dead()
        if dead:
            log.warning("%s stopped: %d live actors on it marked dead, without on_stop", self, dead)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Pool(Dispatcher):
    """N daemon worker threads sharing one ready-queue. A schedule notifies a worker only
    when one is idle: `_idle` counts waiting workers not yet notified, read without the
    lock on the fast path (busy workers: no lock, no futex), decremented by the notifier."""

    def __init__(
        self,
        name: str,
        workers: int = 2,
        throughput: int = 32,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(name, throughput)
        self.workers = workers
        self._cond = threading.Condition(threading.Lock())
        self._idle = 0
        self._threads: list[threading.Thread] = []
        # Scheduled from this loop's thread (the bus edge, handing over heartbeats): wake
        # idle workers once per pass of the loop, after it has handed over a whole burst,
        # not once per message.
        self._loop = loop
        self._loop_thread: int | None = None
        self._wake_due = False

    def start(self) -> None:
        super().start()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._learn_loop_thread)
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _wake(self) -> None:
        if not self._idle:  # unlocked read: a stale 0 is safe (the worker re-checks the queue)
            return
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread:
            if not self._wake_due:
                self._wake_due = True
                loop.call_soon(self._wake_after_pass)
            return
        with self._cond:
            if self._idle:
                self._idle -= 1
                self.wakeups += 1
                self._cond.notify()

    def _wake_after_pass(self) -> None:
        """On the loop, once it has handed over what it had: as many workers as needed."""
        self._wake_due = False
        with self._cond:
            wanted = min(self._idle, len(self._ready))
            if wanted:
                self._idle -= wanted
                self.wakeups += 1
                self._cond.notify(wanted)

    def _work(self) -> None:
        ready, cond, budget = self._ready, self._cond, self.throughput
        while self.running:
            try:
                inbox, _ = ready.popleft()
            except IndexError:
                with cond:  # idle: counted before the re-check, under the notifiers' lock
                    if self.running and not ready:
                        self._idle += 1
                        cond.wait()
                continue
            try:
                again = inbox.run(budget)
            except Exception:  # a bug here: the actor stays stuck, the worker lives on
                log.exception("%s: a turn of %s failed", self.name, inbox.actor)
                again = False
            if again:
                self.schedule(inbox)

    def _learn_loop_thread(self) -> None:
        self._loop_thread = threading.get_ident()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self.running = False
            self._idle = 0
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in self._threads if t.is_alive()]
        if left:
            log.warning("%s: workers still in a turn after %.1fs: %s", self.name, timeout, left)
        self._threads.clear()
        self._abandon_live()


class OwnThread(Pool):
    """A pool of one worker: a singleton actor with a thread of its own."""

    def __init__(self, name: str, throughput: int = 32) -> None:
        super().__init__(name, workers=1, throughput=throughput)


class OnLoop(Dispatcher):
    """Runs actors on an asyncio loop. Scheduled from the loop thread: at once, in the
    caller's callback (a request handler's tell is handled before the handler returns,
    so its reply leaves in the same pass of the loop), or with `call_soon` from inside
    a drain (no nesting); from other threads: one `call_soon_threadsafe` per burst (the
    drain's own token). Actors on it must never block: they stall the loop and
    everything on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "loop", throughput: int = 32):
        super().__init__(name, throughput)
        self.loop = loop
        self._drain_token: list[None] = [_TOKEN]
        self._loop_thread = 0  # learnt on the first drain
        self._draining = False

    def _wake(self) -> None:
        try:
            self._drain_token.pop()
        except IndexError:
            return  # a drain is already due: it will take this entry
        self.wakeups += 1
        if threading.get_ident() == self._loop_thread:
            if self._draining:
                self.loop.call_soon(self._drain)
            else:
                self._drain()
            return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed
            self.running = False
            self._abandon_live()

    def run_now(self, inbox: PooledInbox, message: Any) -> bool:
        """On the loop thread outside a drain, an idle actor's message is handled at once:
        what a tell would lead to (it drains at once there), less the queueing, so a
        request answered on the loop costs no more than a bare responder's handler."""
        if self._draining or threading.get_ident() != self._loop_thread or not self.running:
            return False
        if not inbox.take_if_idle():
            return False
        actor = inbox.actor
        self._draining = True
        try:
            actor._pooled_receive(message, None)
        finally:
            self._draining = False
        self.count(1)
        if actor.actor_stopped.is_set():
            inbox.drain_dead()
        elif not inbox._release():  # it told itself something: run that as a tell would
            self.schedule(inbox)
        return True

    def _drain(self) -> None:
        self._loop_thread = threading.get_ident()
        self._drain_token.append(_TOKEN)  # before reading the queue: see the class doc
        if not self.running:
            self._abandon_ready()
            return
        ready, budget = self._ready, self.throughput
        self._draining = True
        try:
            for _ in range(len(ready)):  # the loop gets its turn between drains
                try:
                    inbox, _ = ready.popleft()
                except IndexError:
                    break
                try:
                    again = inbox.run(budget)
                except Exception:
                    log.exception("%s: a turn of %s failed", self.name, inbox.actor)
                    again = False
                if again:
                    ready.append((inbox, time.monotonic()))
            if ready:
                self._wake()
        finally:
            self._draining = False

    def stop(self, timeout: float = 5.0) -> None:
        """From any thread (the loop is not ours: nothing to join; `timeout` unused). A
        turn in progress on the loop ends; queued actors and live ones are dead."""
        self.running = False
        self._abandon_live()


class PooledActor(pykka.Actor):
    """A pykka actor run by a dispatcher (module docstring): `default_dispatcher` or the
    `dispatcher` argument."""

    default_dispatcher: ClassVar[Dispatcher | None] = None

    def __init__(self, *args: Any, dispatcher: Dispatcher | None = None, **kwargs: Any) -> None:
        chosen = self.default_dispatcher if dispatcher is None else dispatcher
        if chosen is None or not chosen.running:
            raise RuntimeError(f"{type(self).__name__} needs a started dispatcher, got {chosen}")
        super().__init__(*args, **kwargs)
        self.dispatcher = chosen
        self._pooled_started = False
        self._pooled_inbox = cast(PooledInbox, self.actor_inbox)
        self._pooled_inbox.actor, self._pooled_inbox.dispatcher = self, chosen

    @staticmethod
    def _create_actor_inbox() -> PooledInbox:
        return PooledInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self.dispatcher.schedule(self._pooled_inbox)  # the token was held since creation

    def receive_now(self, message: Any) -> bool:
        """`message` handled at once where the dispatcher allows it (`Dispatcher.run_now`);
        False: tell it instead."""
        return self.dispatcher.run_now(self._pooled_inbox, message)

    def _pooled_start(self) -> None:
        self._pooled_started = True
        try:
            self.on_start()
        except Exception:
            self._pooled_fail()

    def _pooled_handle(self, envelope: Envelope[Any]) -> int:
        """Handles one FIFO entry; returns how many messages that was."""
        if envelope is not _LATEST_WAKE:
            self._pooled_receive(envelope.message, envelope.reply_to)
            return 1
        handled = 0
        for message in self._pooled_inbox.take_latest(self.dispatcher.throughput):
            if self.actor_stopped.is_set():
                break
            self._pooled_receive(message, None)
            handled += 1
        return handled

    def _pooled_receive(self, message: Any, reply_to: pykka.Future[Any] | None) -> None:
        """pykka's `_actor_loop_running` body, for one message."""
        try:
            response = self._handle_receive(message)
        except Exception:
            if reply_to is None:
                self._pooled_fail()
            else:
                log.info("Exception returned from %s to caller:", self, exc_info=True)
                reply_to.set_exception()
            return
        except BaseException:
            log.debug("%r in %s: stopping all actors", sys.exc_info()[1], self)
            self._handle_failure(*sys.exc_info())
            pykka.ActorRegistry.stop_all(block=False)  # blocking could wait on this worker
            return
        if reply_to is not None:
            reply_to.set(response)

    def _pooled_fail(self) -> None:
        exc_info = sys.exc_info()
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:
            self._handle_failure(*sys.exc_info())

    def _pooled_answer_dead(self, envelope: Envelope[Any]) -> None:
        """pykka's teardown for one waiting ask: a stop is answered, the rest are dead."""
        assert envelope.reply_to is not None
        if isinstance(envelope.message, _ActorStop):
            envelope.reply_to.set(None)
            return
        dead = pykka.ActorDeadError(f"{self.actor_ref} stopped before handling the message")
        envelope.reply_to.set_exception(exc_info=(pykka.ActorDeadError, dead, None))

    def _pooled_mark_dead(self) -> int:
        """1 if it was alive: then unregistered and stopped (no `on_stop`)."""
        if self.actor_stopped.is_set():
            return 0
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()
        return 1
