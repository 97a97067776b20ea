"""Compatibility path: the gateway library moved to `gatefleet.gateway` (0.1.0 documented
`from bus.agent import GatewayAgent`). The one import in bus/ that points up, on purpose:
nothing in the orchestrator imports this module."""

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
