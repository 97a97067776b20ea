"""ProbeSharing: the leader's probe results, shared with the standby replicas (issue 16).

Only the leading replica pings gateways (bus/probes.py), so that a gateway is probed
once, not once per replica. The standbys take the leader's results instead: without
them they would have no probe latencies at all, and would score and select otherwise.

- Leader: its prober hands `record` every result it delivers (a list append). The
  results of each `every_s` (100 ms) go out together, as ONE message on
  `P.replica.probes` (schemas.replica.ProbeResults, encoded in one call), sooner when
  MAX_PROBE_ROWS are waiting: at 10,000 gateways probed every 2 s, 10 messages a second
  of about 500 rows each. Results due once the replica no longer leads are dropped: the
  next leader probes for itself.
- Standby: each message from the replica it knows leads goes to `apply` (the prober's
  `apply_shared`, the path of its own results), so each GatewayActor gets the leader's
  ProbeAnswered messages, in the same order, and its score, probe latency and
  consecutive failures agree with the leader's. A leader ignores these messages (its
  own come back to it).

A change of role needs nothing here: each side asks the lease when it acts.

Threading: everything on the bus loop (`open` and `close` are awaited there by the
prober's start and stop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from bus.leadership import Lease
from bus.log_throttle import LogThrottle, held_back
from bus.runtime import SUBSCRIPTION_PENDING_BYTES, SUBSCRIPTION_PENDING_MSGS, Bus
from bus.subjects import Subjects
from bus.timers import TimerHandle, TimerWheel
from schemas.codec import DecodeError, decode, encode
from schemas.replica import MAX_PROBE_REASON, MAX_PROBE_ROWS, ProbeResults, ProbeRow

log = logging.getLogger(__name__)

ApplyShared = Callable[[list[ProbeRow]], None]

# How long the leader gathers results before it shares them: standbys lag its probes by
# this at most, for a tenth of the messages that sharing each prober step would cost.
SHARE_EVERY_S = 0.1
BAD_LOG_S = 60.0


class ProbeSharing:
    def __init__(
        self,
        bus: Bus,
        wheel: TimerWheel,
        subjects: Subjects,
        lease: Lease,
        *,
        every_s: float = SHARE_EVERY_S,
    ) -> None:
        self.bus = bus
        self.wheel = wheel
        self.subject = subjects.replica_probes
        self.lease = lease
        self.every_s = every_s
        self._rows: list[ProbeRow] = []
        self._due: TimerHandle | None = None
        self._subscription: Any = None
        self._apply: ApplyShared | None = None
        self._bad = LogThrottle(BAD_LOG_S)
        self.shared = 0  # results published to the standbys

    async def open(self, apply: ApplyShared) -> None:
        """Subscribes to the leader's results (the caller flushes)."""
        self._apply = apply
        self._subscription = await self.bus.nc.subscribe(
            self.subject,
            cb=self._on_results,
            pending_msgs_limit=SUBSCRIPTION_PENDING_MSGS,
            pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES,
        )

    async def close(self) -> None:
        """Drops the results not shared yet and unsubscribes."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        self._rows = []
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    def record(self, gateway_id: str, rtt_ms: float | None, reason: str | None) -> None:
        """One result the prober delivered here, to share with the next message."""
        if reason is not None and len(reason) > MAX_PROBE_REASON:
            reason = reason[:MAX_PROBE_REASON]
        rows = self._rows
        rows.append((gateway_id, rtt_ms, reason))
        if len(rows) >= MAX_PROBE_ROWS:
            self._share()
        elif self._due is None:
            self._due = self.wheel.schedule(self.every_s, self._on_due)

    def _on_due(self) -> None:
        self._due = None
        self._share()

    def _share(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        rows, self._rows = self._rows, []
        lease = self.lease
        if not rows or not lease.still_leader():
            return
        shared = ProbeResults(replica_id=lease.replica_id, results=rows)
        self.bus.publish(self.subject, encode(shared))
        self.shared += len(rows)

    async def _on_results(self, msg: Msg) -> None:
        lease = self.lease
        if lease.still_leader() or self._apply is None:
            return
        try:
            shared = decode(msg.data, ProbeResults)
        except DecodeError as exc:
            held = self._bad.admit("decode")
            if held is not None:
                log.warning("probe results that do not read, ignored: %s%s", exc, held_back(held))
            return
        if shared.replica_id == lease.view.leader:  # not a former leader's, late
            self._apply(shared.results)
