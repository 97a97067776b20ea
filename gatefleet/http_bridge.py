"""The HTTP API's way onto NATS: one request, answered as (HTTP status, JSON body).

Runs on the HTTP API's own bus loop (the aiohttp handlers' loop), so it awaits the nats
client directly. The reply body is passed through untouched; only its status is read:
an error reply's `code` picks the HTTP status, anything else is 200. When nobody
answers, the body is an `unavailable` error built here, in the protocol's shape.
"""

from __future__ import annotations

import logging

import msgspec

from bus.connection import BusError
from bus.edge import error_body
from bus.runtime import Bus
from schemas.api import HTTP_STATUS, ErrorCode, MaybeError
from schemas.codec import decode

log = logging.getLogger(__name__)

OK = 200
PAYLOAD_TOO_LARGE = 413


def status_of(reply: bytes) -> int:
    """The HTTP status of a `P.api.*` reply body: 200, or its error code's status."""
    try:
        probe = decode(reply, MaybeError)
    except msgspec.DecodeError:
        # Every reply is a JSON object with a known error code, if any; anything else is a
        # bug on the serving side.
        return HTTP_STATUS["internal"]
    return OK if probe.error is None else HTTP_STATUS[probe.error.code]


async def request(
    bus: Bus,
    subject: str,
    body: bytes,
    timeout: float,  # noqa: ASYNC109 - the NATS request's own timeout, not a wrapper's
) -> tuple[int, bytes]:
    """Requests `subject` (call on `bus`'s loop): (HTTP status, reply or error body)."""
    try:
        nc = bus.nc
        if len(body) > nc.max_payload:
            return _error(
                PAYLOAD_TOO_LARGE,
                "bad_request",
                f"request of {len(body)} bytes is over the NATS server's limit of "
                f"{nc.max_payload} bytes",
            )
        reply = await bus.ask_on_loop(subject, body, timeout)
    except BusError as exc:
        log.warning("%s", exc)
        return _unavailable(str(exc))
    return status_of(reply), reply


def connected(bus: Bus) -> bool:
    """Whether the bus's NATS connection is up right now (not reconnecting or closed)."""
    try:
        return bus.nc.is_connected
    except BusError:
        return False


def _unavailable(message: str) -> tuple[int, bytes]:
    return _error(HTTP_STATUS["unavailable"], "unavailable", message)


def _error(status: int, code: ErrorCode, message: str) -> tuple[int, bytes]:
    return status, error_body(code, message)
