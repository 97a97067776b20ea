"""Configuration distribution's durable state, as stored in JetStream key-value.

Bucket `distributions`:

- `dist-<uuid>`: the `schemas.api.Distribution` record, written at creation by the
  distributor, then after every step by its DistributionActor.
- `dist-<uuid>.spec`: `DistributionSpec`, what was asked (content and requested targets),
  written once, before the record.
- `versions.<config_type>`: `VersionCounter`, the last version given to that type, written
  before the record that uses it, so versions only ever grow, across restarts too.

Bucket `desired` (`DesiredConfig`, the content being the spec of its `distribution_id`):

- `<config_type>`: what every gateway should run, set by a distribution to every active
  gateway (`target_gateways` null); also what a gateway that joins later should get.
- `<config_type>.<gateway_id>`: what one gateway should run, set by a distribution that
  named it.

A gateway's desired version of a type is the higher of the two. The distributor writes them
when a distribution starts, before its first push, whatever its outcome: desired state is
the operator's intent, and a gateway that failed or rejected it differs from it until a
later distribution (or reconciliation) brings it in line.

A reconciliation (`Distribution.origin` "reconcile") pushes a gateway's desired version
again: its spec is a copy of the spec that set that version, naming the gateway it was
created for (gateways added while it waited in its queue are in its record), with no new
version and no change to desired state.

`P.api.reconcile` (an operator's request to push a gateway's desired versions now) has
its request and reply bodies here, beside the state they act on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from schemas.types import ConfigType, GatewayId
from schemas.wire import DistributionId, Version


class _Stored(msgspec.Struct, frozen=True, kw_only=True):
    """Base for stored values."""


class DistributionSpec(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    config_data: dict[str, Any]
    # As requested: None means every active gateway (and sets the fleet's desired version).
    target_gateways: list[GatewayId] | None


class VersionCounter(_Stored, frozen=True):
    config_type: ConfigType
    last_version: Version


class DesiredConfig(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    distribution_id: DistributionId
    set_at: datetime
