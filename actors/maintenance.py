"""Which gateways an operator put in maintenance, kept across restarts.

Stored in the `settings` bucket, one key per gateway (`maintenance.<gateway_id>`, so that
no value grows with the fleet); the leader's supervisor is the only writer, and the
standbys' supervisors follow its writes through a watch of the bucket. A key that does
not read back is logged, alarmed (`ha.alarm` kind `bad_stored_value`) and skipped: no
stored value stops start-up.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from actors.context import Context
from schemas.codec import DecodeError, decode

KEY_PREFIX = "maintenance."


class MaintenanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    reason: str | None = None
    since: datetime


def load(ctx: Context) -> dict[str, str | None]:
    """gateway id -> the reason it is in maintenance (the bucket read in one pass)."""
    found: dict[str, str | None] = {}
    for key, value in ctx.buckets["settings"].entries().items():
        if not key.startswith(KEY_PREFIX):
            continue
        record = read(ctx, key, value)
        if record is not None:
            found[key.removeprefix(KEY_PREFIX)] = record.reason
    return found


def read(ctx: Context, key: str, value: bytes) -> MaintenanceRecord | None:
    """The record stored at `key`; None (logged, alarmed) when it does not read back."""
    try:
        return decode(value, MaintenanceRecord)
    except DecodeError as exc:
        ctx.unreadable(f"maintenance entry {key!r}", exc, "skipped")
        return None


def save(ctx: Context, gateway_id: str, reason: str | None) -> None:
    record = MaintenanceRecord(reason=reason, since=datetime.now(UTC))
    ctx.buckets["settings"].put(KEY_PREFIX + gateway_id, record)


def delete(ctx: Context, gateway_id: str) -> None:
    ctx.buckets["settings"].delete(KEY_PREFIX + gateway_id)
