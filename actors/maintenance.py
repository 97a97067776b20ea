"""Which gateways an operator put in maintenance, kept across restarts.

Stored in the `settings` bucket, one key per gateway (`maintenance.<gateway_id>`, so that
no value grows with the fleet); the leader's supervisor is the only writer, and the
standbys' supervisors follow its writes through a watch of the bucket. Each write is
fenced (bus/fenced_kv.py, issue 16): a compare-and-set on the revision read at its first
write as this tenure's leader, or written since, so that a leader that lost its lease
without noticing yet cannot undo what a newer one stored. A key that does not read back
is logged, alarmed (`ha.alarm` kind `bad_stored_value`) and skipped: no stored value
stops start-up.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from actors.context import Context
from bus.fenced_kv import FencedKv
from schemas.codec import DecodeError, decode

KEY_PREFIX = "maintenance."


class MaintenanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    reason: str | None = None
    since: datetime


def read_maintenance(ctx: Context, key: str, value: bytes) -> MaintenanceRecord | None:
    """The record stored at `key`; None (logged, alarmed) when it does not read back."""
    try:
        return decode(value, MaintenanceRecord)
    except DecodeError as exc:
        ctx.unreadable(f"maintenance entry {key!r}", exc, "skipped")
        return None


class MaintenanceStore:
    """Blocking calls, for the supervisor's thread. `save` and `delete` raise Fenced when
    another replica has written the key since, KvError when the store fails."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._kv = FencedKv(ctx.buckets["settings"])
        self._epoch: int | None = None  # the tenure whose revisions `_kv` knows

    @property
    def epoch(self) -> int | None:
        """The tenure of the last write (the one whose revisions the store knows)."""
        return self._epoch

    def load(self) -> dict[str, str | None]:
        """gateway id -> the reason it is in maintenance (the bucket read in one pass)."""
        found: dict[str, str | None] = {}
        for key, value in self._kv.kv.entries().items():
            if not key.startswith(KEY_PREFIX):
                continue
            record = read_maintenance(self._ctx, key, value)
            if record is not None:
                found[key.removeprefix(KEY_PREFIX)] = record.reason
        return found

    def save(self, gateway_id: str, reason: str | None) -> None:
        record = MaintenanceRecord(reason=reason, since=datetime.now(UTC))
        self._tenure_kv().put(KEY_PREFIX + gateway_id, record)

    def delete(self, gateway_id: str) -> None:
        self._tenure_kv().put(KEY_PREFIX + gateway_id, None)

    def _tenure_kv(self) -> FencedKv:
        """The bucket, its revisions read again at the first write of each tenure."""
        epoch = self._ctx.lease.view.epoch
        if epoch != self._epoch:
            self._kv.read_all()
            self._epoch = epoch
        return self._kv
