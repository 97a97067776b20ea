"""The state machine of one configuration distribution: pure, no threads, no I/O, no clock.

Its whole state is a `schemas.api.Distribution` record. Every input returns the commands
the DistributionActor must carry out, and `machine.record` is then the new record to
store; a record loaded after a crash is picked up again with `resume()`.

Per gateway (`GatewayDelivery.state`)::

    pending ──batch──▶ sent ──ack──▶ acked                                   final
                       ▲  │ └─nack─▶ nacked (error: the gateway's text)      final
                       │  └─timeout / no responders─▶ timed_out (transient)
                       │       ├─ attempts <= retry_count ─────▶ retrying
                       │       └─ attempts == retry_count + 1 ─▶ failed      final
                       └──────── retry due: attempt + 1 ──────── retrying
    listed id not known ──(at creation)──▶ failed, "unknown gateway"         final

| state     | meaning                                             | in flight | final |
|-----------|-----------------------------------------------------|-----------|-------|
| pending   | waiting for its batch                               | no        | no    |
| sent      | ConfigPush `attempts` sent, waiting for the answer  | yes       | no    |
| timed_out | transient within one step (never stored): an event  | yes       | no    |
| retrying  | a retry is scheduled after `retry_delay_s`          | yes       | no    |
| acked     | applied by the gateway                              | no        | yes   |
| nacked    | rejected by the gateway: final, never retried       | no        | yes   |
| failed    | unknown id, or no ack after retry_count + 1 tries   | no        | yes   |

A silent gateway thus gets exactly retry_count + 1 attempts. An answer is taken only from
a gateway in `sent` (and, when given, for its current attempt); anything else (late,
duplicate, stale, unknown gateway, finished distribution) is ignored: no commands.

Batches are sequential: batch N+1 (the next `batch_size` pending gateways in
`target_gateways` order) is sent only when no gateway is in flight. `record.batch` is the
number of the current batch (0 before the first).

Distribution status::

    pending ──start──▶ in_progress ──every target final──▶ completed | partially_failed | failed
    pending ──start, nothing to send──▶ completed ("no target gateways") | failed (all unknown)

completed: every target acked (or zero targets); failed: none acked; else partially_failed.

Resume: gateways in `sent` are sent again with the same attempt number (a crash is not the
gateway's fault and does not use up its retries; the gateway acks a push it has already
applied again, as pushes are idempotent on (distribution_id, version)); gateways in
`retrying` get their retry scheduled again (timers do not survive a crash). Acked, nacked
and failed gateways are never sent to again.

Events (`Emit`) carry a typed step (schemas/events.py, `Step`): created, batch_sent,
gateway_acked, gateway_nacked, gateway_timed_out, gateway_retried (these four with the
gateway's id), resumed and finished.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from msgspec.structs import replace

from schemas.api import Distribution, GatewayDelivery, GatewayDeliveryState
from schemas.events import (
    EVENT_MAX_IDS,
    BatchSentStep,
    CreatedStep,
    FinishedStep,
    GatewayAckedStep,
    GatewayNackedStep,
    GatewayRetriedStep,
    GatewayTimedOutStep,
    ResumedStep,
    Step,
)
from schemas.stored import STORED_ERROR_CHARS
from schemas.types import DistributionStatus

IN_FLIGHT_STATES: Final = frozenset[GatewayDeliveryState]({"sent", "timed_out", "retrying"})
TERMINAL_STATUSES: Final = frozenset[DistributionStatus](
    {"completed", "partially_failed", "failed"}
)
UNKNOWN_GATEWAY: Final = "unknown gateway"
NO_TARGETS: Final = "no target gateways"


@dataclass(frozen=True, slots=True)
class Send:
    """Request `P.gw.<gateway_id>.config` with a ConfigPush carrying this `attempt`; answer
    with on_ack / on_nack, or on_timeout after ack_timeout or on no responders."""

    gateway_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class ScheduleRetry:
    """Call `on_retry_due(gateway_id)` after `delay_s` seconds."""

    gateway_id: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class Emit:
    """Publish a `distribution.step` event of this step; the actor adds the distribution's
    id, config type and version."""

    detail: Step
    gateway_id: str | None = None

    @property
    def step(self) -> str:
        return self.detail.name


@dataclass(frozen=True, slots=True)
class Finished:
    """The distribution has ended with `status`: the actor may stop after storing it."""

    status: DistributionStatus


Command = Send | ScheduleRetry | Emit | Finished


def resolve_targets(
    requested: Iterable[str] | None, known: Mapping[str, bool]
) -> tuple[list[str], list[str]]:
    """Split the requested ids into (targets, unknown), duplicates dropped, order kept.

    `known` maps every known gateway id to whether it is active. `requested=None` means
    every active gateway (sorted). A listed id that is known but inactive is still a
    target (the operator named it); a listed id that is not known goes to `unknown`.
    """
    if requested is None:
        return sorted(gw for gw, active in known.items() if active), []
    targets: list[str] = []
    unknown: list[str] = []
    for gw in dict.fromkeys(requested):
        (targets if gw in known else unknown).append(gw)
    return targets, unknown


def new_distribution(
    distribution_id: str,
    config_type: str,
    version: int,
    *,
    targets: list[str],
    unknown: list[str],
    created_at: datetime,
) -> Distribution:
    """The initial record (status pending): unknown ids are failed from the start."""
    if version < 1:
        raise ValueError(f"version must be >= 1, not {version}")
    if set(targets) & set(unknown) or len(set(targets)) != len(targets):
        raise ValueError("targets must be distinct and disjoint from unknown")
    gateways = {gw: GatewayDelivery() for gw in targets}
    gateways.update({gw: GatewayDelivery(state="failed", error=UNKNOWN_GATEWAY) for gw in unknown})
    return Distribution(
        id=distribution_id,
        status="pending",
        config_type=config_type,
        version=version,
        target_gateways=[*targets, *unknown],
        successful_gateways=[],
        failed_gateways=list(unknown),
        gateways=gateways,
        created_at=created_at,
    )


class DistributionMachine:
    """Wraps one Distribution record; each input returns commands and updates `record`."""

    def __init__(
        self, record: Distribution, *, batch_size: int, retry_count: int, retry_delay_s: float
    ) -> None:
        if batch_size < 1 or retry_count < 0 or retry_delay_s < 0:
            raise ValueError("need batch_size >= 1, retry_count >= 0, retry_delay_s >= 0")
        self._record = record
        self._batch_size = batch_size
        self._retry_count = retry_count
        self._retry_delay_s = retry_delay_s
        # Indexes derived from the record (rebuilt on resume), so a step costs O(batch).
        states = {gw: self._delivery(gw).state for gw in record.target_gateways}
        self._in_flight = {gw for gw, s in states.items() if s in IN_FLIGHT_STATES}
        self._pending = deque(gw for gw, s in states.items() if s == "pending")
        self._changed: set[str] = set()  # gateways whose state changed since `saved()`

    @property
    def record(self) -> Distribution:
        """The current record: store it after every step, before carrying out its commands."""
        return self._record

    @property
    def finished(self) -> bool:
        return self._record.status in TERMINAL_STATUSES

    @property
    def changed(self) -> frozenset[str]:
        """The gateways whose state has changed since the last `saved()`."""
        return frozenset(self._changed)

    def saved(self) -> None:
        """The record as it is now is stored."""
        self._changed.clear()

    @property
    def in_flight(self) -> frozenset[str]:
        """Gateways sent to and not yet final (sent, retrying): never more than batch_size."""
        return frozenset(self._in_flight)

    # Inputs ------------------------------------------------------------------------------

    def start(self, now_wall: datetime) -> list[Command]:
        """pending -> in_progress and the first batch (or straight to the end if none)."""
        rec = self._record
        if rec.status != "pending":
            raise RuntimeError(f"distribution {rec.id} is {rec.status}, not pending")
        unknown = [gw for gw in rec.target_gateways if self._delivery(gw).error == UNKNOWN_GATEWAY]
        created = Emit(
            CreatedStep(
                config_type=rec.config_type,
                version=rec.version,
                target_gateways=rec.target_gateways[:EVENT_MAX_IDS],
                unknown_gateways=unknown[:EVENT_MAX_IDS],
                target_count=len(rec.target_gateways),
            )
        )
        self._commit({}, status="in_progress")
        return [created, *self._advance(now_wall)]

    def resume(self, now_wall: datetime) -> list[Command]:
        """Continue a record loaded from the store (see the module docstring)."""
        if self._record.status == "pending":
            return self.start(now_wall)
        if self.finished:
            return []
        order = [gw for gw in self._record.target_gateways if gw in self._in_flight]
        resend = [gw for gw in order if self._delivery(gw).state == "sent"]
        retry = [gw for gw in order if gw not in resend]
        self._commit({gw: replace(self._delivery(gw), state="retrying") for gw in retry})
        cmds: list[Command] = [
            Emit(ResumedStep(batch=self._record.batch, resent=resend, retry_scheduled=retry))
        ]
        cmds += [Send(gw, self._delivery(gw).attempts) for gw in resend]
        cmds += [ScheduleRetry(gw, self._retry_delay_s) for gw in retry]
        return cmds + self._advance(now_wall)

    def on_ack(
        self, gateway_id: str, *, now_wall: datetime, attempt: int | None = None
    ) -> list[Command]:
        """The gateway applied the push (ConfigAck ok=true)."""
        d = self._awaiting(gateway_id, attempt)
        if d is None:
            return []
        self._commit({gateway_id: replace(d, state="acked", error=None)})
        return [
            Emit(GatewayAckedStep(attempts=d.attempts), gateway_id),
            *self._advance(now_wall),
        ]

    def on_nack(
        self, gateway_id: str, error: str, *, now_wall: datetime, attempt: int | None = None
    ) -> list[Command]:
        """The gateway rejected the content (ConfigAck ok=false): final, never retried."""
        d = self._awaiting(gateway_id, attempt)
        if d is None:
            return []
        self._commit({gateway_id: replace(d, state="nacked", error=clip(error))})
        return [
            Emit(GatewayNackedStep(attempts=d.attempts, error=error), gateway_id),
            *self._advance(now_wall),
        ]

    def on_timeout(
        self,
        gateway_id: str,
        reason: str = "no ack",
        *,
        now_wall: datetime,
        attempt: int | None = None,
    ) -> list[Command]:
        """No answer within ack_timeout, or no responders (`reason` says which)."""
        d = self._awaiting(gateway_id, attempt)
        if d is None:
            return []
        final = d.attempts > self._retry_count
        if final:
            change = replace(
                d, state="failed", error=clip(f"no ack after {d.attempts} attempts: {reason}")
            )
        else:
            change = replace(d, state="retrying", error=clip(f"attempt {d.attempts}: {reason}"))
        self._commit({gateway_id: change})
        step = GatewayTimedOutStep(
            attempts=d.attempts, reason=reason, final=final, error=change.error
        )
        event = Emit(step, gateway_id)
        if final:
            return [event, *self._advance(now_wall)]
        return [event, ScheduleRetry(gateway_id, self._retry_delay_s)]

    def on_retry_due(self, gateway_id: str) -> list[Command]:
        """The retry delay of a `retrying` gateway is over: send the next attempt."""
        d = self._record.gateways.get(gateway_id)
        if self.finished or d is None or d.state != "retrying":
            return []
        attempt = d.attempts + 1
        self._commit({gateway_id: replace(d, state="sent", attempts=attempt)})
        return [
            Emit(GatewayRetriedStep(attempt=attempt), gateway_id),
            Send(gateway_id, attempt),
        ]

    # Internals ---------------------------------------------------------------------------

    def _delivery(self, gateway_id: str) -> GatewayDelivery:
        return self._record.gateways.get(gateway_id) or GatewayDelivery()

    def _awaiting(self, gateway_id: str, attempt: int | None) -> GatewayDelivery | None:
        """The delivery if this gateway is waiting for this answer, else None (ignore it)."""
        d = self._record.gateways.get(gateway_id)
        if self._record.status != "in_progress" or d is None or d.state != "sent":
            return None
        if attempt is not None and attempt != d.attempts:
            return None
        return d

    def _commit(self, changes: Mapping[str, GatewayDelivery], **fields: Any) -> None:
        """Replace the record (copy on write: a stored or shared record never changes)."""
        rec = self._record
        ok = [gw for gw, d in changes.items() if d.state == "acked"]
        bad = [gw for gw, d in changes.items() if d.state in ("nacked", "failed")]
        for gw, d in changes.items():
            if d.state in IN_FLIGHT_STATES:
                self._in_flight.add(gw)
            else:
                self._in_flight.discard(gw)
        if changes:
            fields["gateways"] = {**rec.gateways, **changes}
            self._changed.update(changes)
        if ok:
            fields["successful_gateways"] = [*rec.successful_gateways, *ok]
        if bad:
            fields["failed_gateways"] = [*rec.failed_gateways, *bad]
        self._record = replace(rec, **fields)

    def _advance(self, now_wall: datetime) -> list[Command]:
        """When nothing is in flight: send the next batch, or finish."""
        if self._in_flight or self.finished:
            return []
        if self._pending:
            take = min(self._batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(take)]
            sent = {gw: GatewayDelivery(state="sent", attempts=1) for gw in batch}
            self._commit(sent, batch=self._record.batch + 1)
            return [
                *(Send(gw, 1) for gw in batch),
                Emit(BatchSentStep(batch=self._record.batch, gateways=batch)),
            ]
        return self._finish(now_wall)

    def _finish(self, now_wall: datetime) -> list[Command]:
        rec = self._record
        total, acked = len(rec.target_gateways), len(rec.successful_gateways)
        status: DistributionStatus
        if total == 0:
            status, reason = "completed", NO_TARGETS
        elif acked == total:
            status, reason = "completed", None
        else:
            failed = total - acked
            status = "failed" if acked == 0 else "partially_failed"
            reason = f"{failed} of {total} gateways failed"
        self._commit({}, status=status, completed_at=now_wall, reason=reason)
        return [Emit(finished_step(self._record)), Finished(status)]


def clip(error: str) -> str:
    """A gateway's error as kept in the record: at most STORED_ERROR_CHARS characters (its
    `gateway_nacked` or `gateway_timed_out` event has all of it), so that stored chunks
    stay bounded."""
    if len(error) <= STORED_ERROR_CHARS:
        return error
    return error[: STORED_ERROR_CHARS - 1] + "…"


def abandoned(record: Distribution, reason: str, now_wall: datetime) -> Distribution:
    """The record of a distribution given up on (its actor died again and again, or its
    progress could not be stored), ended as failed as it stands."""
    return replace(
        record, status="failed", completed_at=record.completed_at or now_wall, reason=reason
    )


def finished_step(record: Distribution) -> FinishedStep:
    """The `finished` step of a record that has ended."""
    return FinishedStep(
        status=record.status,
        successful=record.successful_gateways[:EVENT_MAX_IDS],
        failed=record.failed_gateways[:EVENT_MAX_IDS],
        reason=record.reason,
        successful_count=len(record.successful_gateways),
        failed_count=len(record.failed_gateways),
    )
