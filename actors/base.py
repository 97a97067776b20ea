"""What every gatefleet actor shares: per-message error isolation, supervision, lanes.

Every gatefleet actor is a `PooledActor` (actors/dispatch.py): its inbox is run by a
dispatcher (a pool of worker threads, a thread of its own, or the bus loop), not by a
thread per actor. Which one is the actor's `dispatch` class attribute, resolved by the
`Runtime` (actors/runtime.py) it is given.

pykka kills an actor whose `on_receive` raises on a `tell`. Bad input is rejected at the
bus edge, so an exception here is a bug: it is logged and counted, the actor lives on,
and a request that was being served gets an `internal` error reply (with an error id,
never the exception's text) instead of silence.

An actor that dies all the same (an ActorCrash, injected with the CRASH message to test
recovery, or a failing `on_start`) cleans up as if stopped and tells its `parent`
ChildDied, so the parent can start a new one with rebuilt state.

Lanes. Besides its FIFO, an inbox has a *latest* lane, keyed, where a newer message
replaces an unread older one of the same key (`tell_latest`): for state that only
matters as its newest value, e.g. a gateway's snapshot for the load balancer, whose
backlog so stays bounded by the fleet's size. The requests of `P.api.*` (`serve`) are
bounded too: while MAX_PENDING_REQUESTS wait for an actor, more are answered
`unavailable` at once (shed, and counted), never left to wait or get no answer. The
actors that serve requests each have a thread of their own (the Runtime's "own"
dispatchers), or run on the API lane's loop (the load balancer), so gateway work on the
gateways' pool never delays an answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, ClassVar

import msgspec
import pykka

from actors.context import Context
from actors.dispatch import Dispatcher, PooledActor, PooledInbox
from actors.messages import ChildDied, Request
from bus.edge import reply_error, serve
from bus.runtime import Bus, SubscriptionHandle
from schemas.endpoints import Endpoint, Server, served_by

log = logging.getLogger(__name__)

# Asked once after start-up: an actor that answers has finished `on_start`.
PING = "ping"
# Fault injection: the actor that receives it dies, as if a bug had killed it.
CRASH = "crash"
# Requests waiting for one actor before more are shed with `unavailable` (`serve`).
MAX_PENDING_REQUESTS = 1000


class SafeActor(PooledActor):
    """Dispatches each message to `handle`, catching what it raises."""

    bus: Bus
    # Told ChildDied(kind, key) if this actor dies; `key` names what it was looking after.
    parent: pykka.ActorRef[Any] | None = None
    supervision_key = ""
    # Which of the Runtime's dispatchers runs it (actors/runtime.py).
    dispatch: ClassVar[str] = "own"

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher=dispatcher)
        self.handler_errors = 0
        self.requests_handled = 0
        # Where replies go: the API lane's connection once `serve` has run (its loop is
        # not behind with heartbeats, so an answer is not held up on the way out either).
        self._replies: Bus | None = None

    @property
    def replies(self) -> Bus:
        return self._replies or self.bus

    def on_receive(self, message: Any) -> Any:
        if message == PING:
            return PING
        if message == CRASH:
            raise ActorCrash(f"{type(self).__name__} {self.supervision_key} crashed on request")
        return self._dispatch(message)

    def _dispatch(self, message: Any) -> Any:
        if type(message) is Request:
            self.requests_handled += 1
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
                reply_error(self.replies, reply, "internal", f"internal error, id {error_id}")
            return None

    def serve(
        self,
        server: Server,
        context: Context,
        direct: Mapping[Endpoint[Any, Any], Callable[[Any], msgspec.Struct]] | None = None,
        endpoints: Iterable[Endpoint[msgspec.Struct, msgspec.Struct]] | None = None,
    ) -> list[SubscriptionHandle]:
        """Subscribes to the endpoints `server` serves, on the API lane (a connection of
        its own, so requests never wait unread behind heartbeats): each request becomes a
        `Request` told to this actor, or, while MAX_PENDING_REQUESTS of them wait for it,
        an `unavailable` reply at once (shed, counted). Requests keep their place among
        the actor's other messages, so a reply reflects everything told before it.
        `direct` endpoints are answered on the lane itself, from what the function
        returns: it must only read what the actor publishes for that (immutable views).
        `endpoints`: these of the server's only (the benchmark's copy of a path)."""
        ref, bus, shed = self.actor_ref, context.runtime.api_bus, context.shed
        self._replies = bus
        told = [0]  # the loop's count; `requests_handled` is the actor's: no lock

        answers = direct or {}

        def on_request(endpoint: Any, body: Any, reply: str) -> None:
            answer = answers.get(endpoint)
            if answer is not None:
                bus.publish(reply, answer(body))
                return
            if told[0] - self.requests_handled >= MAX_PENDING_REQUESTS:
                shed.add("requests")
                reply_error(bus, reply, "unavailable", f"{server} is overloaded; retry")
                return
            request = Request(endpoint=endpoint, body=body, reply=reply)
            told[0] += 1
            if self.receive_now(request):
                return
            try:
                ref.tell(request)
            except pykka.ActorDeadError:
                told[0] -= 1
                reply_error(bus, reply, "unavailable", f"{server} is stopping; retry")

        return serve(
            bus,
            context.subjects,
            served_by(server) if endpoints is None else endpoints,
            on_request,
            context.drops,
            context.runtime.service,
            lease=context.lease,
        )

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
                        kind=type(self).__name__,
                        key=self.supervision_key,
                        error=repr(exc_value),
                        urn=self.actor_urn,
                    ),
                )


def safe_tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    """`tell` that tolerates a stopped actor: timers and subscriptions may outlive it."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        log.debug("dropped %s for stopped %s", type(message).__name__, ref)


def stop_all(refs: Iterable[pykka.ActorRef[Any]], timeout: float) -> int:
    """Stops actors together (not one round trip each, as `ref.stop()` in a loop would);
    returns how many had not stopped within `timeout`. Never from a pooled actor's own
    dispatcher: waiting on actors it runs could wait forever."""
    futures = [ref.stop(block=False) for ref in refs]
    deadline = time.monotonic() + timeout
    late = 0
    for future in futures:
        try:
            future.get(timeout=max(0.0, deadline - time.monotonic()))
        except pykka.Timeout:
            late += 1
    if late:
        log.warning("%d actors did not stop within %.1fs", late, timeout)
    return late


def tell_latest(ref: pykka.ActorRef[Any], key: Hashable, message: Any) -> None:
    """`tell` through the latest lane of a pooled actor: replaces an unread message of the
    same key (a plain `tell` to other actors). Tolerates a stopped actor, as `safe_tell`."""
    inbox = ref.actor_inbox
    if not isinstance(inbox, PooledInbox):
        safe_tell(ref, message)
    elif ref.is_alive():
        inbox.put_latest(key, message)
    else:
        log.debug("dropped %s for stopped %s", type(message).__name__, ref)


class ActorCrash(Exception):
    """Raised on purpose (fault injection) to kill an actor and test its restart."""
