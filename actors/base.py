"""What every gatefleet actor shares: per-message error isolation, supervision, and an
inbox that costs little to wake.

pykka kills an actor whose `on_receive` raises on a `tell`. Bad input is rejected at the
bus edge, so an exception here is a bug: it is logged and counted, the actor lives on,
and a request that was being served gets an `internal` error reply instead of silence.

An actor that dies all the same (an ActorCrash, injected with the CRASH message to test
recovery) cleans up as if stopped and tells its `parent` ChildDied, so the parent can
start a new one with rebuilt state.

Inbox. Every SafeActor's inbox is an `Inbox`: a C `SimpleQueue` (pykka's FIFO) plus a
*latest* lane, keyed, where a newer message replaces an unread older one of the same key
(`tell_latest`). The lane is for state that only matters as its newest value, e.g. a
gateway's snapshot for the load balancer: however many arrive while the actor is busy,
it is woken once and handles the newest of each key, through its ordinary `handle`.
The lane is handled where its wake-up message stands in the FIFO: a message told after
`tell_latest` returned is handled after that entry (or after a newer one of the same key
that replaced it; a newer entry can so overtake messages told before it, which suits
state that only matters as its newest value). Where a thread wakes another per message,
that wake-up (a futex call and a switch of the GIL) is most of what a message costs.
"""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Hashable
from typing import Any

import pykka

from actors.messages import ChildDied, Request
from bus.edge import Drops, reply_error, serve
from bus.runtime import Bus, SubscriptionHandle
from bus.subjects import Subjects
from schemas.endpoints import Server, served_by

log = logging.getLogger(__name__)

# Asked once after start-up: an actor that answers has finished `on_start`.
PING = "ping"
# Fault injection: the actor that receives it dies, as if a bug had killed it.
CRASH = "crash"


class _TakeLatest:
    """The FIFO message that makes an actor handle what waits in its latest lane."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TAKE_LATEST"


TAKE_LATEST = _TakeLatest()


class _TakeLatestEnvelope:
    """What pykka's actor loop reads from an inbox: `message` and `reply_to` (pykka's own
    Envelope class is private); one shared instance, nothing to fill in per wake-up."""

    message = TAKE_LATEST
    reply_to = None


_TAKE_LATEST_ENVELOPE = _TakeLatestEnvelope()


class Inbox(queue.SimpleQueue[Any]):
    """pykka's inbox protocol (`put`, `get`, `empty`) on a C `SimpleQueue`, plus the
    latest lane (module docstring).

    `SimpleQueue` instead of pykka's default `queue.Queue`: the latter takes a Python
    lock and a `Condition` on every `put` and `get` (and allocates a lock per wait),
    1.0 us per uncontended put+get against 0.06 us, and `tell -> Queue.put ->
    Condition.notify` was the largest single cost of a heartbeat. Unbounded either way.

    The lane needs no lock: `put_latest` stores, then wakes the actor unless a wake-up
    is pending; `take_latest` clears that flag *before* it empties the lane. An entry
    stored after the flag was cleared sends a new wake-up, one stored before is taken.
    Racing senders can at worst send a wake-up too many, which finds the lane empty.
    """

    __slots__ = ("_armed", "_latest")

    def __init__(self) -> None:
        super().__init__()
        self._latest: dict[Hashable, Any] = {}
        self._armed = False

    def put_latest(self, key: Hashable, message: Any) -> None:
        self._latest[key] = message
        if not self._armed:
            self._armed = True
            self.put(_TAKE_LATEST_ENVELOPE)

    def take_latest(self) -> list[Any]:
        """The lane's messages, oldest key first; called by the actor on TAKE_LATEST."""
        self._armed = False
        latest, taken = self._latest, []
        while True:
            try:
                taken.append(latest.popitem()[1])
            except KeyError:
                taken.reverse()  # popitem is last-in first-out
                return taken


class SafeActor(pykka.ThreadingActor):
    """Dispatches each message to `handle`, catching what it raises."""

    bus: Bus
    # Told ChildDied(kind, key) if this actor dies; `key` names what it was looking after.
    parent: pykka.ActorRef[Any] | None = None
    supervision_key = ""

    def __init__(self) -> None:
        super().__init__()
        self.handler_errors = 0

    @staticmethod
    def _create_actor_inbox() -> Inbox:
        return Inbox()

    def on_receive(self, message: Any) -> Any:
        if message is TAKE_LATEST:
            inbox = self.actor_inbox
            assert isinstance(inbox, Inbox)
            for latest in inbox.take_latest():
                self._dispatch(latest)
            return None
        if message == PING:
            return PING
        if message == CRASH:
            raise ActorCrash(f"{type(self).__name__} {self.supervision_key} crashed on request")
        return self._dispatch(message)

    def _dispatch(self, message: Any) -> Any:
        try:
            return self.handle(message)
        except Exception as exc:
            if isinstance(exc, ActorCrash):
                raise  # deliberate: let the actor die so supervision can be exercised
            self.handler_errors += 1
            # The requester gets an id to quote, never the exception's text; the log has both.
            error_id = f"err-{uuid.uuid4().hex[:12]}"
            name, kind = type(self).__name__, type(message).__name__
            log.exception("%s failed on %s (error id %s)", name, kind, error_id)
            reply = getattr(message, "reply", None)
            if isinstance(reply, str) and reply:
                reply_error(self.bus, reply, "internal", f"internal error, id {error_id}")
            return None

    def serve(self, server: Server, subjects: Subjects, drops: Drops) -> list[SubscriptionHandle]:
        """Subscribes to the endpoints `server` serves: each request becomes a `Request`."""
        me = self.actor_ref

        def on_request(endpoint: Any, body: Any, reply: str) -> None:
            safe_tell(me, Request(endpoint=endpoint, body=body, reply=reply))

        return serve(self.bus, subjects, served_by(server), on_request, drops)

    def handle(self, message: Any) -> Any:
        log.warning("%s: unexpected message %r", type(self).__name__, message)
        return None

    def on_failure(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            self.on_stop()  # pykka skips it on failure: release subscriptions all the same
        finally:
            if self.parent is not None:
                safe_tell(
                    self.parent,
                    ChildDied(
                        kind=type(self).__name__, key=self.supervision_key, error=repr(exc_value)
                    ),
                )


def safe_tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    """`tell` that tolerates a stopped actor: timers and subscriptions may outlive it."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        log.debug("dropped %s for stopped %s", type(message).__name__, ref)


def tell_latest(ref: pykka.ActorRef[Any], key: Hashable, message: Any) -> None:
    """`tell` through the latest lane of a SafeActor: replaces an unread message of the
    same key (a plain `tell` to other actors). Tolerates a stopped actor, as `safe_tell`."""
    inbox = ref.actor_inbox
    if not isinstance(inbox, Inbox):
        safe_tell(ref, message)
    elif ref.is_alive():
        inbox.put_latest(key, message)
    else:
        log.debug("dropped %s for stopped %s", type(message).__name__, ref)


class ActorCrash(Exception):
    """Raised on purpose (fault injection) to kill an actor and test its restart."""
