"""The HTTP API's way onto NATS: one request, answered as (HTTP status, JSON body).

Runs on the HTTP API's own bus loop (the aiohttp handlers' loop), so it awaits the nats
client directly. The reply body is passed through untouched; only its status is read:
an error reply's `code` picks the HTTP status, anything else is 200. When nobody
answers, the body is an `unavailable` error built here, in the protocol's shape.
"""

from __future__ import annotations

import logging

import msgspec
import nats.errors

from bus.connection import BusError
from bus.edge import error_body
from bus.runtime import Bus
from schemas.api import ErrorCode
from schemas.codec import decode

log = logging.getLogger(__name__)

HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "not_found": 404,
    "unavailable": 503,
    "internal": 500,
}
OK = 200
PAYLOAD_TOO_LARGE = 413


class _Code(msgspec.Struct):
    code: str = "internal"


class _ErrorProbe(msgspec.Struct):
    """Just enough of a reply to tell an error reply from the others."""

    error: _Code | None = None


def status_of(reply: bytes) -> int:
    """The HTTP status of a `P.api.*` reply body: 200, or its error code's status."""
    try:
        probe = decode(reply, _ErrorProbe)
    except msgspec.DecodeError:
        # Every reply is a JSON object; anything else is a bug on the serving side.
        return HTTP_STATUS["internal"]
    return OK if probe.error is None else HTTP_STATUS.get(probe.error.code, 500)


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
        msg = await nc.request(subject, body, timeout=timeout)
    except nats.errors.NoRespondersError:
        return _unavailable(f"nobody answers on {subject}: is gatefleet running?")
    except (nats.errors.TimeoutError, TimeoutError):
        return _unavailable(f"no answer on {subject} within {timeout:g}s")
    except (nats.errors.Error, BusError) as exc:
        log.warning("request on %s failed: %s", subject, exc)
        return _unavailable(f"request on {subject} failed: {exc}")
    return status_of(msg.data), msg.data


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
