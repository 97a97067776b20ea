"""DistributionStore: the one place that knows the KV layout of configuration distribution
(schemas/stored.py): key names, what is read at start, and the migration of older layouts.

Blocking calls for actor threads (never the bus loop); a call that fails after the
KvStore's retries raises KvError, having stored the values it names in any order (the
callers write the value that commits last: a spec after its content and chunks). Each key
has one writer, named in schemas/stored.py; this class does not enforce it, the callers'
roles do: the DistributorActor writes counters, contents, specs, the chunks of a
distribution not yet started, and desired state; a DistributionActor its progress and
chunks.

Only the leader writes, and each write is fenced (bus/fenced_kv.py): a compare-and-set
on the revision of its key read at the last `load` (the start of a tenure) or written
since. A write refused because another replica wrote the key since (a newer leader)
raises Fenced: the caller stops leading.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from msgspec.structs import replace

from actors.distribution_machine import (
    FAILED_STATES,
    TERMINAL_STATUSES,
    UNKNOWN_GATEWAY,
    abandoned,
)
from bus.fenced_kv import Fenced, FencedKv
from bus.jetstream import KvError, KvStore
from schemas.api import Distribution, GatewayDelivery
from schemas.codec import DecodeError, decode
from schemas.events import utc_now
from schemas.stored import (
    CHUNK_GATEWAYS,
    LAYOUT_VERSION,
    ConfigContent,
    DesiredConfig,
    DistributionProgress,
    DistributionSpec,
    GatewayChunk,
    Layout,
    SpecV2,
    VersionCounter,
)
from schemas.types import DistributionStatus

log = logging.getLogger(__name__)

LAYOUT_KEY = "layout"
VERSIONS_PREFIX = "versions."
CONTENT_PREFIX = "content."
SPEC_SUFFIX = ".spec"
CHUNK_INFIX = ".gw."
# dist-<uuid> (its progress), dist-<uuid>.spec, dist-<uuid>.gw.<n>
DIST_KEY_RE = re.compile(r"^(dist-[A-Za-z0-9-]+)(?:(\.spec)|\.gw\.(\d{1,9}))?$")


class StoreError(RuntimeError):
    """The store was written by a newer gatefleet than this one."""


@dataclass
class Loaded:
    """What the distributor starts from."""

    records: dict[str, Distribution] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    # (config type, gateway id or None for the fleet) -> desired version.
    desired: dict[tuple[str, str | None], DesiredConfig] = field(default_factory=dict)
    # (config type, version) of every content stored.
    contents: set[tuple[str, int]] = field(default_factory=set)
    # Distribution id -> the version it was created with: its place in its type's queue
    # (a version that moved is not).
    created_versions: dict[str, int] = field(default_factory=dict)
    # What could not be read, and what was done instead: one line each (for an alarm).
    unreadable: list[str] = field(default_factory=list)

    def cannot_read(self, what: str, exc: DecodeError, instead: str) -> None:
        """A stored value that does not decode: it is logged and reported, never raised
        (no stored value may stop start-up)."""
        message = f"stored {what} unreadable ({exc}); {instead}"
        log.error("%s", message)
        self.unreadable.append(message)


@dataclass
class _Keys:
    """The stored values of one distribution, undecoded."""

    spec: bytes | None = None
    progress: bytes | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)


def chunk_key(dist_id: str, n: int) -> str:
    return f"{dist_id}{CHUNK_INFIX}{n}"


def content_key(config_type: str, version: int) -> str:
    return f"{CONTENT_PREFIX}{config_type}.{version}"


class DistributionStore:
    def __init__(self, distributions: KvStore, desired: KvStore) -> None:
        # Leader state: every write a compare-and-set on the revision read at the last
        # load or written since (bus/fenced_kv.py), so a stale leader's is refused.
        self._kv = FencedKv(distributions)
        self._desired = FencedKv(desired)

    # Start -------------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Everything at start, after migrating an older layout: each distribution rebuilt
        from its spec, chunks and progress (pending if it has none); one its distributor
        abandoned ends failed. Leftovers of a distribution with no spec (its creation or
        deletion was cut short) are deleted."""
        loaded = Loaded()
        values = self._kv.read_all()
        if self._migrate(values, loaded):
            values = self._kv.read_all()
        distributions: dict[str, _Keys] = defaultdict(_Keys)
        for key, data in values.items():
            try:
                if key.startswith(VERSIONS_PREFIX):
                    counter = decode(data, VersionCounter)
                    loaded.versions[counter.config_type] = counter.last_version
                elif key.startswith(CONTENT_PREFIX):
                    content = decode(data, ConfigContent)
                    loaded.contents.add((content.config_type, content.version))
                elif match := DIST_KEY_RE.fullmatch(key):
                    dist_id, is_spec, chunk = match.groups()
                    keys = distributions[dist_id]
                    if is_spec:
                        keys.spec = data
                    elif chunk is not None:
                        keys.chunks[int(chunk)] = data
                    else:
                        keys.progress = data
            except DecodeError as exc:
                loaded.cannot_read(key, exc, "skipped")
        leftovers: list[str] = []
        for dist_id, keys in distributions.items():
            if keys.spec is None:
                leftovers += _key_names(dist_id, keys)
                continue
            try:
                record, spec = _record(dist_id, keys, loaded)
            except DecodeError as exc:
                loaded.cannot_read(f"distribution {dist_id}", exc, "it is skipped")
                continue
            loaded.records[dist_id] = record
            loaded.created_versions[dist_id] = spec.version
            # A spec is stored before its version counter, which may have failed after it.
            last = loaded.versions.get(record.config_type, 0)
            loaded.versions[record.config_type] = max(last, last_version(spec))
        self._delete_leftovers(leftovers)
        for key, data in self._desired.read_all().items():
            try:
                value = decode(data, DesiredConfig)
            except DecodeError as exc:
                loaded.cannot_read(f"desired state {key}", exc, "skipped")
                continue
            config_type, _, gateway_id = key.partition(".")
            loaded.desired[(config_type, gateway_id or None)] = value
        return loaded

    def _delete_leftovers(self, keys: list[str]) -> None:
        if not keys:
            return
        log.info("deleting %d leftover keys of distributions that do not exist", len(keys))
        try:
            self._kv.purge(keys)
        except KvError as exc:
            log.warning("leftover keys not deleted (%s): tried again at the next start", exc)

    def _migrate(self, values: dict[str, bytes], loaded: Loaded) -> bool:
        """Brings the store (all its `values`) to the current layout; True if it wrote
        any of them."""
        try:
            stored = None if LAYOUT_KEY not in values else decode(values[LAYOUT_KEY], Layout)
        except DecodeError as exc:
            # Migrating again is safe: values of the current layout are left as they are.
            loaded.cannot_read(LAYOUT_KEY, exc, "taken as layout 1 and migrated again")
            stored = None
        version = 1 if stored is None else stored.version
        if version > LAYOUT_VERSION:
            raise StoreError(
                f"the distributions store has layout {version}, newer than this gatefleet's "
                f"{LAYOUT_VERSION}: upgrade gatefleet"
            )
        if not values:
            self._kv.put(LAYOUT_KEY, Layout(version=LAYOUT_VERSION))  # a new store
            return False
        if version == LAYOUT_VERSION:
            return False
        self._migrate_to_3(values, loaded)
        self._kv.put(LAYOUT_KEY, Layout(version=LAYOUT_VERSION))
        log.info("distributions store migrated from layout %d to %d", version, LAYOUT_VERSION)
        return True

    def _migrate_to_3(self, values: dict[str, bytes], loaded: Loaded) -> None:
        """Layouts 1 and 2 -> 3: each record split into chunks and its progress, each spec
        into its content and a spec without targets. Safe to run again if cut short: a
        distribution's new spec is written last, so one whose spec is new is done."""
        distributions: dict[str, _Keys] = defaultdict(_Keys)
        for key, data in values.items():
            if match := DIST_KEY_RE.fullmatch(key):
                dist_id, is_spec, chunk = match.groups()
                if is_spec:
                    distributions[dist_id].spec = data
                elif chunk is None:
                    distributions[dist_id].progress = data
        contents: dict[str, ConfigContent] = {}
        for dist_id, keys in sorted(distributions.items()):
            try:
                self._migrate_one(dist_id, keys, contents)
            except DecodeError as exc:
                loaded.cannot_read(f"distribution {dist_id}", exc, "not migrated")

    def _migrate_one(self, dist_id: str, keys: _Keys, contents: dict[str, ConfigContent]) -> None:
        if keys.spec is not None and not _decodes(keys.spec, SpecV2):
            return  # migrated already (or not a spec at all: left to the load to report)
        old = None if keys.spec is None else decode(keys.spec, SpecV2)
        record = None  # None: its chunks and progress are migrated already
        if keys.progress is not None and _decodes(keys.progress, Distribution):
            record = _consistent(decode(keys.progress, Distribution))
        elif keys.progress is None and old is not None and old.targets is not None:
            record = _pending_record(dist_id, old)
        elif keys.progress is None or old is None:
            log.warning("distribution %s has no spec or no record to migrate: dropped", dist_id)
            return
        if old is not None:
            key = content_key(old.config_type, old.version)
            if key not in contents:
                contents[key] = ConfigContent(
                    config_type=old.config_type, version=old.version, config_data=old.config_data
                )
                self._kv.put(key, contents[key])
        if record is not None:
            self._kv.put_many(_chunks(record, range(len(record.target_gateways))))
            if keys.progress is not None:
                self._kv.put(dist_id, progress_of(record))
        self._kv.put(dist_id + SPEC_SUFFIX, _spec_v3(old, record))

    # The distributor's keys --------------------------------------------------------------

    def put_version(self, config_type: str, last_version: int) -> None:
        counter = VersionCounter(config_type=config_type, last_version=last_version)
        self._kv.put(VERSIONS_PREFIX + config_type, counter)

    def create(
        self, record: Distribution, spec: DistributionSpec, content: dict[str, Any] | None
    ) -> None:
        """Stores a new distribution: its content (None: stored already, a reconciliation
        of its version), its chunks, then its spec, the write that makes it exist."""
        if content is not None:
            self._put_content(spec.config_type, spec.version, content)
        self._kv.put_many(_chunks(record, range(len(record.target_gateways))))
        self._kv.put(record.id + SPEC_SUFFIX, spec)

    def move_version(self, dist_id: str, moved: DistributionSpec, content: dict[str, Any]) -> None:
        """A distribution's version moves to `moved.moved_to`: that version's content, then
        its spec saying so."""
        assert moved.moved_to is not None
        self._put_content(moved.config_type, moved.moved_to, content)
        self._kv.put(dist_id + SPEC_SUFFIX, moved)

    def _put_content(self, config_type: str, version: int, content: dict[str, Any]) -> None:
        value = ConfigContent(config_type=config_type, version=version, config_data=content)
        self._kv.put(content_key(config_type, version), value)

    def content(self, config_type: str, version: int) -> dict[str, Any] | None:
        try:
            found = self._kv.kv.get(content_key(config_type, version), ConfigContent)
        except DecodeError as exc:
            log.warning("content of %s version %d does not decode: %s", config_type, version, exc)
            return None
        return None if found is None else found.config_data

    def spec(self, dist_id: str) -> DistributionSpec | None:
        try:
            return self._kv.kv.get(dist_id + SPEC_SUFFIX, DistributionSpec)
        except DecodeError as exc:
            log.warning("spec of %s does not decode: %s", dist_id, exc)
            return None

    def abandon(self, dist_id: str, reason: str) -> None:
        """Marks a distribution given up in its spec: it ends failed, also after a restart."""
        spec = self.spec(dist_id)
        if spec is not None:
            self._kv.put(dist_id + SPEC_SUFFIX, replace(spec, abandoned=reason))

    def put_desired(self, config_type: str, gateway_id: str | None, value: DesiredConfig) -> None:
        self._desired.put(
            config_type if gateway_id is None else f"{config_type}.{gateway_id}", value
        )

    def delete(self, records: Iterable[Distribution]) -> None:
        """Deletes these distributions: each one's spec and chunks first (it no longer
        exists), then its progress (a leftover, if that fails, deleted at start)."""
        records = list(records)
        self._kv.purge(f"{record.id}.>" for record in records)
        self._kv.purge(record.id for record in records)

    def delete_contents(self, versions: Iterable[tuple[str, int]]) -> None:
        self._kv.purge(content_key(config_type, version) for config_type, version in versions)

    # Chunks and progress -----------------------------------------------------------------

    @property
    def tenure(self) -> int:
        """This replica's tenure as the distributions' writer: a new one at each `load`."""
        return self._kv.tenure

    def put_gateways(
        self, record: Distribution, positions: Iterable[int], *, tenure: int | None = None
    ) -> None:
        """Stores the states of the targets at these positions (in target order);
        `tenure`: only while it lasts (else Fenced)."""
        self._kv.put_many(_chunks(record, positions), tenure=tenure)

    def put_progress(
        self, record: Distribution, positions: Iterable[int], *, tenure: int | None = None
    ) -> None:
        """A DistributionActor's step: the states changed (at these positions), then the
        progress; `tenure`: only while it lasts (else Fenced)."""
        self.put_gateways(record, positions, tenure=tenure)
        self._kv.put(record.id, progress_of(record), tenure=tenure)


def states_stored(fenced: Fenced, record: Distribution) -> bool:
    """Whether `put_progress` of `record`, fenced, had stored its gateways' states: its
    progress (the key named after it, written last) was the write refused."""
    return fenced.key == record.id


def progress_of(record: Distribution) -> DistributionProgress:
    return DistributionProgress(
        status=record.status,
        batch=record.batch,
        completed_at=record.completed_at,
        reason=record.reason,
        batch_count=record.batch_count,
        batch_start=record.batch_start,
        gate_until=record.gate_until,
        gated_batch=record.gated_batch,
    )


def pushed_version(spec: DistributionSpec) -> int:
    """The version a distribution pushes: its own, or the one it moved to."""
    return spec.moved_to or spec.version


def last_version(spec: DistributionSpec) -> int:
    """The last version a spec takes: the one it pushes, and the next one for its rollback
    when it has asked for one (versions of a type are applied in order)."""
    rollout = spec.rollout
    version = pushed_version(spec)
    return version + 1 if rollout is not None and rollout.auto_rollback else version


def _chunks(record: Distribution, positions: Iterable[int]) -> dict[str, GatewayChunk]:
    """The chunks holding the targets at these positions, as the record has them."""
    chunks = {}
    targets, states = record.target_gateways, record.gateways
    for n in sorted({position // CHUNK_GATEWAYS for position in positions}):
        part = targets[n * CHUNK_GATEWAYS : (n + 1) * CHUNK_GATEWAYS]
        chunks[chunk_key(record.id, n)] = GatewayChunk(gateways={gw: states[gw] for gw in part})
    return chunks


def _record(dist_id: str, keys: _Keys, loaded: Loaded) -> tuple[Distribution, DistributionSpec]:
    """A distribution from its stored values (layout 3), and its spec. Raises DecodeError
    if its spec or a chunk does not decode; progress that does not decode is taken as
    not stored."""
    assert keys.spec is not None
    spec = decode(keys.spec, DistributionSpec)
    gateways: dict[str, GatewayDelivery] = {}
    for n in sorted(keys.chunks):
        gateways.update(decode(keys.chunks[n], GatewayChunk).gateways)
    progress = _progress(dist_id, keys.progress, gateways, loaded)
    record = Distribution(
        id=dist_id,
        status=progress.status,
        config_type=spec.config_type,
        version=pushed_version(spec),
        target_gateways=list(gateways),
        successful_gateways=[gw for gw, d in gateways.items() if d.state == "acked"],
        failed_gateways=[gw for gw, d in gateways.items() if d.state in FAILED_STATES],
        gateways=gateways,
        created_at=spec.created_at,
        completed_at=progress.completed_at,
        reason=progress.reason,
        batch=progress.batch,
        origin=spec.origin,
        request_id=spec.request_id,
        rollout=spec.rollout,
        batch_count=progress.batch_count,
        batch_start=progress.batch_start,
        gate_until=progress.gate_until,
        gated_batch=progress.gated_batch,
        rollback_of=spec.rollback_of,
    )
    if spec.abandoned and given_up(spec, record.status):
        return abandoned(record, spec.abandoned, utc_now()), spec
    return record, spec


def given_up(spec: DistributionSpec, status: DistributionStatus) -> bool:
    """Whether its distributor abandoned it unfinished (it ends failed, so)."""
    return bool(spec.abandoned) and status not in TERMINAL_STATUSES


def unstored_status(started: bool) -> DistributionStatus:
    """The status of a distribution with no progress stored (or none readable): its
    first step stored some chunks and then failed if a gateway was sent to (`started`):
    it has started all the same (its actor resumes it, sending again to the gateways
    marked sent); else it is pending."""
    return "in_progress" if started else "pending"


def _progress(
    dist_id: str, data: bytes | None, gateways: dict[str, GatewayDelivery], loaded: Loaded
) -> DistributionProgress:
    """Its stored progress; if none (or unreadable), what its gateways' states say."""
    if data is not None:
        try:
            return decode(data, DistributionProgress)
        except DecodeError as exc:
            loaded.cannot_read(f"progress of {dist_id}", exc, "taken from its gateways' states")
    return DistributionProgress(status=unstored_status(any(d.attempts for d in gateways.values())))


def _key_names(dist_id: str, keys: _Keys) -> list[str]:
    names = [chunk_key(dist_id, n) for n in keys.chunks]
    return names if keys.progress is None else [dist_id, *names]


def _decodes(data: bytes, kind: type[Any]) -> bool:
    try:
        decode(data, kind)
    except DecodeError:
        return False
    return True


def _consistent(record: Distribution) -> Distribution:
    """An old record with a state for each target, whatever its `gateways` held."""
    states = record.gateways
    gateways = {gw: states.get(gw, GatewayDelivery()) for gw in record.target_gateways}
    return replace(record, gateways=gateways)


def _pending_record(dist_id: str, spec: SpecV2) -> Distribution:
    """A layout-2 distribution that never started, from its spec's resolved targets."""
    assert spec.targets is not None
    unknown = set(spec.unknown)
    gateways = {
        gw: GatewayDelivery(state="failed", error=UNKNOWN_GATEWAY)
        if gw in unknown
        else GatewayDelivery()
        for gw in spec.targets
    }
    return Distribution(
        id=dist_id,
        status="pending",
        config_type=spec.config_type,
        version=spec.version,
        target_gateways=list(spec.targets),
        successful_gateways=[],
        failed_gateways=[gw for gw in spec.targets if gw in unknown],
        gateways=gateways,
        created_at=spec.created_at or utc_now(),
        origin=spec.origin,
        request_id=spec.request_id,
    )


def _spec_v3(old: SpecV2 | None, record: Distribution | None) -> DistributionSpec:
    """The layout-3 spec of a distribution of layout 1 or 2 (its record stands in for a
    lost spec)."""
    if old is not None:
        created_at = old.created_at or (record.created_at if record else utc_now())
        return DistributionSpec(
            config_type=old.config_type,
            version=old.version,
            fleet_wide=old.target_gateways is None,
            origin=old.origin,
            created_at=created_at,
            abandoned=old.abandoned,
            request_id=old.request_id,
        )
    assert record is not None
    return DistributionSpec(
        config_type=record.config_type,
        version=record.version,
        fleet_wide=False,
        origin=record.origin,
        created_at=record.created_at,
        request_id=record.request_id,
    )
