"""The replies of the NATS micro discovery protocol (`$SRV.PING|INFO|STATS`), as NATS's
clients and the `nats micro` command read them (the shapes of nats-py's `nats.micro`).

Times are in nanoseconds; `started` is RFC 3339 in UTC with microseconds.
"""

from __future__ import annotations

from typing import Final

import msgspec

PING_RESPONSE: Final = "io.nats.micro.v1.ping_response"
INFO_RESPONSE: Final = "io.nats.micro.v1.info_response"
STATS_RESPONSE: Final = "io.nats.micro.v1.stats_response"


class _Identity(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    name: str
    id: str
    version: str
    metadata: dict[str, str]


class PingResponse(_Identity, frozen=True):
    pass


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    """One running gatefleet replica, as its `$SRV.PING` answer describes it (issue 16):
    `gatefleet replicas`."""

    replica_id: str
    role: str  # "leader" or "standby"
    leader: str | None  # the leading replica as this one knows it
    epoch: int | None
    lease_renewed_at: str | None  # the lease's last renewal, by its holder's clock
    version: str  # gatefleet's version
    service_id: str  # its $SRV id


def replica_of(ping: PingResponse) -> Replica | None:
    """The replica a gatefleet `$SRV.PING` answer describes; None for other services."""
    meta = ping.metadata
    if "replica_id" not in meta:
        return None
    return Replica(
        replica_id=meta["replica_id"],
        role=meta.get("role", ""),
        leader=meta.get("leader") or None,
        epoch=int(meta["epoch"]) if meta.get("epoch", "").isdigit() else None,
        lease_renewed_at=meta.get("lease_renewed_at") or None,
        version=ping.version,
        service_id=ping.id,
    )


class EndpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class InfoResponse(_Identity, frozen=True):
    description: str
    endpoints: list[EndpointInfo]


class EndpointStats(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str  # "<code>:<message>" of the last error reply, "" if none
    processing_time: int  # nanoseconds, all requests together
    average_processing_time: int  # nanoseconds
    data: None = None  # no endpoint-specific stats (clients expect the key)


class StatsResponse(_Identity, frozen=True):
    started: str
    endpoints: list[EndpointStats]
