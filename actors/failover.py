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
from collections.abc import Sequence
from dataclasses import dataclass

from actors.strategies import SelectorState, partition_pool, select
from schemas.api import GatewaySnapshot
from schemas.settings import LoadBalancingSettings


@dataclass(frozen=True, slots=True)
class Replacement:
    gateway_id: str | None
    reason: str


def choose_replacement(
    failed: GatewaySnapshot,
    gateways: Sequence[GatewaySnapshot],
    threshold: float,
    *,
    strategy: str,
    state: SelectorState,
    rng: random.Random,
    settings: LoadBalancingSettings,
) -> Replacement:
    others = [g for g in gateways if g.gateway_id != failed.gateway_id]
    eligible, _excluded = partition_pool(others, threshold)
    backups = [
        g.gateway_id for g in eligible if g.role == "backup" and g.backup_for == failed.gateway_id
    ]
    if backups:
        return Replacement(backups[0], f"backup of {failed.gateway_id}")
    same_region = [g for g in eligible if g.region == failed.region]
    if not same_region:
        return Replacement(None, f"no eligible gateway in region {failed.region}")
    selection = select(
        strategy,
        same_region,
        threshold,
        region=None,
        state=state,
        rng=rng,
        settings=settings,
        regions={},
    )
    return Replacement(selection.gateway_id, f"{strategy} in region {failed.region}")


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
