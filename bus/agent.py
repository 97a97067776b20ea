"""Compatibility path: the gateway library moved to `gatefleet.gateway` (0.1.0 documented
`from bus.agent import GatewayAgent`). The one import in bus/ that points up, on purpose:
nothing in the orchestrator imports this module."""

from gatefleet.gateway import *  # noqa: F403 - the whole public surface, as it was
from gatefleet.gateway import __all__  # noqa: F401 - re-exported: the same names
