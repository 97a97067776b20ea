"""Opening a NATS connection: the one place that sets reconnect policy and logging."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client

log = logging.getLogger(__name__)

CONNECT_ERRORS = (nats.errors.Error, OSError, TimeoutError)


async def close_connection(client: Client) -> None:
    """Closes a connection whatever state it is in: nats-py's close can also raise
    RuntimeError when the server went away mid-close (uvloop's transport is gone)."""
    with contextlib.suppress(*CONNECT_ERRORS, RuntimeError):
        await client.close()


class BusError(RuntimeError):
    """The bus could not connect, or was used after it stopped."""


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

    The first connection must succeed within `connect_timeout_s`, else BusError: nats-py
    alone would retry it forever. `closing()` true means a disconnect is on purpose.
    `disconnected_hook()` (not called for a disconnect on purpose) and `reconnected_hook()`
    run on the loop, after the log line, and must not block.
    """
    client = Client()

    async def on_error(exc: Exception) -> None:
        log.warning("%s: nats error: %s", name, exc)

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
        await asyncio.wait_for(client.connect(url, **settings), connect_timeout_s)
    except CONNECT_ERRORS as exc:
        await client.close()
        reason = str(exc) or f"no server answered within {connect_timeout_s:g}s"
        raise BusError(f"cannot connect to NATS at {url}: {reason}") from exc
    return client
