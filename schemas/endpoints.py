"""Every `P.api.*` endpoint, declared once: its name, request and reply bodies, which actor
serves it, whether it changes state, and its HTTP route.

The actors subscribe from this table (`bus.edge.serve`), the Python client calls through
it, the HTTP API builds its routes from it, and a test holds docs/PROTOCOL.md to it. The
subjects are `P.api.<name>`, served in the queue group `API_QUEUE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

import msgspec

from schemas.api import (
    DistributeReply,
    DistributeRequest,
    DistributionActionRequest,
    DistributionGetRequest,
    DistributionListReply,
    DistributionListRequest,
    DistributionPage,
    Empty,
    FailbackReply,
    FailbackRequest,
    GatewaysReply,
    GatewaysRequest,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    MaintenanceReply,
    MaintenanceRequest,
    ReconcileReply,
    ReconcileRequest,
    RollbackRequest,
    SelectReply,
    SelectRequest,
    StatusReply,
)

Req_co = TypeVar("Req_co", bound=msgspec.Struct, covariant=True)
Rep_co = TypeVar("Rep_co", bound=msgspec.Struct, covariant=True)

# The actor that serves an endpoint (app.py starts one of each).
Server = Literal["load_balancer", "supervisor", "distributor"]
Method = Literal["GET", "POST"]

# Replicas share request subjects through this queue group (PROTOCOL.md section 5).
API_QUEUE: Final = "gatefleet-api"
HTTP_PREFIX: Final = "/api/v1/orchestration"


@dataclass(frozen=True, slots=True, eq=False)  # compared by identity: one object per endpoint
class Endpoint(Generic[Req_co, Rep_co]):
    name: str  # the subject's suffix: P.api.<name>
    request: type[Req_co]
    reply: type[Rep_co]
    served_by: Server
    writes: bool  # changes state (a read-only caller may not call it)
    # The HTTP route under HTTP_PREFIX; GET routes take the request's fields from the path
    # (`{field}`) and the query string, POST routes from the JSON body and the path.
    http: tuple[Method, str] | None = None

    def __repr__(self) -> str:
        return f"Endpoint({self.name})"


STATUS: Final = Endpoint(
    "status", Empty, StatusReply, "supervisor", writes=False, http=("GET", "/status")
)
GATEWAYS: Final = Endpoint(
    "gateways",
    GatewaysRequest,
    GatewaysReply,
    "load_balancer",
    writes=False,
    http=("GET", "/gateways"),
)
SELECT_GATEWAY: Final = Endpoint(
    "select-gateway",
    SelectRequest,
    SelectReply,
    "load_balancer",
    writes=False,
    http=("POST", "/select-gateway"),
)
LOAD_BALANCING_GET: Final = Endpoint(
    "load-balancing.get",
    Empty,
    LoadBalancingConfig,
    "load_balancer",
    writes=False,
    http=("GET", "/load-balancing"),
)
LOAD_BALANCING_SET: Final = Endpoint(
    "load-balancing.set",
    LoadBalancingUpdate,
    LoadBalancingConfig,
    "load_balancer",
    writes=True,
    http=("POST", "/load-balancing"),
)
DISTRIBUTE: Final = Endpoint(
    "distribute",
    DistributeRequest,
    DistributeReply,
    "distributor",
    writes=True,
    http=("POST", "/distribute"),
)
DISTRIBUTIONS_GET: Final = Endpoint(
    "distributions.get",
    DistributionGetRequest,
    DistributionPage,
    "distributor",
    writes=False,
    http=("GET", "/distributions/{distribution_id}"),
)
DISTRIBUTIONS_LIST: Final = Endpoint(
    "distributions.list",
    DistributionListRequest,
    DistributionListReply,
    "distributor",
    writes=False,
    http=("GET", "/distributions"),
)
DISTRIBUTIONS_PAUSE: Final = Endpoint(
    "distributions.pause",
    DistributionActionRequest,
    DistributionPage,
    "distributor",
    writes=True,
    http=("POST", "/distributions/{distribution_id}/pause"),
)
DISTRIBUTIONS_RESUME: Final = Endpoint(
    "distributions.resume",
    DistributionActionRequest,
    DistributionPage,
    "distributor",
    writes=True,
    http=("POST", "/distributions/{distribution_id}/resume"),
)
DISTRIBUTIONS_ABORT: Final = Endpoint(
    "distributions.abort",
    DistributionActionRequest,
    DistributionPage,
    "distributor",
    writes=True,
    http=("POST", "/distributions/{distribution_id}/abort"),
)
ROLLBACK: Final = Endpoint(
    "rollback",
    RollbackRequest,
    DistributeReply,
    "distributor",
    writes=True,
    http=("POST", "/rollback"),
)
RECONCILE: Final = Endpoint(
    "reconcile", ReconcileRequest, ReconcileReply, "distributor", writes=True
)
FAILBACK: Final = Endpoint("failback", FailbackRequest, FailbackReply, "supervisor", writes=True)
MAINTENANCE: Final = Endpoint(
    "maintenance",
    MaintenanceRequest,
    MaintenanceReply,
    "supervisor",
    writes=True,
    http=("POST", "/maintenance"),
)

ENDPOINTS: Final[tuple[Endpoint[msgspec.Struct, msgspec.Struct], ...]] = (
    STATUS,
    GATEWAYS,
    SELECT_GATEWAY,
    LOAD_BALANCING_GET,
    LOAD_BALANCING_SET,
    DISTRIBUTE,
    DISTRIBUTIONS_GET,
    DISTRIBUTIONS_LIST,
    DISTRIBUTIONS_PAUSE,
    DISTRIBUTIONS_RESUME,
    DISTRIBUTIONS_ABORT,
    ROLLBACK,
    RECONCILE,
    FAILBACK,
    MAINTENANCE,
)


def served_by(server: Server) -> list[Endpoint[msgspec.Struct, msgspec.Struct]]:
    return [endpoint for endpoint in ENDPOINTS if endpoint.served_by == server]
