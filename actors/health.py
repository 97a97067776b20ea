"""Health scoring and the per-gateway health state machine: pure logic, no I/O.

Nothing here reads a clock, sleeps or touches NATS. The GatewayActor passes a monotonic
``now`` (seconds) and, for display only, a wall-clock ``datetime``; it publishes whatever
the returned outcome says.

Score (0-100)
-------------
Each metric becomes a sub-score in [0, 1], 1 being best::

    cpu         = 1 - cpu_percent / 100
    memory      = 1 - memory_percent / 100
    connections = 1 - min(1, active / max_connections)     # unknown max: connection_reference
    latency     = 1 - min(1, latency_ms / latency_budget_ms)
                  # latency_ms: our smoothed probe, else the gateway's own, else 0 (perfect)

    score = 100 * sum(weight * sub) / sum(weights)          # 100 when all four weights are 0
            - failure_penalty * consecutive_failures        # missed heartbeats + failed probes

clamped to [0, 100]. A down gateway, and one never heard from, scores 0. With the default
weights a gateway at 95% CPU and 95% memory, otherwise idle, scores 47.75; an idle one 100.

Status
------
    unknown -> healthy | degraded   first accepted heartbeat (healthy iff score >= threshold)
    healthy -> degraded             score < threshold, whatever lowered it (heartbeat, failed
                                    probe, missed heartbeat, slow probes, new threshold)
    degraded | down -> healthy      after `rise` consecutive good heartbeats (score >=
                                    threshold); a missed interval breaks the run. A down
                                    gateway stays down during that probation.
    down -> degraded                a heartbeat whose score is below threshold
    healthy | degraded -> down      `fall` missed heartbeat intervals (only ticks mark down;
                                    failed probes only lower the score)

Invariant: ``status == "healthy"`` implies ``score >= threshold``, since every change of
either is re-evaluated. Missed intervals are counted with half an interval of jitter
tolerance, ``floor((now - last_seen - interval/2) / interval)``, so down is detected at the
first tick at or after ``last_seen + (fall + 1/2) * interval`` and never before.

Replays and restarts
--------------------
``seq`` increases within one gateway process. A heartbeat with ``seq <= last_seq`` is
ignored (reason ``"replay"``, no state change) unless it reads as a restart of the process:

* the gateway had been silent for at least one interval (``now - last_seen >= interval``), or
* it is the second heartbeat in a row of a new strictly increasing run that began below
  ``last_seq`` (the first one of that run was ignored).

So one replayed old message changes nothing, while a restarted gateway whose seq starts over
is accepted by its second heartbeat at the latest (reason ``"restart"``).

Batches (coalesced heartbeats)
------------------------------
Under load the GatewayActor is woken once for all the heartbeats that arrived since it last
ran, and hands them to ``on_heartbeats`` in arrival order, each with its arrival time:

* the seq/replay/restart rule above runs on every heartbeat of the batch, in order, so
  a batch never accepts what one-by-one delivery would have ignored, nor the reverse;
* every accepted heartbeat is counted (``heartbeats``);
* the metrics, region, role, labels and config versions are the newest accepted one's,
  and the status is evaluated once, at the end of the batch: all the accepted heartbeats
  of a batch share the newest metrics. They all count towards ``rise`` when the newest one
  scores good (a missed interval between two of them still breaks the run), and they
  all break the run when it scores bad. At most one transition comes out of a batch;
  states that one-by-one processing would only have passed through are not reported.

A batch of one is exactly the one-by-one case; at steady rates a
gateway's batches are of one, and they grow only while its actor is behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from actors.flapping import FlapDetector
from schemas.api import GatewaySnapshot
from schemas.settings import HealthSettings
from schemas.types import GatewayStatus, Role
from schemas.wire import Heartbeat

# Added to the times next_check_at returns, so that a timer firing a little early, or float
# rounding, cannot land the check just before the boundary it is meant for.
CHECK_SLACK_S = 0.001
_EPS = 1e-9

HeartbeatReason = Literal["replay", "restart", "wrong_gateway"]


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))


def health_score(
    settings: HealthSettings,
    *,
    cpu_percent: float,
    memory_percent: float,
    active_connections: int,
    max_connections: int | None = None,
    probe_latency_ms: float | None = None,
    reported_latency_ms: float | None = None,
    consecutive_failures: int = 0,
) -> float:
    """The 0-100 score of a gateway that is not down (formula in the module docstring)."""
    w = settings.weights
    latency = probe_latency_ms if probe_latency_ms is not None else reported_latency_ms
    capacity = max_connections if max_connections is not None else settings.connection_reference
    total = w.cpu + w.memory + w.connections + w.latency
    if total > 0:  # written out: this runs for every heartbeat of every gateway
        mean = (
            w.cpu * _unit(1.0 - cpu_percent / 100.0)
            + w.memory * _unit(1.0 - memory_percent / 100.0)
            + w.connections * _unit(1.0 - active_connections / max(1, capacity))
            + w.latency * _unit(1.0 - (latency or 0.0) / settings.latency_budget_ms)
        ) / total
    else:
        mean = 1.0
    return min(100.0, max(0.0, 100.0 * mean - w.failure_penalty * consecutive_failures))


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change; ``score`` is the score after it."""

    gateway_id: str
    old_status: GatewayStatus
    new_status: GatewayStatus
    score: float
    reason: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """A heartbeat of a batch that was ignored."""

    reason: HeartbeatReason
    seq: int


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    accepted: int  # heartbeats of the batch accepted (each one is counted)
    restarts: int  # of those, how many were accepted as a restart of the gateway
    rejected: tuple[Rejection, ...] = ()
    transition: Transition | None = None
    back_in_service: bool = False  # out of maintenance with this batch


class HealthTracker:
    """One gateway's health: held by its GatewayActor, fed heartbeats, probes and ticks."""

    def __init__(
        self,
        gateway_id: str,
        *,
        region: str,
        role: Role = "primary",
        backup_for: str | None = None,
        settings: HealthSettings,
        threshold: float,
    ) -> None:
        self.gateway_id = gateway_id
        self.region = region
        self.role: Role = role
        self.backup_for = backup_for
        self.settings = settings
        self.threshold = threshold
        self.status: GatewayStatus = "unknown"
        self.last_heartbeat: Heartbeat | None = None
        self.last_seq: int | None = None
        self.last_seen: float | None = None
        self.last_seen_wall: datetime | None = None
        self.missed_heartbeats = 0
        self.failed_probes = 0
        self.probe_latency_ms: float | None = None
        self.good_heartbeats = 0
        self.heartbeats = 0  # accepted since the actor started
        self.labels: dict[str, str] = {}
        self.config_versions: dict[str, int] = {}
        # Fed by the GatewayActor, which has the clock (status changes come from here).
        self.flaps = FlapDetector(settings)
        # Maintenance: set by an operator; once turned off, it lasts until `rise` good
        # heartbeats (`_returning`).
        self.maintenance = False
        self.maintenance_reason: str | None = None
        self._returning = False
        # seq of the previous heartbeat if it was ignored as a replay, else None.
        self._ignored_seq: int | None = None
        # (heartbeat, probe latency, failures, score) of the last score computed.
        self._scored: tuple[Heartbeat, float | None, int, float] | None = None

    @property
    def interval(self) -> float:
        return self.settings.heartbeat_interval_ms / 1000.0

    @property
    def consecutive_failures(self) -> int:
        return self.missed_heartbeats + self.failed_probes

    @property
    def score(self) -> float:
        return 0.0 if self.status == "down" else self._raw_score()

    def _raw_score(self) -> float:
        hb = self.last_heartbeat
        if hb is None:
            return 0.0
        # Asked several times per heartbeat (evaluation, transition, snapshot): computed
        # once per change of what it depends on.
        inputs = (hb, self.probe_latency_ms, self.consecutive_failures)
        cached = self._scored
        if cached is not None and cached[0] is hb and cached[1:3] == inputs[1:]:
            return cached[3]
        score = health_score(
            self.settings,
            cpu_percent=hb.cpu_percent,
            memory_percent=hb.memory_percent,
            active_connections=hb.active_connections,
            max_connections=hb.max_connections,
            probe_latency_ms=self.probe_latency_ms,
            reported_latency_ms=hb.latency_ms,
            consecutive_failures=self.consecutive_failures,
        )
        self._scored = (*inputs, score)
        return score

    def _move(self, new: GatewayStatus, reason: str) -> Transition | None:
        old = self.status
        if new == old:
            return None
        self.status = new
        if new != "healthy":
            self.good_heartbeats = 0  # rise counts heartbeats after the demotion
        return Transition(self.gateway_id, old, new, self.score, reason)

    def _check_score(self, cause: str) -> Transition | None:
        """healthy -> degraded when the score fell below the threshold."""
        score = self._raw_score()
        if self.status != "healthy" or score >= self.threshold:
            return None
        return self._move("degraded", f"score {score:.1f} below {self.threshold:g} ({cause})")

    def _missed_at(self, now: float, since: float | None = None) -> int:
        """Missed intervals by `now`, counted from `since` (default: the last heartbeat;
        local health awareness passes a later detection floor)."""
        if self.last_seen is None:
            return 0
        i = self.interval
        return max(0, math.floor((now - self._counted_from(since) - i / 2) / i + _EPS))

    def _counted_from(self, since: float | None) -> float:
        assert self.last_seen is not None
        return self.last_seen if since is None else max(self.last_seen, since)

    def set_maintenance(self, enabled: bool, reason: str | None = None) -> bool:
        """True when it goes into maintenance now; turned off, it comes back later, through
        the rise rule (`on_heartbeats` says when: BatchOutcome.back_in_service)."""
        if enabled:
            started = not self.maintenance
            self.maintenance, self.maintenance_reason, self._returning = True, reason, False
            return started
        if self.maintenance:
            self._returning, self.good_heartbeats = True, 0
        return False

    def _back_in_service(self) -> bool:
        if not (self._returning and self.status == "healthy"):
            return False
        if self.good_heartbeats < self.settings.rise:
            return False
        self.maintenance, self.maintenance_reason, self._returning = False, None, False
        return True

    def set_threshold(self, threshold: float) -> Transition | None:
        self.threshold = threshold
        return self._check_score("threshold changed")

    def on_heartbeats(
        self, batch: Sequence[tuple[Heartbeat, float]], now: float, wall: datetime
    ) -> BatchOutcome:
        """Heartbeats in arrival order, each with its arrival time (monotonic); ``now`` and
        ``wall`` are one instant on both clocks, to date ``last_seen`` on the wall clock.
        How a batch counts is in the module docstring ("Batches")."""
        newest: Heartbeat | None = None
        accepted = restarts = run = 0
        broken = False  # a missed interval before one of the batch's heartbeats
        rejected: list[Rejection] = []
        interval = self.interval
        for hb, at in batch:
            if hb.gateway_id != self.gateway_id:
                rejected.append(Rejection("wrong_gateway", hb.seq))
                continue
            last_seq, last_seen = self.last_seq, self.last_seen
            if last_seq is not None and last_seen is not None and hb.seq <= last_seq:
                silent = at - last_seen >= interval
                second_of_run = self._ignored_seq is not None and hb.seq > self._ignored_seq
                if not (silent or second_of_run):
                    self._ignored_seq = hb.seq
                    rejected.append(Rejection("replay", hb.seq))
                    continue
                restarts += 1
            self._ignored_seq = None
            if self._missed_at(at):  # a gap breaks the rise run, whether or not a tick saw it
                broken, run = True, 0
            self.last_seq, self.last_seen = hb.seq, at
            newest = hb
            accepted += 1
            run += 1
        if newest is None:
            return BatchOutcome(accepted=0, restarts=0, rejected=tuple(rejected))
        self._take_metrics(newest, accepted, now, wall)
        transition = self._evaluate(run, broken)
        return BatchOutcome(
            accepted=accepted,
            restarts=restarts,
            rejected=tuple(rejected),
            transition=transition,
            back_in_service=self._back_in_service(),
        )

    def _take_metrics(self, hb: Heartbeat, accepted: int, now: float, wall: datetime) -> None:
        """The newest accepted heartbeat of a batch of `accepted` becomes the current state."""
        assert self.last_seen is not None
        self.last_seen_wall = (
            wall if now == self.last_seen else wall - timedelta(seconds=now - self.last_seen)
        )
        self.last_heartbeat = hb
        self.heartbeats += accepted
        self.region = hb.region
        if hb.role is not None:  # a heartbeat without a role keeps the configured one
            self.role, self.backup_for = hb.role, hb.backup_for
        # Heartbeats are immutable and their dicts are never mutated: shared, not copied.
        self.labels, self.config_versions = hb.labels, hb.config_versions
        self.missed_heartbeats = 0

    def _evaluate(self, run: int, broken: bool) -> Transition | None:
        """Status after a batch whose last `run` heartbeats had no gap between them (and
        `broken`: a gap came before them). They all share the newest metrics."""
        score = self._raw_score()
        good = score >= self.threshold
        if good:
            self.good_heartbeats = (0 if broken else self.good_heartbeats) + run
        else:
            self.good_heartbeats = 0
        old = self.status
        if old == "unknown":
            new: GatewayStatus = "healthy" if good else "degraded"
            why = "first heartbeat"
        elif not good:
            new, why = "degraded", f"score {score:.1f} below {self.threshold:g}"
        elif old != "healthy" and self.good_heartbeats >= self.settings.rise:
            new, why = "healthy", f"{self.good_heartbeats} good heartbeats"
        else:
            new, why = old, ""
        return self._move(new, why)

    def on_tick(self, now: float, since: float | None = None) -> Transition | None:
        """Count missed heartbeats (from `since`, if later than the last heartbeat: what
        gatefleet could not see does not count); mark down after `fall`. Idempotent:
        extra ticks are harmless."""
        if self.status == "unknown" or self.last_seen is None:
            return None
        missed = self._missed_at(now, since)
        self.missed_heartbeats = missed
        if missed:
            self.good_heartbeats = 0
        if self.status == "down":
            return None
        if missed >= self.settings.fall:
            return self._move("down", f"missed {missed} heartbeats")
        return self._check_score(f"missed {missed} heartbeats") if missed else None

    def next_check_at(self, now: float, since: float | None = None) -> float | None:
        """When on_tick should next run (may be <= now: run it at once); None: no need."""
        if self.status in ("unknown", "down") or self.last_seen is None:
            return None
        k = min(self._missed_at(now, since) + 1, self.settings.fall)
        return self._counted_from(since) + (k + 0.5) * self.interval + CHECK_SLACK_S

    def on_probe_ok(self, rtt_ms: float) -> Transition | None:
        rtt, a, prev = max(0.0, rtt_ms), self.settings.latency_smoothing, self.probe_latency_ms
        self.probe_latency_ms = rtt if prev is None else a * rtt + (1.0 - a) * prev
        self.failed_probes = 0
        return self._check_score(f"probe latency {self.probe_latency_ms:.1f} ms")

    def on_probe_failed(self) -> Transition | None:
        self.failed_probes += 1
        return self._check_score(f"{self.failed_probes} failed probes")

    def snapshot(self) -> GatewaySnapshot:
        hb = self.last_heartbeat
        return GatewaySnapshot(
            gateway_id=self.gateway_id,
            region=self.region,
            role=self.role,
            backup_for=self.backup_for,
            status=self.status,
            score=self.score,
            cpu_percent=hb.cpu_percent if hb else None,
            memory_percent=hb.memory_percent if hb else None,
            active_connections=hb.active_connections if hb else None,
            max_connections=hb.max_connections if hb else None,
            reported_latency_ms=hb.latency_ms if hb else None,
            probe_latency_ms=self.probe_latency_ms,
            consecutive_failures=self.consecutive_failures,
            last_seq=self.last_seq,
            last_seen=self.last_seen_wall,
            heartbeats=self.heartbeats,
            # Shared with the heartbeat they came from: nobody mutates them (see on_heartbeats).
            config_versions=self.config_versions,
            labels=self.labels,
            flapping=self.flaps.flapping,
            maintenance=self.maintenance,
            maintenance_reason=self.maintenance_reason,
        )
