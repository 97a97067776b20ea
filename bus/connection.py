"""Opening a NATS connection: the one place that sets reconnect policy and logging."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client

log = logging.getLogger(__name__)

CONNECT_ERRORS = (nats.errors.Error, OSError, TimeoutError)
CLOSE_TIMEOUT_S = 1.0


async def close_connection(client: Client) -> None:
    """Closes a connection whatever state it is in: nats-py's close can also raise
    RuntimeError when the server went away mid-close (uvloop's transport is gone)."""
    with contextlib.suppress(*CONNECT_ERRORS, RuntimeError):
        await client.close()


class BusError(RuntimeError):
    """The bus could not connect, or was used after it stopped."""


class AccessRefused(BusError):
    """The server refused the connection's credentials, or TLS failed: retrying is futile."""


@dataclass(frozen=True)
class ClientAuth:
    """Who a connection is and which server it trusts: a NATS `.creds` file (user JWT and
    seed) and a CA file for TLS. Empty: none (an open bus, plain TCP)."""

    creds: str = ""
    tls_ca: str = ""

    def options(self) -> dict[str, Any]:
        """nats-py connect options; OSError or ssl.SSLError for an unreadable CA file."""
        options: dict[str, Any] = {}
        if self.creds:
            options["user_credentials"] = self.creds
        if self.tls_ca:
            options["tls"] = ssl.create_default_context(cafile=self.tls_ca)
        return options


async def open_connection(
    url: str,
    *,
    name: str,
    connect_timeout_s: float = 10.0,
    closing: Callable[[], bool] | None = None,
    disconnected_hook: Callable[[], None] | None = None,
    reconnected_hook: Callable[[], None] | None = None,
    **options: Any,
) -> Client:
    """A connection that, once up, reconnects forever (logging each state change).

    `url` may name several servers of one cluster, comma-separated: the first connection
    goes to any of them that answers, and so does each reconnect.
    The first connection must succeed within `connect_timeout_s`, else BusError: nats-py
    alone would retry it forever. `closing()` true means a disconnect is on purpose.
    `disconnected_hook()` (not called for a disconnect on purpose) and `reconnected_hook()`
    run on the loop, after the log line, and must not block.
    """
    client = Client()
    connected = False

    async def on_error(exc: Exception) -> None:
        log.warning("%s: nats error: %s", name, exc)
        if not connected and _refusal(exc):
            # The same credentials will not do better: nats-py reads this right after this
            # callback and gives up the first connection with `exc`.
            client.options["allow_reconnect"] = False

    async def on_disconnected() -> None:
        if not client.is_closed and not (closing and closing()):
            log.warning("%s: disconnected from %s; reconnecting", name, url)
            if disconnected_hook is not None:
                disconnected_hook()

    async def on_reconnected() -> None:
        server = client.connected_url
        log.info("%s: reconnected to %s", name, server.geturl() if server else "?")
        if reconnected_hook is not None:
            reconnected_hook()

    settings: dict[str, Any] = {
        "name": name,
        "connect_timeout": max(1, math.ceil(connect_timeout_s)),
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # forever, every reconnect_time_wait seconds
        "reconnect_time_wait": 1,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        **options,
    }
    try:
        await asyncio.wait_for(client.connect(server_urls(url), **settings), connect_timeout_s)
        connected = True
    except CONNECT_ERRORS as exc:
        # Bounded: after a failed TLS handshake nats-py's close waits on a transport that
        # never reports closed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT_S)
        reason = str(exc) or f"no server answered within {connect_timeout_s:g}s"
        error = AccessRefused if _refusal(exc) else BusError
        raise error(f"cannot connect to NATS at {url}: {_refusal(exc) or reason}") from exc
    return client


def server_urls(url: str) -> list[str]:
    """The servers of a comma-separated `url` (`[bus] url`, `--nats`), blanks ignored."""
    return [part.strip() for part in url.split(",") if part.strip()]


_REFUSALS = {
    "authorization violation": "the server refused the credentials (none, wrong or revoked)",
    "authentication expired": "the server refused the credentials: they expired",
    "authentication revoked": "the server refused the credentials: they were revoked",
}


def _refusal(exc: BaseException) -> str:
    """Why the server refused a connection (credentials, TLS), in one line; "" if it did not."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    text = str(exc).lower()
    return next((why for key, why in _REFUSALS.items() if key in text), "")
