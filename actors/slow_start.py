"""Slow start: a gateway that registers or comes back from down takes a growing share of
selections, from 0 to its full share linearly over `load_balancing.slow_start_s`.

Pure logic; the load balancer passes its clock. How the share is cut, for every strategy
alike (actors/strategies.py `select`): when the strategy picks a gateway in its ramp, the
pick stands with probability equal to the ramp factor (one draw of the load balancer's
seeded generator), else the strategy picks again without it (at most SLOW_START_PASSES
times, so a fleet that all comes back at once costs no more than that). Its share is then
about the factor times its full share: exactly so for a gateway with a small part of the
fleet's selections (or the least loaded under LeastConnections); with a larger part, a
little more (one of four gateways under RoundRobin at factor 0.5 gets 14 % of the
selections, not 12.5 %: a turn passed over goes to the next gateway in the rotation).
"""

from __future__ import annotations

from schemas.api import GatewaySnapshot

SLOW_START_PASSES = 4


class SlowStart:
    __slots__ = ("_since", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._since: dict[str, float] = {}  # gateways in their ramp -> when it began

    def on_update(self, old: GatewaySnapshot | None, new: GatewaySnapshot, now: float) -> None:
        """A new row for a gateway (`old`: the previous one, None when it is new)."""
        if self.window_s <= 0 or new.status != "healthy":
            return
        if old is None or old.status in ("unknown", "down"):
            self._since[new.gateway_id] = now

    @property
    def ramping(self) -> bool:
        return bool(self._since)

    def forget(self, gateway_id: str) -> None:
        self._since.pop(gateway_id, None)

    def factor(self, gateway_id: str, now: float) -> float:
        """Its share of selections, 0-1 (1: not ramping)."""
        since = self._since.get(gateway_id)
        if since is None:
            return 1.0
        share = (now - since) / self.window_s
        if share >= 1.0:
            del self._since[gateway_id]  # ramped: nothing to remember
            return 1.0
        return max(0.0, share)
