"""Retention of configuration distribution's stored state: pure rules, no I/O.

`orchestrator.distribution_history`: the finished distributions kept (the newest, by
creation); older ones are deleted with their per-gateway states. Unfinished ones are
always kept. `orchestrator.config_history`: the content of the newest that many versions
of each config type is kept whatever became of their distributions (an operator rolls
back to one); an older version's content is deleted once nothing needs it: no gateway
should run it (desired state) and no unfinished distribution pushes it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol, TypeVar

from actors.distribution_machine import TERMINAL_STATUSES
from schemas.types import DistributionStatus

Version = tuple[str, int]  # (config type, version)


class Kept(Protocol):
    """What retention reads of a distribution (a record, or a standby's view of one)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> DistributionStatus: ...
    @property
    def created_at(self) -> datetime: ...


K = TypeVar("K", bound=Kept)


def past_history(records: Iterable[K], keep: int) -> list[K]:
    """The finished records beyond the newest `keep` (by created_at, then id)."""
    finished = sorted(
        (r for r in records if r.status in TERMINAL_STATUSES), key=lambda r: (r.created_at, r.id)
    )
    return finished[: max(0, len(finished) - keep)]


def unneeded_contents(stored: Iterable[Version], keep: int, needed: set[Version]) -> list[Version]:
    """The stored contents beyond the newest `keep` versions of their type that nothing
    in `needed` names."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for config_type, version in stored:
        by_type[config_type].append(version)
    unneeded = []
    for config_type, versions in sorted(by_type.items()):
        older = sorted(versions)[: max(0, len(versions) - keep)]
        unneeded += [(config_type, v) for v in older if (config_type, v) not in needed]
    return unneeded
