"""DistributionStore: the one place that knows the KV layout of configuration distribution
(schemas/stored.py): key names, what is read at start, and the migration of older layouts.

Blocking calls for actor threads (never the bus loop). Each key has one writer, named in
schemas/stored.py; this class does not enforce it, the callers' roles do: the
DistributorActor writes counters, specs and desired state, a DistributionActor its record.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from msgspec.structs import replace

from actors.distribution_machine import TERMINAL_STATUSES, abandoned, new_distribution
from bus.jetstream import KvStore
from schemas.api import Distribution
from schemas.codec import DecodeError
from schemas.events import utc_now
from schemas.stored import (
    LAYOUT_VERSION,
    DesiredConfig,
    DistributionSpec,
    Layout,
    VersionCounter,
)

log = logging.getLogger(__name__)

LAYOUT_KEY = "layout"
RECORD_KEY_RE = re.compile(r"^dist-[A-Za-z0-9-]+$")
SPEC_SUFFIX = ".spec"
VERSIONS_PREFIX = "versions."


class StoreError(RuntimeError):
    """The store was written by a newer gatefleet than this one."""


@dataclass
class Loaded:
    """What the distributor starts from."""

    records: dict[str, Distribution] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    # (config type, gateway id or None for the fleet) -> desired version.
    desired: dict[tuple[str, str | None], DesiredConfig] = field(default_factory=dict)


class DistributionStore:
    def __init__(self, distributions: KvStore, desired: KvStore) -> None:
        self._kv = distributions
        self._desired = desired

    # Start -------------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Everything at start, after migrating an older layout. A distribution that never
        started is rebuilt from its spec; one its distributor abandoned ends failed."""
        self._migrate()
        loaded = Loaded()
        keys = set(self._kv.keys())
        for key in sorted(keys):
            try:
                if key.startswith(VERSIONS_PREFIX):
                    counter = self._kv.get(key, VersionCounter)
                    if counter is not None:
                        loaded.versions[counter.config_type] = counter.last_version
                elif RECORD_KEY_RE.fullmatch(key):
                    record = self._kv.get(key, Distribution)
                    if record is not None:
                        loaded.records[key] = record
            except DecodeError as exc:
                log.warning("skipping undecodable entry %r: %s", key, exc)
        for key in keys:
            dist_id = key.removesuffix(SPEC_SUFFIX)
            if key.endswith(SPEC_SUFFIX) and dist_id not in loaded.records:
                spec = self.spec(dist_id)
                if spec is not None and spec.targets is not None:
                    loaded.records[dist_id] = record_from_spec(dist_id, spec)
        for record in loaded.records.values():
            # A spec is stored before its version counter, which may have failed after it.
            last = loaded.versions.get(record.config_type, 0)
            loaded.versions[record.config_type] = max(last, record.version)
        for dist_id, record in list(loaded.records.items()):
            if record.status not in TERMINAL_STATUSES:
                spec = self.spec(dist_id)
                if spec is not None and spec.abandoned:
                    loaded.records[dist_id] = abandoned(record, spec.abandoned, utc_now())
        for key, value in self._desired.items(DesiredConfig).items():
            config_type, _, gateway_id = key.partition(".")
            loaded.desired[(config_type, gateway_id or None)] = value
        return loaded

    def _migrate(self) -> None:
        stored = self._kv.get(LAYOUT_KEY, Layout)
        version = 1 if stored is None else stored.version
        if version > LAYOUT_VERSION:
            raise StoreError(
                f"the distributions store has layout {version}, newer than this gatefleet's "
                f"{LAYOUT_VERSION}: upgrade gatefleet"
            )
        if version < LAYOUT_VERSION:
            # Layout 1 -> 2: its records and specs read as they are (a layout-1 spec lacks
            # the resolved targets, and every layout-1 distribution has a record).
            self._kv.put(LAYOUT_KEY, Layout(version=LAYOUT_VERSION))
            log.info("distributions store migrated from layout %d to %d", version, LAYOUT_VERSION)

    # The distributor's keys --------------------------------------------------------------

    def put_version(self, config_type: str, last_version: int) -> None:
        counter = VersionCounter(config_type=config_type, last_version=last_version)
        self._kv.put(VERSIONS_PREFIX + config_type, counter)

    def put_spec(self, dist_id: str, spec: DistributionSpec) -> None:
        self._kv.put(dist_id + SPEC_SUFFIX, spec)

    def spec(self, dist_id: str) -> DistributionSpec | None:
        try:
            return self._kv.get(dist_id + SPEC_SUFFIX, DistributionSpec)
        except DecodeError as exc:
            log.warning("spec of %s does not decode: %s", dist_id, exc)
            return None

    def put_desired(self, config_type: str, gateway_id: str | None, value: DesiredConfig) -> None:
        self._desired.put(
            config_type if gateway_id is None else f"{config_type}.{gateway_id}", value
        )

    # A DistributionActor's key -----------------------------------------------------------

    def put_record(self, record: Distribution) -> None:
        self._kv.put(record.id, record)


def record_from_spec(dist_id: str, spec: DistributionSpec) -> Distribution:
    """The record of a distribution that has not started (layout 2 specs only)."""
    assert spec.targets is not None
    assert spec.created_at is not None
    unknown = set(spec.unknown)
    record = new_distribution(
        dist_id,
        spec.config_type,
        spec.version,
        targets=[gw for gw in spec.targets if gw not in unknown],
        unknown=spec.unknown,
        created_at=spec.created_at,
    )
    if spec.origin != "distribute" or spec.request_id is not None:
        record = replace(record, origin=spec.origin, request_id=spec.request_id)
    return record
