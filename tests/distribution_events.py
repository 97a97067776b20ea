"""Waiting for and picking distribution events in tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.events import DistributionEvent

if TYPE_CHECKING:
    from tests.conftest import EventLog


def finished(event_log: EventLog, dist_id: str | None, timeout: float = 5.0) -> DistributionEvent:
    """The `finished` step of a distribution, waiting up to `timeout` for it."""
    event = event_log.wait_for(
        lambda e: (
            isinstance(e, DistributionEvent)
            and e.distribution_id == dist_id
            and e.step == "finished"
        ),
        timeout,
    )
    assert isinstance(event, DistributionEvent)
    return event


def steps(event_log: EventLog, dist_id: str, step: str) -> list[DistributionEvent]:
    """The steps of one kind a distribution has taken so far."""
    return [
        e
        for e in event_log.of_type(DistributionEvent)
        if e.distribution_id == dist_id and e.step == step
    ]
