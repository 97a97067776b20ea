"""Failover rules: pure decisions the SupervisorActor and LoadBalancer apply.

- `choose_replacement`: when a gateway goes down, its traffic goes to an eligible backup
  of it, else to what the current strategy picks among eligible gateways of the same
  region, else nowhere (`None`: the redirect says so).
- `MassFailureGuard`: if more than `max_percent` of the fleet goes down within one
  detection window, the orchestrator is more likely cut off than the fleet dead, so
  failover freezes until enough of the fleet is seen again.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from actors.pool import Pool
from actors.strategies import SelectorState, choose
from schemas.api import GatewaySnapshot
from schemas.settings import LoadBalancingSettings


@dataclass(frozen=True, slots=True)
class Replacement:
    gateway_id: str | None
    reason: str


def choose_replacement(
    failed: GatewaySnapshot,
    pool: Pool,
    *,
    strategy: str,
    state: SelectorState,
    rng: random.Random,
    settings: LoadBalancingSettings,
) -> Replacement:
    """Judged as if `failed` were gone (so its backups no longer wait for it), from the
    load balancer's live pool: a backup of it (the first by id), else the strategy's pick
    in its region (`choose`, sharing the strategy's rotation), else nobody."""
    with pool.without(failed.gateway_id):
        backups = pool.backups_of(failed.gateway_id)
        if backups:
            return Replacement(backups[0], f"backup of {failed.gateway_id}")
        same_region = pool.regions.get(failed.region)
        if not same_region:
            return Replacement(None, f"no eligible gateway in region {failed.region}")
        chosen = choose(strategy, same_region, state=state, rng=rng, settings=settings)
        return Replacement(chosen, f"{strategy} in region {failed.region}")


@dataclass(frozen=True, slots=True)
class GuardChange:
    frozen: bool
    message: str


class MassFailureGuard:
    """Freezes failover when too much of the fleet fails at once."""

    def __init__(self, max_percent: float, window_s: float) -> None:
        self.max_percent = max_percent
        self.window_s = window_s
        self.frozen = False
        self._recent: deque[tuple[float, str]] = deque()

    def _limit_exceeded(self, failing: int, fleet_size: int) -> bool:
        return fleet_size > 0 and failing * 100 > self.max_percent * fleet_size

    def on_down(self, gateway_id: str, now: float, fleet_size: int) -> GuardChange | None:
        self._recent.append((now, gateway_id))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        recent = len({g for _, g in self._recent})
        if not self.frozen and self._limit_exceeded(recent, fleet_size):
            self.frozen = True
            return GuardChange(
                True,
                f"{recent} of {fleet_size} gateways went down within "
                f"{self.window_s:g}s: failover frozen (are we cut off?)",
            )
        return None

    def on_fleet_seen(self, down_now: int, fleet_size: int) -> GuardChange | None:
        """After any recovery: unfreezes once no more than the limit is down."""
        if self.frozen and not self._limit_exceeded(down_now, fleet_size):
            self.frozen = False
            self._recent.clear()
            return GuardChange(
                False, f"fleet seen again ({down_now} of {fleet_size} down): failover resumed"
            )
        return None


# --- What the supervisor does with status changes ------------------------------------


@dataclass(frozen=True, slots=True)
class FindReplacement:
    """Ask the load balancer for a replacement of this (down) gateway."""

    gateway_id: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """Publish on `P.redirect.<subject_id>` and emit a failover or failback event."""

    subject_id: str
    from_gateway: str
    to_gateway: str | None
    reason: str
    failback: bool


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep a failed-over gateway out of the selection pool until it is released."""

    gateway_id: str


@dataclass(frozen=True, slots=True)
class Release:
    """Let a held gateway back into the selection pool."""

    gateway_id: str


Action = FindReplacement | Redirect | Hold | Release | GuardChange


class FailoverPlanner:
    """The supervisor's failover bookkeeping: who failed over to whom, what waits.

    Down (HA on): ask for a replacement, unless the mass-failure guard is frozen, in which
    case the gateway waits until the fleet is seen again. Recovered (down -> healthy) after a
    failover: with `failback = "auto"` traffic returns to it at once; with "manual" it was
    put on hold in the load balancer when it failed over (so it is never picked for a moment
    on recovery) and stays there until `failback(primary)` is called.
    """

    def __init__(self, guard: MassFailureGuard, *, manual_failback: bool) -> None:
        self.guard = guard
        self.manual_failback = manual_failback
        self.failed_over: dict[str, str | None] = {}  # down gateway -> where its traffic went
        self.waiting: set[str] = set()  # down while frozen: failover when the guard thaws
        self.held: dict[str, str | None] = {}  # recovered, awaiting a manual failback
        # Drained by an operator: a planned move (no guard), never failed back to.
        self.maintenance: set[str] = set()

    def on_change(
        self,
        gateway_id: str,
        old: str,
        new: str,
        *,
        fleet: int,
        down: int,
        now: float,
        flapping: bool = False,
    ) -> list[Action]:
        """A gateway's status changed; `fleet` gateways are known, `down` of them down
        (counting this change). A `flapping` gateway's failback waits for `on_steady`."""
        actions: list[Action] = []
        # A drained gateway moved already (or is on its way): nothing to do, nothing to count.
        if new == "down" and old != "down" and gateway_id not in self.maintenance:
            change = self.guard.on_down(gateway_id, now, fleet)
            if change is not None:
                actions.append(change)
            if self.guard.frozen:
                self.waiting.add(gateway_id)
            else:
                actions.append(FindReplacement(gateway_id))
        elif old == "down" and new != "down":
            self.waiting.discard(gateway_id)
            change = self.guard.on_fleet_seen(down, fleet)
            if change is not None:
                actions.append(change)
                actions += [FindReplacement(g) for g in sorted(self.waiting)]
                self.waiting.clear()
        if new == "healthy" and not flapping:
            actions += self._recovered(gateway_id)
        return actions

    def on_steady(self, gateway_id: str) -> list[Action]:
        """A healthy gateway stopped flapping: the failback its recovery deferred."""
        return self._recovered(gateway_id)

    def start_maintenance(self, gateway_id: str, *, move: bool = True) -> list[Action]:
        """An operator drains it: its traffic moves to a replacement (`move`), a planned
        move, so the mass-failure guard neither counts it nor stops it."""
        if gateway_id in self.maintenance:
            return []
        self.maintenance.add(gateway_id)
        moved = gateway_id in self.failed_over or gateway_id in self.waiting
        return [FindReplacement(gateway_id)] if move and not moved else []

    def end_maintenance(self, gateway_id: str, *, steady: bool) -> list[Action]:
        """Back in service: its traffic returns if it is `steady` (healthy, not flapping)."""
        self.maintenance.discard(gateway_id)
        return self._recovered(gateway_id) if steady else []

    def _recovered(self, gateway_id: str) -> list[Action]:
        if gateway_id not in self.failed_over or gateway_id in self.maintenance:
            return []
        replacement = self.failed_over.pop(gateway_id)
        if self.manual_failback:
            self.held[gateway_id] = replacement
            return []
        return [self._failback(gateway_id, replacement, "recovered")]

    def on_replacement(self, gateway_id: str, to: str | None, reason: str) -> list[Action]:
        self.failed_over[gateway_id] = to
        if gateway_id in self.maintenance:
            reason = f"maintenance; {reason}"
        redirect = Redirect(gateway_id, gateway_id, to, reason, failback=False)
        return [Hold(gateway_id), redirect] if self.manual_failback else [redirect]

    def failback(self, gateway_id: str) -> list[Action] | None:
        """An operator's manual failback; None when nothing is held for that gateway."""
        if gateway_id not in self.held:
            return None
        replacement = self.held.pop(gateway_id)
        return [Release(gateway_id), self._failback(gateway_id, replacement, "operator request")]

    def forget(self, gateway_id: str) -> list[Action]:
        """The gateway left: nothing waits for it any more."""
        held = gateway_id in self.held or (self.manual_failback and gateway_id in self.failed_over)
        self.failed_over.pop(gateway_id, None)
        self.held.pop(gateway_id, None)
        self.waiting.discard(gateway_id)
        self.maintenance.discard(gateway_id)
        return [Release(gateway_id)] if held else []

    @staticmethod
    def _failback(primary: str, replacement: str | None, why: str) -> Redirect:
        source = replacement or primary
        return Redirect(source, source, primary, f"failback to {primary}: {why}", failback=True)
