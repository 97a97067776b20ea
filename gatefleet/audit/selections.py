"""Reading selections back for `audit replay`, `audit whatif` and `audit explain`: which
part of the stream to read, and the re-run (gatefleet/audit/rerun.py) it is fed to.

A re-run needs the pool as it was, so it reads from the `lb.snapshot` the first
selection of the window builds on (each `lb.selections` batch names it: `snapshot_ts`),
not just from the window's start: one look at the first batch stored since `since`
finds it. Only the subjects a re-run reads are fetched: lb.selections, lb.snapshot and
audit.gap.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from bus.replay import StoredEvent
from bus.runtime import Bus
from bus.subjects import Subjects
from gatefleet.audit.read import Decoder, read
from gatefleet.audit.rerun import Rerun
from schemas.settings import Settings

SUBJECTS = ("lb.selections", "lb.snapshot", "audit.gap")


class BatchHead(msgspec.Struct, frozen=True):
    """What locating a batch needs of an `lb.selections` event (the rest is skipped)."""

    run: str
    snapshot_ts: datetime
    first: int
    last: int


def parse_selection_id(selection_id: str) -> tuple[str, int] | None:
    """(run, n) of a `sel-<run>-<n>` id; None for another kind of id."""
    run, _, n = selection_id.removeprefix("sel-").rpartition("-")
    if not selection_id.startswith("sel-") or not run or not n.isdigit():
        return None
    return run, int(n)


def _decode_head(data: bytes) -> BatchHead | None:
    try:
        return msgspec.json.decode(data, type=BatchHead)
    except msgspec.DecodeError:
        return None


def find_batch(
    bus: Bus, settings: Settings, since: datetime | None, selection: tuple[str, int] | None = None
) -> tuple[BatchHead, int] | None:
    """The first `lb.selections` batch stored since `since`, with its storage time; with
    `selection` (run, n), the batch holding selection `n` of `run`."""
    needle = b"" if selection is None else f'"run":"{selection[0]}"'.encode()
    found: list[tuple[BatchHead, int]] = []

    def holds(head: BatchHead) -> bool:
        return selection is None or head.first <= selection[1] <= head.last

    def sink(batch: list[StoredEvent]) -> bool:
        for _, stored_ns, data in batch:
            if needle in data:  # a cheap look before decoding
                head = _decode_head(data)
                if head is not None and holds(head):
                    found.append((head, stored_ns))
                    return True
        return False

    subject = Subjects(settings.bus.subject_prefix).event("lb.selections")
    read(bus, settings, [subject], sink, since=since)
    return found[0] if found else None


def feed(
    bus: Bus,
    settings: Settings,
    rerun: Rerun,
    *,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """Feeds `rerun` everything it needs to re-run the selections stored from `since`
    to `until`, from the snapshot they build on."""
    start = since
    if since is not None:
        first = find_batch(bus, settings, since)
        if first is None:
            return  # no selection stored since then
        start = min(since, first[0].snapshot_ts)
    decoder = Decoder()

    def sink(batch: list[StoredEvent]) -> None:
        for _, stored_ns, data in batch:
            event = decoder(data)
            if event is not None:
                rerun.feed(event, stored_ns)

    subjects = Subjects(settings.bus.subject_prefix)
    read(bus, settings, [subjects.event(t) for t in SUBJECTS], sink, since=start, until=until)
    decoder.report()
