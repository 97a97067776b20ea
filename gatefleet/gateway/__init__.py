"""The gateway side of the wire contract: a library for gateways written in Python.

A NATS client of its own (it is not part of the orchestrator), so it talks to nats-py
directly. See `agent.py` for usage. The old path `bus.agent` still works.
"""

from gatefleet.gateway.agent import (
    ACCEPTED,
    ConfigHandler,
    ConfigResult,
    GatewayAgent,
    Metrics,
    MetricsSource,
    connect,
)

__all__ = [
    "ACCEPTED",
    "ConfigHandler",
    "ConfigResult",
    "GatewayAgent",
    "Metrics",
    "MetricsSource",
    "connect",
]
