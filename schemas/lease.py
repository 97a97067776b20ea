"""The leader lease, as stored: key `lease` of bucket `<prefix>_leader`.

Every write is a compare-and-set on the revision the writer last read (or "the key does
not exist"): by the replica that holds the lease (renewals) or takes it. The rules are
bus/leadership.py's, the calls bus/lease.py's.
"""

from __future__ import annotations

from typing import Final

import msgspec

from schemas.stored import Time
from schemas.types import Epoch, ReplicaId

LEASE_BUCKET: Final = "leader"
LEASE_KEY: Final = "lease"


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    replica_id: ReplicaId
    # Grows with every acquisition and never goes back; a renewal keeps it.
    epoch: Epoch
    # When the holder wrote it, by its own wall clock: for people (which replica renewed
    # when), never compared with another machine's clock.
    renewed_at: Time
    # Given up by a holder that stopped cleanly: any replica may take it at once.
    released: bool = False
