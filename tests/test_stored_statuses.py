"""A standby's view of the stored distributions' statuses (actors/stored_statuses.py):
the keys a watch tells, read as a load reads them. No I/O."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from actors.stored_statuses import StoredStatuses
from schemas.api import GatewayDelivery
from schemas.codec import encode
from schemas.stored import DistributionProgress, DistributionSpec, GatewayChunk
from schemas.types import DistributionStatus

T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


def spec(minutes: int = 0, abandoned: str | None = None) -> bytes:
    created_at = T0 + timedelta(minutes=minutes)
    return encode(
        DistributionSpec(
            config_type="Route",
            version=1,
            fleet_wide=True,
            created_at=created_at,
            abandoned=abandoned,
        )
    )


def chunk(attempts: int) -> bytes:
    return encode(GatewayChunk(gateways={"gw-1": GatewayDelivery(attempts=attempts)}))


def test_a_status_is_read_as_a_load_reads_it() -> None:
    stored = StoredStatuses(keep=10)
    assert not stored.apply("dist-a.gw.0", chunk(1))  # no spec yet: not counted
    assert stored.statuses() == Counter()
    assert stored.apply("dist-a.spec", spec())
    assert stored.statuses() == Counter({"in_progress": 1})  # a gateway was sent to
    assert stored.apply("dist-a", encode(DistributionProgress(status="paused")))
    assert not stored.apply("dist-a.gw.0", chunk(0))  # progress stored: it decides
    assert stored.apply("dist-b.spec", spec())
    assert stored.apply("dist-c.spec", spec(abandoned="its actor died 4 times"))
    assert stored.statuses() == Counter({"paused": 1, "pending": 1, "failed": 1})
    assert not stored.apply("dist-b", b"not json")  # unreadable: counted as it was
    assert not stored.apply("versions.Route", b"{}")
    assert not stored.apply("dist-b.spec", None)
    assert stored.statuses() == Counter({"paused": 1, "pending": 1, "failed": 1})


def test_the_finished_past_the_history_are_dropped_as_the_leader_deletes_them() -> None:
    stored = StoredStatuses(keep=1)
    statuses: tuple[DistributionStatus, ...] = ("completed", "aborted", "in_progress")
    for n, status in enumerate(statuses):
        stored.apply(f"dist-{n}.spec", spec(minutes=n))
        stored.apply(f"dist-{n}", encode(DistributionProgress(status=status)))
    assert stored.statuses() == Counter({"aborted": 1, "in_progress": 1})
