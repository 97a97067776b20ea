"""A standby's distribution counts (issue 16): each stored distribution's status, from
its keys as the distributions bucket's watch tells them, so that `status` counts the
same distributions on every replica (the leader counts the records it holds).

A distribution counts once its spec is stored (as at a load), with the status its
progress says, or what its chunks say while it has none (actors/distribution_store.py
decides both). Only the keys that decide a status are decoded: the spec, the progress,
and a chunk while no progress is stored. The watch does not tell keys purged without a
marker (retention's deletes): the finished distributions past `keep` are dropped here by
retention's own rule (actors/retention.py), as the leader deletes them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from actors.distribution_store import DIST_KEY_RE, given_up, unstored_status
from actors.retention import past_history
from schemas.codec import DecodeError, decode
from schemas.stored import DistributionProgress, DistributionSpec, GatewayChunk
from schemas.types import DistributionStatus

log = logging.getLogger(__name__)


class StoredChanged(NamedTuple):
    """The distributions bucket's watch -> a standing-by Distributor: a key's value
    (None: deleted)."""

    key: str
    value: bytes | None


@dataclass
class _Stored:
    """One distribution's keys as last told (decoded)."""

    id: str
    spec: DistributionSpec | None = None
    progress: DistributionStatus | None = None
    started: set[int] = field(default_factory=set)  # chunks with a gateway sent to

    @property
    def created_at(self) -> datetime:
        assert self.spec is not None
        return self.spec.created_at

    @property
    def status(self) -> DistributionStatus:
        assert self.spec is not None
        status = self.progress or unstored_status(bool(self.started))
        return "failed" if given_up(self.spec, status) else status


class StoredStatuses:
    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._stored: dict[str, _Stored] = {}

    def apply(self, key: str, value: bytes | None) -> bool:
        """A key's value as the watch tells it (None: deleted); True if a status has
        changed (or a distribution appeared, or went)."""
        match = DIST_KEY_RE.fullmatch(key)
        if match is None or value is None:
            return False  # counters, contents; a spec is only ever purged (never told)
        dist_id, is_spec, chunk = match.groups()
        stored = self._stored.setdefault(dist_id, _Stored(dist_id))
        before = None if stored.spec is None else stored.status
        try:
            if is_spec:
                stored.spec = decode(value, DistributionSpec)
            elif chunk is None:
                stored.progress = decode(value, DistributionProgress).status
            elif stored.progress is None:  # else its chunks say nothing of its status
                gateways = decode(value, GatewayChunk).gateways.values()
                stored.started.discard(int(chunk))
                if any(d.attempts for d in gateways):
                    stored.started.add(int(chunk))
        except DecodeError as exc:  # the leader's load reports it; counted as it was
            log.debug("stored %s does not decode: %s", key, exc)
            return False
        after = None if stored.spec is None else stored.status
        if after == before:
            return False
        for old in past_history(self._counted(), self._keep):
            del self._stored[old.id]
        return True

    def statuses(self) -> Counter[DistributionStatus]:
        return Counter(stored.status for stored in self._counted())

    def _counted(self) -> list[_Stored]:
        return [stored for stored in self._stored.values() if stored.spec is not None]
