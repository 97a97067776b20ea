"""What gatefleet replicas tell one another (PROTOCOL.md section 5, Replicas).

Only gatefleet itself (an admin user) may publish under `P.replica.`: no credential
handed out allows it (gatefleet/security/permissions.py).
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta

from schemas.types import GatewayId, NonNegativeFloat, ReplicaId

# Rows of one ProbeResults at most: 2,000 rows of the longest ids and reasons stay far
# under NATS's 1 MiB payload limit.
MAX_PROBE_ROWS: Final = 2000
MAX_PROBE_REASON: Final = 256
ProbeReason = Annotated[str, Meta(max_length=MAX_PROBE_REASON)]
# One probe's outcome: [gateway_id, rtt_ms, null] answered, [gateway_id, null, reason]
# failed (reason: "timeout", "no_responders", "bad pong: ...", ...).
ProbeRow = tuple[GatewayId, NonNegativeFloat | None, ProbeReason | None]


class ProbeResults(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The leading replica's probe results of the last ~100 ms, in the order it had
    them, for the standbys to apply as their own."""

    replica_id: ReplicaId  # the leader that probed
    results: Annotated[list[ProbeRow], Meta(max_length=MAX_PROBE_ROWS)]
