"""Configuration distribution's durable state, as stored in JetStream key-value.

`actors/distribution_store.py` owns this layout: nothing else names a key. Each key has
one writer. No value grows with the fleet: a distribution's per-gateway states are kept
in chunks of at most CHUNK_GATEWAYS gateways, so that every value stays well under
NATS's 1 MiB payload limit however many gateways a distribution targets.

Bucket `distributions`:

- `layout`: `Layout`, the version of this layout (absent: 1, the first release's).
  Written once at start, after any migration.
- `versions.<config_type>`: `VersionCounter`, the last version given to that type.
  Writer: the distributor, after the spec that uses it (the spec is what makes a
  distribution exist). At start a type's last version is the higher of its counter and
  its stored distributions' versions, so versions only ever grow, across restarts too.
- `content.<config_type>.<version>`: `ConfigContent`, the `config_data` of that version.
  Writer: the distributor, before the spec of the distribution that creates the version.
  Kept for the last `orchestrator.config_history` versions of each type, for any version
  a gateway should run (desired state) and for unfinished distributions.
- `dist-<uuid>.gw.<n>`: `GatewayChunk`, the states of the distribution's targets
  n * CHUNK_GATEWAYS to (n + 1) * CHUNK_GATEWAYS - 1, in target order. Writer: the
  distributor when it creates the distribution (every target pending, unknown ids
  failed) and while it waits in its queue (a reconciliation taking in one more gateway);
  then its DistributionActor, with its progress.
- `dist-<uuid>.spec`: `DistributionSpec`, what was asked. Writer: the distributor, after
  the content and the chunks: the spec is what makes a distribution exist (chunks or
  progress without a spec are leftovers, deleted at start). Rewritten only to abandon it
  (`abandoned`: its actor died too often) and to move its version (`moved_to`: a gateway
  answered `stale_version`, holding a newer version than gatefleet's counter had given;
  the new version's content is written before it). Deleted first when the distribution is.
- `dist-<uuid>`: `DistributionProgress`, its status as it progresses. Writer: the
  distribution's own DistributionActor, with the chunks changed since its last write,
  before every send, retry, wait (a rollout's health gate, window) and status change,
  and as it ends. A distribution that never started has none: it is pending. The
  distributor writes it (and its chunks) only where no actor runs it: one aborted
  while it waited in its queue, and one rolling back (its actor has stopped) as its
  rollback ends it `rolled_back` or `failed`.

Retention (actors/retention.py) deletes finished distributions and contents no longer
needed: the distributor purges their keys (no delete marker is left), once their writers
are done with them.

Bucket `desired` (`DesiredConfig`; the content is that of its version). Writer: the
distributor, when a distribution starts, before its first push (and again when its
version moves); for a distribution with
a rollout, when it has completed (or partially failed within its `max_failures`): a
halted or aborted rollout never sets it, nor does an automatic rollback (it restores
what is desired already).

- `<config_type>`: what every gateway should run, set by a distribution to every active
  gateway (`target_gateways` null); also what a gateway that joins later should get.
- `<config_type>.<gateway_id>`: what one gateway should run, set by a distribution that
  named it.

A gateway's desired version of a type is the higher of the two. Desired state is the
operator's intent, whatever the distribution's outcome: a gateway that failed or
rejected it differs from it until a later distribution (or reconciliation) brings it in
line. A reconciliation (`Distribution.origin` "reconcile") pushes a gateway's desired
version again, with that version's content: no new version, no change to desired state.

Progressive delivery added optional fields (a spec's `rollout` and `rollback_of`, the
origin "rollback", a progress's gate and batch positions, the statuses and delivery
states of a rollout) to layout 3: values written before read as they were (no rollout).

Older layouts, migrated at start: layout 1 (gatefleet 0.1.0) kept each distribution as
one record `dist-<uuid>` (`schemas.api.Distribution`, every gateway's state in it) and a
spec `dist-<uuid>.spec` holding the content and the requested targets (`SpecV2`); layout
2 had the same keys, its specs also naming the resolved targets, and a distribution that
never started had no record.

Bucket `sticky` (`StickyAssignment`; actors/sticky.py owns it), shared by every replica:
one key per sticky client, the unpadded base64url of its `client_id` in UTF-8 (a client
id may hold any character, a key only `[-/_=.A-Za-z0-9]`), valued with the gateway it
was sent to. Writers: any replica's load balancer, when a client is new, moves to another
gateway or has none left (deleted), and at most once a tenth of `sticky_ttl_s` while it
keeps its gateway; the bucket's max_age (`sticky_ttl_s`) forgets the rest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from schemas.api import GatewayDelivery, Origin, Rollout
from schemas.types import ConfigType, DistributionStatus, GatewayId
from schemas.wire import DistributionId, Version

LAYOUT_VERSION: Final = 3
# Gateways per chunk. A state is at most about 6.2 KB of JSON (a 64-character id and an
# error of STORED_ERROR_CHARS characters, each at most 6 bytes escaped), so a chunk stays
# under 640 KB; a typical one (no error) is about 10 KB.
CHUNK_GATEWAYS: Final = 100
STORED_ERROR_CHARS: Final = 1000
# Stored times carry their time zone (a naive one could not be compared with the others).
Time = Annotated[datetime, Meta(tz=True)]


class _Stored(msgspec.Struct, frozen=True, kw_only=True):
    """Base for stored values."""


class Layout(_Stored, frozen=True):
    version: int


class VersionCounter(_Stored, frozen=True):
    config_type: ConfigType
    last_version: Version


class ConfigContent(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    config_data: dict[str, Any]


class DistributionSpec(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    # Asked for every active gateway (`target_gateways` null): it sets the fleet's
    # desired version. Else it named its targets, each of which it sets.
    fleet_wide: bool
    created_at: Time
    origin: Origin = "distribute"
    # Given up by the distributor (its actor died again and again): it ends failed, so.
    abandoned: str | None = None
    # The distribute request's request_id (idempotent retries).
    request_id: str | None = None
    # Progressive delivery: the request's rollout. With `auto_rollback` the version after
    # its own is kept for its rollback (versions of a type are applied in order).
    rollout: Rollout | None = None
    # An automatic rollback: the distribution it rolls back.
    rollback_of: DistributionId | None = None
    # The version it pushes instead of `version` since a gateway held a newer one
    # (gatefleet's counter was behind): the same content. `version` keeps its place in
    # its type's queue.
    moved_to: Version | None = None


class GatewayChunk(_Stored, frozen=True):
    # Gateway id -> its state, in target order.
    gateways: dict[str, GatewayDelivery]


class DistributionProgress(_Stored, frozen=True):
    status: DistributionStatus
    batch: int = 0
    completed_at: Time | None = None
    reason: str | None = None
    # Progressive delivery (schemas.api.Distribution has their meaning).
    batch_count: int = 0
    batch_start: int = 0
    gate_until: Time | None = None
    gated_batch: int = 0


class DesiredConfig(_Stored, frozen=True):
    config_type: ConfigType
    version: Version
    distribution_id: DistributionId
    set_at: Time


class LeaderConfig(_Stored, frozen=True):
    """The leading replica's deciding settings (`leader.config` in `settings`), dotted
    key -> JSON text, for replicas that start later to compare with theirs."""

    replica_id: str
    settings: dict[str, str]


class StickyAssignment(_Stored, frozen=True):
    gateway_id: GatewayId


class SpecV2(_Stored, frozen=True):
    """A spec of layouts 1 and 2, read only to migrate it."""

    config_type: ConfigType
    version: Version
    config_data: dict[str, Any]
    # As requested: None means every active gateway.
    target_gateways: list[GatewayId] | None
    # Layout 2: whom it resolved to (known ids, then unknown ones, in the record's order).
    targets: list[str] | None = None
    unknown: list[str] = msgspec.field(default_factory=list)
    origin: Literal["distribute", "reconcile"] = "distribute"
    created_at: Time | None = None
    abandoned: str | None = None
    request_id: str | None = None
