"""What every gatefleet actor shares: per-message error isolation.

pykka kills an actor whose `on_receive` raises on a `tell`. Bad input is rejected at the
bus edge, so an exception here is a bug: it is logged and counted, the actor lives on,
and a request that was being served gets an `internal` error reply instead of silence.
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from bus.edge import reply_error
from bus.runtime import Bus

log = logging.getLogger(__name__)

# Asked once after start-up: an actor that answers has finished `on_start`.
PING = "ping"


class SafeActor(pykka.ThreadingActor):
    """Dispatches each message to `handle`, catching what it raises."""

    bus: Bus

    def __init__(self) -> None:
        super().__init__()
        self.handler_errors = 0

    def on_receive(self, message: Any) -> Any:
        if message is PING:
            return PING
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


def safe_tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    """`tell` that tolerates a stopped actor: timers and subscriptions may outlive it."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        log.debug("dropped %s for stopped %s", type(message).__name__, ref)


class ActorCrash(Exception):
    """Raised on purpose (fault injection) to kill an actor and test its restart."""
