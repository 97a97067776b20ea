"""Telling a running nats-server about a re-signed account (new revocations), at once.

A system-account user asks `$SYS.REQ.CLAIMS.UPDATE` with the account JWT: the server
stores it in its resolver directory and closes the live connections of revoked users.
"""

from __future__ import annotations

import asyncio
import json

import nats.errors

from bus.connection import CONNECT_ERRORS, BusError, ClientAuth, close_connection, open_connection

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


class ClaimsRefused(BusError):
    """The server was reached but did not take the update."""


async def push_account(url: str, auth: ClientAuth, account_jwt: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - the NATS request's own timeout
    """Pushes `account_jwt` to the server at `url`: BusError if it cannot be reached,
    ClaimsRefused if it did not take the update."""
    nc = await open_connection(
        url, name="gatefleet-claims", connect_timeout_s=timeout, **auth.options()
    )
    try:
        reply = await nc.request(CLAIMS_UPDATE, account_jwt.encode(), timeout=timeout)
    except (nats.errors.Error, *CONNECT_ERRORS) as exc:
        raise ClaimsRefused(f"no answer to the account update: {exc!r}") from exc
    finally:
        await close_connection(nc)
    try:
        answer = json.loads(reply.data)
    except ValueError:
        answer = {}
    if not isinstance(answer, dict) or "error" in answer or "data" not in answer:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        why = error.get("description", reply.data[:200].decode(errors="replace"))
        raise ClaimsRefused(f"the server refused the account update: {why}")


def push_account_blocking(url: str, auth: ClientAuth, account_jwt: str) -> None:
    asyncio.run(push_account(url, auth, account_jwt))
