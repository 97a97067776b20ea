"""The state machine of one configuration distribution: pure, no threads, no I/O, no clock.

Its whole state is a `schemas.api.Distribution` record. Every input returns the commands
the DistributionActor must carry out, and `machine.record` is then the new record to
store; a record loaded after a crash is picked up again with `resume()`. Times are the
caller's (`now_wall`).

Per gateway (`GatewayDelivery.state`)::

    pending ──batch──▶ sent ──ack──▶ acked ──unhealthy in its gate──▶ unhealthy   final
                       ▲  │ └─nack─▶ nacked (error: the gateway's text)           final
                       │  └─timeout / no responders─▶ timed_out (transient)
                       │       ├─ attempts <= retry_count ─────▶ retrying
                       │       └─ attempts == retry_count + 1 ─▶ failed           final
                       └──────── retry due: attempt + 1 ──────── retrying
    listed id not known ──(at creation)──▶ failed, "unknown gateway"              final
    pending / sent / retrying ──halt or abort──▶ skipped                          final

| state     | meaning                                             | in flight | final |
|-----------|-----------------------------------------------------|-----------|-------|
| pending   | waiting for its batch                               | no        | no    |
| sent      | ConfigPush `attempts` sent, waiting for the answer  | yes       | no    |
| timed_out | transient within one step (never stored): an event  | yes       | no    |
| retrying  | a retry is scheduled after `retry_delay_s`          | yes       | no    |
| acked     | applied by the gateway                              | no        | yes*  |
| nacked    | rejected by the gateway: final, never retried       | no        | yes   |
| failed    | unknown id, or no ack after retry_count + 1 tries   | no        | yes   |
| unhealthy | acked, then not healthy within its health gate      | no        | yes   |
| skipped   | not pushed, or its answer not awaited (halt, abort) | no        | yes   |

*An acked gateway of a rollout is watched until its batch's health gate is over.

A silent gateway thus gets exactly retry_count + 1 attempts. An answer is taken only from
a gateway in `sent` (and, when given, for its current attempt) while the distribution is
in progress or paused; anything else (late, duplicate, stale, unknown gateway, ended
distribution) is ignored: no commands.

Batches are sequential: batch N+1 (the next `batch_size` pending gateways in
`target_gateways` order) is sent only when no gateway is in flight. `record.batch` is the
number of the current batch (0 before the first).

Distribution status::

    pending ──start──▶ in_progress ──every target final──▶ completed | partially_failed | failed
    pending ──start, nothing to send──▶ completed ("no target gateways") | failed (all unknown)

completed: every target acked (or zero targets; skipped ones do not count); failed: none
acked; else partially_failed.

A `rollout` (progressive delivery; schemas.api.Rollout) adds::

    pending ──start, before not_before──▶ scheduled ──not_before──▶ in_progress
    scheduled | in_progress ──pause──▶ paused ──resume──▶ in_progress (scheduled if early)
    in_progress ──canary answered, gate passed, pause_after_canary──▶ paused
    in_progress | paused ──failures > max_failures──▶ halted         (final)
                                                     └ auto_rollback ▶ rolling_back
    scheduled | in_progress | paused ──abort──▶ aborted               (final)

- The canary (`canary` gateways, or a share of the targets) is batch 1, alone; then
  batches of `batch_size`.
- Health gate (`health_gate_s` > 0): once a batch has answered, its gateways that acked
  must stay healthy for that long (`gate_until`); the next batch waits for it. A watched
  gateway reported not healthy (`on_health`), already so when it acks, or within the
  gate, turns `unhealthy`: a failure.
- Failures are nacks, timeouts after every retry and failed gates (not unknown ids).
  One more than `max_failures` halts at once: pending and in-flight gateways are
  skipped, no further push. With `auto_rollback` the status is `rolling_back` and the
  distributor takes it from there (it creates the rollback, actors/rollout.py says whom
  it pushes, and ends this one `rolled_back` or `failed`).
- A pause stops new batches; pushes in flight and their retries go on.

A version move: a gateway that answers `stale_version` holds a newer version of the type
than this one (gatefleet's counter was behind: its state was reset). That is no failure:
the gateway stays in flight while the distributor moves the distribution above the
highest version held so (`AskVersion`, then `move_version`), and the distribution starts
over from its first batch as the new version, with the same content: every target not
failed, acked ones included, is pending again. If the version cannot be moved
(`version_refused`), the gateways waiting count as nacked.

Resume: gateways in `sent` are sent again with the same attempt number (a crash is not the
gateway's fault and does not use up its retries; the gateway acks a push it has already
applied again, as pushes are idempotent on (distribution_id, version)); gateways in
`retrying` get their retry scheduled again, and a running health gate or window its
timer (timers do not survive a crash). Acked, nacked and failed gateways are never sent
to again.

Events (`Emit`) carry a typed step (schemas/events.py, `Step`): created, batch_sent,
gateway_acked, gateway_nacked, gateway_timed_out, gateway_retried, gateway_unhealthy
(these five with the gateway's id), resumed, scheduled, started, paused, unpaused,
gate_started, gate_passed, halted, version_moved and finished.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from msgspec.structs import replace

from actors.rollout import batches_left, canary_count, delivery_counts, has_canary
from schemas.api import Distribution, GatewayDelivery, GatewayDeliveryState, Rollout
from schemas.events import (
    EVENT_MAX_IDS,
    BatchSentStep,
    CreatedStep,
    FinishedStep,
    GatePassedStep,
    GateStartedStep,
    GatewayAckedStep,
    GatewayNackedStep,
    GatewayRetriedStep,
    GatewayTimedOutStep,
    GatewayUnhealthyStep,
    HaltedStep,
    PausedStep,
    ResumedStep,
    ScheduledStep,
    StartedStep,
    Step,
    UnpausedStep,
    VersionMovedStep,
)
from schemas.stored import STORED_ERROR_CHARS
from schemas.types import DistributionStatus
from schemas.wire import STALE_VERSION

IN_FLIGHT_STATES: Final = frozenset[GatewayDeliveryState]({"sent", "timed_out", "retrying"})
FAILED_STATES: Final = frozenset[GatewayDeliveryState]({"nacked", "failed", "unhealthy"})
TERMINAL_STATUSES: Final = frozenset[DistributionStatus](
    {"completed", "partially_failed", "failed", "halted", "aborted", "rolled_back"}
)
# Its actor has nothing more to do: it has ended, or its rollback is the distributor's.
HANDED_OVER: Final = TERMINAL_STATUSES | {"rolling_back"}
# Answers are taken (a pause holds new batches only).
PUSHING: Final = frozenset[DistributionStatus]({"in_progress", "paused"})
UNKNOWN_GATEWAY: Final = "unknown gateway"
NO_TARGETS: Final = "no target gateways"
ABORTED: Final = "aborted on request"


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
class ScheduleGate:
    """Call `on_gate_due(batch)` after `delay_s` seconds (the end of its health gate)."""

    batch: int
    delay_s: float


@dataclass(frozen=True, slots=True)
class ScheduleWake:
    """Call `on_wake()` after `delay_s` seconds (the rollout's `not_before`)."""

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
class AskVersion:
    """A gateway holds version `above` of the type (it answered stale_version): ask the
    distributor for a version above it, and answer with `move_version` (or
    `version_refused`)."""

    above: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The actor's part is over, with `status` (HANDED_OVER): it may stop after storing it."""

    status: DistributionStatus


Command = Send | ScheduleRetry | ScheduleGate | ScheduleWake | AskVersion | Emit | Finished


class NotAllowed(ValueError):
    """A pause, resume or abort the distribution's status does not allow (`bad_request`)."""


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
    skipped: Mapping[str, str] | None = None,
    rollout: Rollout | None = None,
) -> Distribution:
    """The initial record (status pending): unknown ids are failed from the start, and
    `skipped` ones (id -> why) listed but never pushed."""
    if version < 1:
        raise ValueError(f"version must be >= 1, not {version}")
    skipped = skipped or {}
    listed = [*targets, *unknown, *skipped]
    if len(set(listed)) != len(listed):
        raise ValueError("targets, unknown and skipped must be distinct")
    gateways = {gw: GatewayDelivery() for gw in targets}
    gateways.update({gw: GatewayDelivery(state="failed", error=UNKNOWN_GATEWAY) for gw in unknown})
    gateways.update(
        {gw: GatewayDelivery(state="skipped", error=why) for gw, why in skipped.items()}
    )
    return Distribution(
        id=distribution_id,
        status="pending",
        config_type=config_type,
        version=version,
        target_gateways=listed,
        successful_gateways=[],
        failed_gateways=list(unknown),
        gateways=gateways,
        created_at=created_at,
        rollout=rollout,
    )


def is_failure(delivery: GatewayDelivery) -> bool:
    """A failure that counts towards `max_failures` (an unknown id was never pushed)."""
    return delivery.state in FAILED_STATES and delivery.attempts > 0


class DistributionMachine:
    """Wraps one Distribution record; each input returns commands and updates `record`."""

    def __init__(
        self,
        record: Distribution,
        *,
        batch_size: int,
        retry_count: int,
        retry_delay_s: float,
        unhealthy: Mapping[str, str] | None = None,
    ) -> None:
        """`unhealthy`: the targets not healthy now, with why (kept up by `on_health`)."""
        if batch_size < 1 or retry_count < 0 or retry_delay_s < 0:
            raise ValueError("need batch_size >= 1, retry_count >= 0, retry_delay_s >= 0")
        self._record = record
        self._batch_size = batch_size
        self._retry_count = retry_count
        self._retry_delay_s = retry_delay_s
        self._rollout = record.rollout
        self._gate_s = record.rollout.health_gate_s if record.rollout else 0.0
        self._unhealthy = dict(unhealthy or {})
        # Indexes derived from the record (rebuilt on resume), so a step costs O(batch).
        states = {gw: self._delivery(gw).state for gw in record.target_gateways}
        self._in_flight = {gw for gw, s in states.items() if s in IN_FLIGHT_STATES}
        self._pending = deque(gw for gw, s in states.items() if s == "pending")
        self._canary = canary_count(self._rollout, len(self._pending)) if not record.batch else 0
        self._positions: dict[str, int] = {}
        self._batch: set[str] = set()  # the current batch's gateways (a rollout's)
        self._failures = 0
        if self._rollout is not None:
            self._positions = {gw: n for n, gw in enumerate(record.target_gateways)}
            if record.batch:
                tail = record.target_gateways[record.batch_start :]
                self._batch = {gw for gw in tail if self._delivery(gw).attempts}
            self._failures = sum(map(is_failure, record.gateways.values()))
        # Gateways that answered stale_version -> the version they hold: still in flight
        # (sent), waiting for the version above it (only the highest is asked for).
        self._behind: dict[str, int] = {}
        self._asked = 0
        self._changed: set[str] = set()  # gateways whose state changed since `saved()`
        self._untold: set[str] = set()  # ... since `told()`

    @property
    def record(self) -> Distribution:
        """The current record: store it after every step, before carrying out its commands."""
        return self._record

    @property
    def finished(self) -> bool:
        """Its actor has nothing more to do (it has ended, or is rolling back)."""
        return self._record.status in HANDED_OVER

    @property
    def changed(self) -> frozenset[str]:
        """The gateways whose state has changed since the last `saved()`."""
        return frozenset(self._changed)

    def saved(self) -> None:
        """The record as it is now is stored."""
        self._changed.clear()

    def unsaved(self) -> None:
        """The record may be ahead of the store (resumed from memory, after an actor died,
        with acks not stored yet): every target sent to is stored with the next step."""
        self._changed.update(gw for gw, d in self._record.gateways.items() if d.attempts)

    def told(self) -> frozenset[str]:
        """The gateways whose state has changed since the last call (what the distributor
        is told with the record)."""
        untold, self._untold = frozenset(self._untold), set()
        return untold

    @property
    def in_flight(self) -> frozenset[str]:
        """Gateways sent to and not yet final (sent, retrying): never more than batch_size."""
        return frozenset(self._in_flight)

    # Inputs ------------------------------------------------------------------------------

    def start(self, now_wall: datetime) -> list[Command]:
        """pending -> in_progress and the first batch (or straight to the end if none);
        scheduled instead while its rollout's `not_before` is ahead."""
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
        planned = batches_left(len(self._pending), self._batch_size, self._canary)
        not_before = self._rollout.not_before if self._rollout else None
        if not_before is not None and now_wall < not_before:
            self._commit({}, status="scheduled", batch_count=planned)
            delay = (not_before - now_wall).total_seconds()
            return [created, Emit(ScheduledStep(not_before=not_before)), ScheduleWake(delay)]
        self._commit({}, status="in_progress", batch_count=planned)
        return [created, *self._advance(now_wall)]

    def resume(self, now_wall: datetime) -> list[Command]:
        """Continue a record loaded from the store (see the module docstring)."""
        rec = self._record
        if rec.status == "pending":
            return self.start(now_wall)
        if self.finished:
            return []
        order = [gw for gw in rec.target_gateways if gw in self._in_flight]
        resend = [gw for gw in order if self._delivery(gw).state == "sent"]
        retry = [gw for gw in order if gw not in resend]
        self._commit({gw: replace(self._delivery(gw), state="retrying") for gw in retry})
        cmds: list[Command] = [
            Emit(ResumedStep(batch=self._record.batch, resent=resend, retry_scheduled=retry))
        ]
        cmds += [Send(gw, self._delivery(gw).attempts) for gw in resend]
        cmds += [ScheduleRetry(gw, self._retry_delay_s) for gw in retry]
        if rec.status == "scheduled":
            return cmds + self.on_wake(now_wall)
        if rec.gate_until is not None:
            cmds.append(ScheduleGate(rec.gated_batch, _seconds(rec.gate_until, now_wall)))
        return cmds + self._advance(now_wall)

    def on_ack(
        self, gateway_id: str, *, now_wall: datetime, attempt: int | None = None
    ) -> list[Command]:
        """The gateway applied the push (ConfigAck ok=true)."""
        d = self._awaiting(gateway_id, attempt)
        if d is None:
            return []
        self._commit({gateway_id: replace(d, state="acked", error=None)})
        acked = Emit(GatewayAckedStep(attempts=d.attempts), gateway_id)
        why = self._unhealthy.get(gateway_id)
        if self._gate_s and why is not None:  # not healthy as it acks: its gate has failed
            return [acked, *self._gate_failed(gateway_id, why, now_wall)]
        return [acked, *self._advance(now_wall)]

    def on_nack(
        self, gateway_id: str, error: str, *, now_wall: datetime, attempt: int | None = None
    ) -> list[Command]:
        """The gateway rejected the content (ConfigAck ok=false): final, never retried."""
        d = self._awaiting(gateway_id, attempt)
        if d is None:
            return []
        self._commit({gateway_id: replace(d, state="nacked", error=clip(error))})
        event = Emit(GatewayNackedStep(attempts=d.attempts, error=error), gateway_id)
        return [event, *self._failed(f"{gateway_id} rejected it", now_wall)]

    def on_stale(
        self, gateway_id: str, held: int, *, now_wall: datetime, attempt: int | None = None
    ) -> list[Command]:
        """The gateway holds version `held` of the type, above this distribution's: not a
        rejection but gatefleet's counter behind. It waits (in flight) for the version to
        move above every version held so (`move_version`). One that claims to hold this
        version or an older one is taken at its word: a nack."""
        d = self._awaiting(gateway_id, attempt)
        if d is None:
            return []
        if held <= self._record.version:
            error = f"{STALE_VERSION} although it holds version {held}"
            return self.on_nack(gateway_id, error, now_wall=now_wall, attempt=attempt)
        self._behind[gateway_id] = held
        if held <= self._asked:
            return []
        self._asked = held
        return [AskVersion(held)]

    def move_version(self, version: int, now_wall: datetime) -> list[Command]:
        """The distributor moved this distribution to `version` (stored, the same content):
        it starts over from its first batch. Every target not failed (acked ones too,
        which applied the old version) is pending again and pushed the new version;
        answers to the old one are the caller's to ignore. Ignored unless it is above
        every version the gateways waiting for it hold."""
        rec = self._record
        behind = self._behind
        if self.finished or not behind or version <= max(behind.values()):
            return []
        moving = IN_FLIGHT_STATES | {"pending", "acked"}
        again = {
            gw: replace(d, state="pending", error=None)  # attempts kept: it may run the content
            for gw in rec.target_gateways
            if (d := self._delivery(gw)).state in moving
        }
        self._pending = deque(again)
        self._canary = canary_count(self._rollout, len(again))
        self._batch = set()
        step = VersionMovedStep(
            from_version=rec.version,
            to_version=version,
            held_version=max(behind.values()),
            gateways=sorted(behind)[:EVENT_MAX_IDS],
        )
        self._behind, self._asked = {}, 0
        self._commit(
            again,
            version=version,
            batch=0,
            batch_start=0,
            gated_batch=0,
            gate_until=None,
            batch_count=batches_left(len(again), self._batch_size, self._canary),
        )
        return [Emit(step), *self._advance(now_wall)]

    def version_refused(self, reason: str, now_wall: datetime) -> list[Command]:
        """The version could not be moved: the gateways waiting for it count as nacked."""
        behind, self._behind, self._asked = self._behind, {}, 0
        cmds: list[Command] = []
        for gw, held in behind.items():
            error = f"{STALE_VERSION}: holds version {held}; {reason}"
            cmds += self.on_nack(gw, error, now_wall=now_wall)
        return cmds

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
            return [event, *self._failed(f"{gateway_id} did not ack", now_wall)]
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

    def on_health(
        self, gateway_id: str, healthy: bool, reason: str, *, now_wall: datetime
    ) -> list[Command]:
        """A target's health changed (`reason`: why it is not healthy). A gateway watched by
        its batch's health gate that is not healthy any more fails the gate."""
        if healthy:
            self._unhealthy.pop(gateway_id, None)
            return []
        self._unhealthy[gateway_id] = reason
        if not self._watched(gateway_id):
            return []
        return self._gate_failed(gateway_id, reason, now_wall)

    def on_gate_due(self, batch: int, *, now_wall: datetime) -> list[Command]:
        """The health gate of `batch` should be over."""
        rec = self._record
        if self.finished or rec.gate_until is None or batch != rec.gated_batch:
            return []
        if now_wall < rec.gate_until:  # the wall clock lags the timer's: wait for it
            return [ScheduleGate(batch, _seconds(rec.gate_until, now_wall))]
        self._commit({}, gate_until=None)
        passed = Emit(GatePassedStep(batch=batch))
        if rec.status == "paused":
            return [passed]  # resume goes on from here
        return [passed, *self._after_gate(now_wall)]

    def on_wake(self, now_wall: datetime) -> list[Command]:
        """A scheduled distribution's `not_before` should have come: it starts pushing."""
        rec = self._record
        if rec.status != "scheduled" or self._rollout is None:
            return []
        not_before = self._rollout.not_before
        if not_before is not None and now_wall < not_before:
            return [ScheduleWake(_seconds(not_before, now_wall))]
        self._commit({}, status="in_progress")
        started = Emit(StartedStep(not_before=not_before or now_wall))
        return [started, *self._advance(now_wall)]

    # Requests (raise NotAllowed) ------------------------------------------------------------

    def pause(self) -> list[Command]:
        """No new batch until `resume` (pushes in flight go on)."""
        rec = self._record
        if rec.status not in ("scheduled", "in_progress"):
            raise NotAllowed(f"distribution {rec.id} is {rec.status}: it cannot be paused")
        self._commit({}, status="paused")
        return [Emit(PausedStep(batch=rec.batch, reason="requested"))]

    def resume_paused(self, now_wall: datetime) -> list[Command]:
        """A paused distribution goes on (waits for its window again if that is ahead)."""
        rec = self._record
        if rec.status != "paused":
            raise NotAllowed(f"distribution {rec.id} is {rec.status}, not paused")
        unpaused = Emit(UnpausedStep(batch=rec.batch))
        not_before = self._rollout.not_before if self._rollout else None
        if rec.batch == 0 and not_before is not None and now_wall < not_before:
            self._commit({}, status="scheduled")
            return [unpaused, ScheduleWake(_seconds(not_before, now_wall))]
        self._commit({}, status="in_progress")
        return [unpaused, *self._advance(now_wall)]

    def abort(self, now_wall: datetime) -> list[Command]:
        """Ends `aborted` at once: nothing more is pushed, nothing rolled back."""
        rec = self._record
        if rec.status not in ("scheduled", "in_progress", "paused"):
            raise NotAllowed(f"distribution {rec.id} is {rec.status}: it cannot be aborted")
        return self._stop_pushing("aborted", ABORTED, now_wall)

    # Internals ---------------------------------------------------------------------------

    def _delivery(self, gateway_id: str) -> GatewayDelivery:
        return self._record.gateways.get(gateway_id) or GatewayDelivery()

    def _awaiting(self, gateway_id: str, attempt: int | None) -> GatewayDelivery | None:
        """The delivery if this gateway is waiting for this answer, else None (ignore it)."""
        d = self._record.gateways.get(gateway_id)
        if self._record.status not in PUSHING or d is None or d.state != "sent":
            return None
        if attempt is not None and attempt != d.attempts:
            return None
        return d

    def _watched(self, gateway_id: str) -> bool:
        """Acked in the current batch, whose health gate is not over."""
        rec = self._record
        return (
            self._gate_s > 0
            and rec.status in PUSHING
            and gateway_id in self._batch
            and self._delivery(gateway_id).state == "acked"
            and (rec.gate_until is not None or rec.gated_batch < rec.batch)
        )

    def _gate_failed(self, gateway_id: str, reason: str, now_wall: datetime) -> list[Command]:
        d = self._delivery(gateway_id)
        error = clip(f"unhealthy within its health gate: {reason}")
        self._commit({gateway_id: replace(d, state="unhealthy", error=error)})
        event = Emit(GatewayUnhealthyStep(reason=reason, failures=self._failures + 1), gateway_id)
        return [event, *self._failed(f"{gateway_id} is {reason}", now_wall)]

    def _failed(self, what: str, now_wall: datetime) -> list[Command]:
        """One more failure: a rollout over its `max_failures` halts, else it goes on."""
        if self._rollout is None:
            return self._advance(now_wall)
        self._failures += 1
        if self._failures <= self._rollout.max_failures:
            return self._advance(now_wall)
        reason = (
            f"{self._failures} failed, more than max_failures {self._rollout.max_failures}"
            f" (last: {what})"
        )
        status: DistributionStatus = "rolling_back" if self._rollout.auto_rollback else "halted"
        return self._stop_pushing(status, reason, now_wall)

    def _stop_pushing(
        self, status: DistributionStatus, reason: str, now_wall: datetime
    ) -> list[Command]:
        """Halts or aborts: every gateway pending or in flight is skipped (late answers
        are ignored), any gate or window is over."""
        why = "halted" if status != "aborted" else "aborted"
        skipped = {
            gw: replace(self._delivery(gw), state="skipped", error=f"{why} before it answered")
            for gw in self._in_flight
        }
        skipped.update(
            (gw, replace(self._delivery(gw), state="skipped", error=f"{why} before its batch"))
            for gw in self._pending
        )
        self._pending.clear()
        completed_at = None if status == "rolling_back" else now_wall
        self._commit(
            skipped, status=status, gate_until=None, completed_at=completed_at, reason=reason
        )
        cmds: list[Command] = []
        if status != "aborted":
            assert self._rollout is not None
            halted = HaltedStep(
                reason=reason,
                failures=self._failures,
                max_failures=self._rollout.max_failures,
                skipped_count=len(skipped),
            )
            cmds.append(Emit(halted))
        if status in TERMINAL_STATUSES:
            cmds.append(Emit(finished_step(self._record)))
        return [*cmds, Finished(status)]

    def _commit(self, changes: Mapping[str, GatewayDelivery], **fields: Any) -> None:
        """Replace the record (copy on write: a stored or shared record never changes)."""
        rec = self._record
        ok = [gw for gw, d in changes.items() if d.state == "acked"]
        bad = [gw for gw, d in changes.items() if d.state in FAILED_STATES]
        unacked = {gw for gw, d in changes.items() if d.state != "acked" and self._is_acked(gw)}
        for gw, d in changes.items():
            if d.state in IN_FLIGHT_STATES:
                self._in_flight.add(gw)
            else:
                self._in_flight.discard(gw)
        if changes:
            fields["gateways"] = {**rec.gateways, **changes}
            self._changed.update(changes)
            self._untold.update(changes)
        if ok or unacked:
            kept = [gw for gw in rec.successful_gateways if gw not in unacked]
            fields["successful_gateways"] = [*kept, *ok]
        if bad:
            fields["failed_gateways"] = [*rec.failed_gateways, *bad]
        self._record = replace(rec, **fields)

    def _is_acked(self, gateway_id: str) -> bool:
        return self._delivery(gateway_id).state == "acked"

    def _advance(self, now_wall: datetime) -> list[Command]:
        """When nothing is in flight and it is not held (scheduled, paused, in a health
        gate): the current batch's gate, or the next batch, or the end."""
        rec = self._record
        if self._in_flight or rec.status != "in_progress" or rec.gate_until is not None:
            return []
        if self._rollout is not None and rec.batch > rec.gated_batch:
            return self._batch_answered(now_wall)
        if self._pending:
            size = self._canary if rec.batch == 0 and self._canary else self._batch_size
            take = min(size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(take)]
            sent = {gw: GatewayDelivery(state="sent", attempts=1) for gw in batch}
            fields: dict[str, Any] = {"batch": rec.batch + 1}
            if self._rollout is not None:
                self._batch = set(batch)
                fields["batch_start"] = self._positions[batch[0]]
            self._commit(sent, **fields)
            canary = rec.batch == 0 and self._canary > 0
            return [
                *(Send(gw, 1) for gw in batch),
                Emit(BatchSentStep(batch=self._record.batch, gateways=batch, canary=canary)),
            ]
        return self._finish(now_wall)

    def _batch_answered(self, now_wall: datetime) -> list[Command]:
        """A rollout's batch has answered: its health gate starts (if it has gateways
        to watch), or what comes after it."""
        rec = self._record
        watched = sorted(
            (gw for gw in self._batch if self._is_acked(gw)), key=self._positions.__getitem__
        )
        if self._gate_s > 0 and watched:
            until = now_wall + timedelta(seconds=self._gate_s)
            self._commit({}, gated_batch=rec.batch, gate_until=until)
            started = GateStartedStep(
                batch=rec.batch, gateways=watched[:EVENT_MAX_IDS], until=until, seconds=self._gate_s
            )
            return [Emit(started), ScheduleGate(rec.batch, self._gate_s)]
        self._commit({}, gated_batch=rec.batch)
        return self._after_gate(now_wall)

    def _after_gate(self, now_wall: datetime) -> list[Command]:
        """The batch is through: a pause after the canary, or on."""
        rec = self._record
        rollout = self._rollout
        after_canary = rec.batch == 1 and has_canary(rollout) and self._pending
        if rollout is not None and rollout.pause_after_canary and after_canary:
            self._commit({}, status="paused")
            return [Emit(PausedStep(batch=rec.batch, reason="after the canary"))]
        return self._advance(now_wall)

    def _finish(self, now_wall: datetime) -> list[Command]:
        rec = self._record
        counted, acked = delivery_counts(rec.gateways)
        skipped = len(rec.target_gateways) - counted
        status: DistributionStatus
        if counted == 0:
            status = "completed"
            reason = f"no gateway to push ({skipped} skipped)" if skipped else NO_TARGETS
        elif acked == counted:
            status, reason = "completed", None
        else:
            failed = counted - acked
            status = "failed" if acked == 0 else "partially_failed"
            reason = f"{failed} of {counted} gateways failed"
        self._commit({}, status=status, completed_at=now_wall, reason=reason)
        return [Emit(finished_step(self._record)), Finished(status)]


def _seconds(when: datetime, now_wall: datetime) -> float:
    return max(0.0, (when - now_wall).total_seconds())


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
        record,
        status="failed",
        completed_at=record.completed_at or now_wall,
        reason=reason,
        gate_until=None,
    )


def unstarted_aborted(record: Distribution, now_wall: datetime) -> Distribution:
    """A pending distribution aborted before it started: every target it would have
    pushed is skipped."""
    skipped = GatewayDelivery(state="skipped", error=f"{ABORTED} before it started")
    gateways = {gw: skipped if d.state == "pending" else d for gw, d in record.gateways.items()}
    return replace(
        record, status="aborted", gateways=gateways, completed_at=now_wall, reason=ABORTED
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
