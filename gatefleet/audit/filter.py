"""Which audit events to replay: times and durations as the options take them, and the
filter on type, gateway and distribution. Pure: no bus, no output."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import click

from bus.subjects import Subjects
from schemas.events import (
    BatchSentStep,
    CreatedStep,
    DistributionEvent,
    Event,
    Failback,
    Failover,
    FinishedStep,
    GatewayDown,
    GatewayLeft,
    GatewayRecovered,
    GatewayRegistered,
    GatewaySelected,
    GatewayStatusChanged,
    PoolChange,
    PoolSnapshot,
    Reconciliation,
    ResumedStep,
    SelectionBatch,
    Step,
)
from schemas.types import GATEWAY_ID_RE

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# Times ------------------------------------------------------------------------------------


def parse_when(text: str, now: datetime) -> datetime:
    """`now`, a duration back from `now` (`2h`, `1h30m`), or an ISO time (naive = UTC)."""
    text = text.strip()
    if text == "now":
        return now
    if _DURATION_RE.match(text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-28T07:00:00Z) nor a duration (2h, 15m)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class When(click.ParamType[datetime]):
    name = "TIME|DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value), datetime.now(UTC))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


WHEN = When()


# Which events -----------------------------------------------------------------------------

EVENT_TYPES: Final = tuple(str(cls.__struct_config__.tag) for cls in typing.get_args(Event))
FAMILIES: Final = tuple(dict.fromkeys(t.partition(".")[0] for t in EVENT_TYPES))
# Types that can name a gateway, or a distribution: what --gateway / --distribution read.
GATEWAY_TYPES: Final = frozenset(EVENT_TYPES) - {
    "lb.changed",
    "ha.alarm",
    "orchestrator.started",
    "orchestrator.stopped",
    "audit.gap",
}
DISTRIBUTION_TYPES: Final = frozenset({"distribution.step", "ha.reconcile"})


def _named_in_step(step: Step | None) -> set[str]:
    """The gateways a distribution step lists (targets, a batch, outcomes, ...)."""
    match step:
        case CreatedStep(target_gateways=targets, unknown_gateways=unknown):
            return {*targets, *unknown}
        case BatchSentStep(gateways=sent):
            return set(sent)
        case FinishedStep(successful=successful, failed=failed):
            return {*successful, *failed}
        case ResumedStep(resent=resent, retry_scheduled=retrying):
            return {*resent, *retrying}
    return set()


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What to replay: types (read by subject on the server), then gateway and
    distribution (checked here on each decoded event)."""

    types: frozenset[str]
    gateway: str | None = None
    distribution: str | None = None
    every_type: bool = True  # no --type given: read `P.events.>`, future types included

    @classmethod
    def build(
        cls, names: Iterable[str], *, gateway: str | None = None, distribution: str | None = None
    ) -> EventFilter:
        """ValueError names the unknown type (with the nearest known one)."""
        chosen: set[str] = set()
        for name in names:
            if name in EVENT_TYPES:
                chosen.add(name)
            elif name in FAMILIES:
                chosen.update(t for t in EVENT_TYPES if t.startswith(name + "."))
            else:
                close = difflib.get_close_matches(name, [*EVENT_TYPES, *FAMILIES], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown event type {name!r}{hint}")
        every = not chosen
        types = set(EVENT_TYPES) if every else chosen
        if gateway is not None:
            if not GATEWAY_ID_RE.fullmatch(gateway):
                raise ValueError(f"{gateway!r} is not a gateway id")
            types &= GATEWAY_TYPES
        if distribution is not None:
            types &= DISTRIBUTION_TYPES
        if not types:
            raise ValueError("no event of these types names a gateway or distribution")
        every = every and gateway is None and distribution is None
        return cls(frozenset(types), gateway, distribution, every)

    @property
    def needs_decoding(self) -> bool:
        return self.gateway is not None or self.distribution is not None

    def subjects(self, subjects: Subjects) -> list[str]:
        if self.every_type:
            return [subjects.all_events]
        return [subjects.event(t) for t in sorted(self.types)]

    def may_match(self, data: bytes) -> bool:
        """A cheap test on the stored bytes before decoding: False means it cannot match."""
        return (self.gateway is None or self.gateway.encode() in data) and (
            self.distribution is None or self.distribution.encode() in data
        )

    def matches(self, event: Event) -> bool:
        if event.type not in self.types:
            return False
        if self.gateway is not None and self.gateway not in gateways_named(event):
            return False
        return self.distribution is None or distribution_of(event) == self.distribution


def gateways_named(event: Event) -> set[str]:
    """Every gateway an event is about: its subject, a candidate, an excluded one, ..."""
    match event:
        case GatewaySelected():
            named = {c.gateway_id for c in event.candidates} | set(event.excluded)
            return named | ({event.gateway_id} if event.gateway_id else set())
        case SelectionBatch(steps=steps):
            named = set()
            for step in steps:
                if isinstance(step, PoolChange):
                    named.update(step.removed, (row.gateway_id for row in step.rows))
                elif step.gateway_id is not None:
                    named.add(step.gateway_id)
            return named
        case PoolSnapshot(rows=rows):
            return {row.gateway_id for row in rows}
        case Failover(from_gateway=a, to_gateway=b) | Failback(from_gateway=a, to_gateway=b):
            return {a} | ({b} if b else set())
        case DistributionEvent(gateway_id=gw):
            return ({gw} if gw else set()) | _named_in_step(event.detail)
        case (
            GatewayRegistered(gateway_id=gw)
            | GatewayStatusChanged(gateway_id=gw)
            | GatewayDown(gateway_id=gw)
            | GatewayRecovered(gateway_id=gw)
            | GatewayLeft(gateway_id=gw)
            | Reconciliation(gateway_id=gw)
        ):
            return {gw}
        case _:
            return set()


def distribution_of(event: Event) -> str | None:
    match event:
        case DistributionEvent(distribution_id=dist_id):
            return dist_id
        case Reconciliation(distribution_id=dist_id):
            return dist_id
        case _:
            return None
