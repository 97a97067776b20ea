"""The bus edge: where bytes become Structs, bad input is dropped and counted, and
requests that cannot be served get an error reply.

Handlers built here run on the bus loop: they decode and hand over (a `tell`), nothing
more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec

from bus.leadership import Lease
from bus.log_throttle import LogThrottle
from bus.micro import ERROR_CODE_HEADER, ERROR_HEADER, MicroService
from bus.runtime import Bus, Inbound, Reply, RequestFailed, SubscriptionHandle
from bus.subjects import Subjects
from schemas.api import HTTP_STATUS, ErrorCode, ErrorDetail, ErrorReply
from schemas.codec import decode, encode, error_cause
from schemas.endpoints import API_QUEUE, Endpoint
from schemas.wire import Goodbye, Heartbeat

log = logging.getLogger(__name__)
T = TypeVar("T", bound=msgspec.Struct)

MAX_REQUEST_BYTES = 8 * 1024 * 1024
LOG_EVERY_S = 1.0
# A request only the leader may answer, on a replica that does not lead (issue 16).
FORWARD_TIMEOUT_S = 5.0
# Sent only when nobody took the request, so that sending it again does it once.
RETRY_AFTER_MS = 1000
NO_LEADER = "no replica leads right now (a take-over is under way); retry"
NOT_LEADING = "this replica no longer leads; retry"
Handler = Callable[[Inbound], None]


class Tally:
    """Counts per key, written on one thread and read on another (a status request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> int:
        """Adds `n` to `key`'s count; returns the new count."""
        with self._lock:
            count = self._counts[key] = self._counts.get(key, 0) + n
        return count

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Drops(Tally):
    """Malformed messages dropped, counted per cause, logged at most once a second per cause."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = LogThrottle(LOG_EVERY_S)

    def drop(self, cause: str, subject: str, detail: str) -> None:
        count = self.add(cause)
        if self._throttle.admit(cause) is None:
            return
        log.warning("dropped message on %s (%s, %d so far): %s", subject, cause, count, detail)


def decode_or_drop(msg: Inbound, kind: type[T], drops: Drops) -> T | None:
    try:
        return decode(msg.data, kind)
    except msgspec.DecodeError as exc:
        drops.drop(error_cause(exc), msg.subject, str(exc))
        return None


# What gateways publish on their own subjects, each carrying its gateway_id.
G = TypeVar("G", Heartbeat, Goodbye)


def decode_from_gateway(msg: Inbound, kind: type[G], gateway_id: str, drops: Drops) -> G | None:
    """Decodes a gateway's message and checks it speaks for the gateway of its subject:
    the subject is what NATS permissions guard, so a payload naming another id is dropped."""
    body = decode_or_drop(msg, kind, drops)
    if body is not None and body.gateway_id != gateway_id:
        drops.drop("id_mismatch", msg.subject, f"payload says {body.gateway_id!r}")
        return None
    return body


def error_body(code: ErrorCode, message: str, retry_after_ms: int | None = None) -> bytes:
    detail = ErrorDetail(code=code, message=message, retry_after_ms=retry_after_ms)
    return encode(ErrorReply(error=detail))


def reply_error(
    bus: Bus, reply: str, code: ErrorCode, message: str, retry_after_ms: int | None = None
) -> None:
    """Sends an error reply; also adds the NATS micro error headers for micro-aware clients."""
    headers = {ERROR_CODE_HEADER: str(HTTP_STATUS[code]), ERROR_HEADER: message[:200]}
    bus.publish(reply, error_body(code, message, retry_after_ms), headers=headers)


def request_handler(
    bus: Bus, kind: type[T], on_request: Callable[[T, str], object], drops: Drops
) -> Callable[[Inbound], None]:
    """A subscription handler for `P.api.*`: decodes the request (empty body = `{}`) and
    calls `on_request(request, reply_subject)`, or answers `bad_request` itself."""

    def handle(msg: Inbound) -> None:
        if not msg.reply:
            drops.drop("no_reply_subject", msg.subject, "a request needs a reply subject")
            return
        if len(msg.data) > MAX_REQUEST_BYTES:
            reply_error(bus, msg.reply, "bad_request", f"request over {MAX_REQUEST_BYTES} bytes")
            return
        try:
            request = decode(msg.data or b"{}", kind)
        except msgspec.DecodeError as exc:
            drops.drop("bad_request", msg.subject, str(exc))
            reply_error(bus, msg.reply, "bad_request", str(exc))
            return
        on_request(request, msg.reply)

    return handle


def serve(
    bus: Bus,
    subjects: Subjects,
    endpoints: Iterable[Endpoint[msgspec.Struct, msgspec.Struct]],
    on_request: Callable[[Endpoint[msgspec.Struct, msgspec.Struct], msgspec.Struct, str], object],
    drops: Drops,
    service: MicroService,
    lease: Lease | None = None,
) -> list[SubscriptionHandle]:
    """Subscribes to each endpoint's `P.api.<name>` in the API queue group; a request that
    decodes is handed to `on_request(endpoint, request, reply_subject)` (on the loop).
    `service` times each request from its arrival here to its reply (`bus` must be the
    bus it was started on). With a `lease`, what only the leader may do (`needs_leader`)
    is forwarded to the leading replica when this one does not lead."""
    handles = []
    for endpoint in endpoints:

        def on_body(request: msgspec.Struct, reply: str, endpoint: Any = endpoint) -> None:
            on_request(endpoint, request, reply)

        handler = request_handler(bus, endpoint.request, on_body, drops)
        if lease is not None and needs_leader(endpoint):
            own = subjects.replica_api(lease.replica_id, endpoint.name)
            handles.append(bus.subscribe(own, _while_leading(bus, lease, handler)))
            handler = _forwarding(bus, subjects, lease, endpoint.name, handler)
        timed = service.timed(endpoint.name, handler)
        handles.append(bus.subscribe(subjects.api(endpoint.name), timed, queue=API_QUEUE))
    return handles


def needs_leader(endpoint: Endpoint[msgspec.Struct, msgspec.Struct]) -> bool:
    """Writes, and whatever the distributor answers: only the leader holds the
    distributions (a standby has not loaded them)."""
    return endpoint.writes or endpoint.served_by == "distributor"


def _while_leading(bus: Bus, lease: Lease, handler: Handler) -> Handler:
    """This replica's own subject for forwarded requests: served only while it leads."""

    def handle(msg: Inbound) -> None:
        if lease.still_leader():
            handler(msg)
        elif msg.reply:
            reply_error(bus, msg.reply, "unavailable", NOT_LEADING, RETRY_AFTER_MS)

    return handle


def _forwarding(bus: Bus, subjects: Subjects, lease: Lease, name: str, handler: Handler) -> Handler:
    """Serves the request while this replica leads; else hands it to the leader and relays
    its answer, or answers `unavailable` at once while no leader is known."""

    def handle(msg: Inbound) -> None:
        if lease.still_leader():
            handler(msg)
            return
        reply = msg.reply
        if not reply:
            handler(msg)  # dropped and counted there
            return
        leader = lease.view.leader
        if leader is None or leader == lease.replica_id:
            reply_error(bus, reply, "unavailable", NO_LEADER, RETRY_AFTER_MS)
            return

        def relay(result: Reply | RequestFailed) -> None:
            if isinstance(result, Reply):
                bus.publish(reply, result.data, headers=result.headers)
            elif result.reason == "no_responders":  # nobody took it: safe to send again
                reply_error(bus, reply, "unavailable", NO_LEADER, RETRY_AFTER_MS)
            else:  # it may have been done: a retry hint would invite doing it twice
                why = f"the leading replica did not answer ({result.reason.partition(':')[0]})"
                reply_error(bus, reply, "unavailable", why)

        bus.request(subjects.replica_api(leader, name), msg.data, FORWARD_TIMEOUT_S, relay)

    return handle
