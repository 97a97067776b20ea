"""Configuration distribution's durable state, as stored in JetStream key-value.

`actors/distribution_store.py` owns this layout: nothing else names a key. Each key has
one writer.

Bucket `distributions`:

- `layout`: `Layout`, the version of this layout (absent: 1, the first release's).
  Written once at start, after any migration.
- `versions.<config_type>`: `VersionCounter`, the last version given to that type.
  Writer: the distributor, after the spec that uses it (the spec is what makes a
  distribution exist). At start a type's last version is the higher of its counter and
  its stored distributions' versions, so versions only ever grow, across restarts too.
- `dist-<uuid>.spec`: `DistributionSpec`, what was asked and whom it resolved to.
  Writer: the distributor, before it answers `distribute`; rewritten only while the
  distribution waits in its queue (a reconciliation taking in more gateways) and to
  abandon it (`abandoned`: its actor died too often).
- `dist-<uuid>`: the `schemas.api.Distribution` record as it progresses. Writer: the
  distribution's own DistributionActor, before every send, retry and finish. A
  distribution that never started has no record: it is rebuilt from its spec.

Bucket `desired` (`DesiredConfig`, the content being the spec of its `distribution_id`).
Writer: the distributor, when a distribution starts, before its first push.

- `<config_type>`: what every gateway should run, set by a distribution to every active
  gateway (`target_gateways` null); also what a gateway that joins later should get.
- `<config_type>.<gateway_id>`: what one gateway should run, set by a distribution that
  named it.

A gateway's desired version of a type is the higher of the two. Desired state is the
operator's intent, whatever the distribution's outcome: a gateway that failed or
rejected it differs from it until a later distribution (or reconciliation) brings it in
line. A reconciliation (`Distribution.origin` "reconcile") pushes a gateway's desired
version again: its spec is a copy of the spec that set that version, naming the gateways
it pushes, with no new version and no change to desired state.

Layout 1 (gatefleet 0.1.0) had the same keys, but the distributor also wrote each record
at creation and on a reconciliation's change, and specs held only what was asked; its
records are read as they are.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from schemas.types import ConfigType, GatewayId
from schemas.wire import DistributionId, Version

LAYOUT_VERSION = 2


class _Stored(msgspec.Struct, frozen=True, kw_only=True):
    """Base for stored values."""


class Layout(_Stored, frozen=True):
    version: int


class DistributionSpec(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    config_data: dict[str, Any]
    # As requested: None means every active gateway (and sets the fleet's desired version).
    target_gateways: list[GatewayId] | None
    # Layout 2: whom it resolved to when it was created (known ids, then unknown ones, in
    # the record's order), so that its record can be rebuilt before its actor writes one.
    targets: list[str] | None = None
    unknown: list[str] = msgspec.field(default_factory=list)
    origin: Literal["distribute", "reconcile"] = "distribute"
    created_at: datetime | None = None
    # Given up by the distributor (its actor died again and again): it ends failed, so.
    abandoned: str | None = None
    # The distribute request's request_id (idempotent retries).
    request_id: str | None = None


class VersionCounter(_Stored, frozen=True):
    config_type: ConfigType
    last_version: Version


class DesiredConfig(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    distribution_id: DistributionId
    set_at: datetime
