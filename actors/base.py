"""What every gatefleet actor shares: per-message error isolation and supervision.

pykka kills an actor whose `on_receive` raises on a `tell`. Bad input is rejected at the
bus edge, so an exception here is a bug: it is logged and counted, the actor lives on,
and a request that was being served gets an `internal` error reply instead of silence.

An actor that dies all the same (an ActorCrash, injected with the CRASH message to test
recovery) cleans up as if stopped and tells its `parent` ChildDied, so the parent can
start a new one with rebuilt state.
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from actors.messages import ChildDied
from bus.edge import reply_error
from bus.runtime import Bus

log = logging.getLogger(__name__)

# Asked once after start-up: an actor that answers has finished `on_start`.
PING = "ping"
# Fault injection: the actor that receives it dies, as if a bug had killed it.
CRASH = "crash"


class SafeActor(pykka.ThreadingActor):
    """Dispatches each message to `handle`, catching what it raises."""

    bus: Bus
    # Told ChildDied(kind, key) if this actor dies; `key` names what it was looking after.
    parent: pykka.ActorRef[Any] | None = None
    supervision_key = ""

    def __init__(self) -> None:
        super().__init__()
        self.handler_errors = 0

    def on_receive(self, message: Any) -> Any:
        if message == PING:
            return PING
        if message == CRASH:
            raise ActorCrash(f"{type(self).__name__} {self.supervision_key} crashed on request")
        try:
            return self.handle(message)
        except Exception as exc:
            if isinstance(exc, ActorCrash):
                raise  # deliberate: let the actor die so supervision can be exercised
            self.handler_errors += 1
            log.exception("%s failed on %s", type(self).__name__, type(message).__name__)
            reply = getattr(message, "reply", None)
            if isinstance(reply, str) and reply:
                reply_error(self.bus, reply, "internal", f"{type(exc).__name__}: {exc}")
            return None

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


class ActorCrash(Exception):
    """Raised on purpose (fault injection) to kill an actor and test its restart."""
