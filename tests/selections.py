"""Finding a selection's record (issue 15) in the events a test has seen."""

from __future__ import annotations

from schemas.events import Event, SelectionBatch, SelectionRecord
from tests.conftest import EventLog


def holds(event: Event, selection_id: str) -> SelectionRecord | None:
    """The record of `selection_id` (`sel-<run>-<n>`) if `event` is the batch holding it."""
    if not isinstance(event, SelectionBatch):
        return None
    run, _, n = selection_id.removeprefix("sel-").rpartition("-")
    if event.run != run or not event.first <= int(n) <= event.last:
        return None
    return next(
        step for step in event.steps if isinstance(step, SelectionRecord) and step.n == int(n)
    )


def recorded(
    event_log: EventLog, selection_id: str, timeout: float = 5.0
) -> tuple[SelectionBatch, SelectionRecord]:
    """Waits for the `lb.selections` batch that records `selection_id`."""
    batch = event_log.wait_for(lambda e: holds(e, selection_id) is not None, timeout)
    record = holds(batch, selection_id)
    assert isinstance(batch, SelectionBatch)
    assert record is not None
    return batch, record
