"""The leader lease's rules, without I/O: which replica leads, with which epoch, when a
standby may take over and when a leader must stop acting.

The lease is one key in a replicated JetStream bucket, written only by compare-and-set
on the revision last read, so of replicas racing for it one write wins (bus/lease.py
makes the calls this asks for). Times are only compared on one machine's monotonic
clock: a standby takes over once it has itself seen the key's revision unchanged for
`lease_s`; a leader stops acting `step_down_after_s` (two thirds of the lease) after it
*sent* the last renewal that succeeded. A standby first sees a revision after it was
sent, so it takes over at least a third of the lease after the old leader stopped:
two leaders never act at once, with that margin for pauses and clock rates.

The epoch fences a leader's writes: max(previous epoch + 1, now in Unix ms), so it grows
with every acquisition, also across a reset of the bucket; renewals keep it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple

import msgspec

from schemas.lease import LeaseRecord

log = logging.getLogger(__name__)

Role = Literal["leader", "standby"]
# A standby reads the lease, and a leader checks its renewal, this often at most.
POLL_S = 0.25
# A read gets no answer while the bucket's stream elects a leader (4-9 s after its leader's
# node is lost): given up after this, so that a replica sees the lease soon after.
READ_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class LeaseTerms:
    lease_s: float

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    @property
    def step_down_after_s(self) -> float:
        return self.lease_s * 2 / 3

    @property
    def poll_s(self) -> float:
        return min(POLL_S, self.lease_s / 12)


class LeaseView(NamedTuple):
    """What a replica knows of the leadership: its own role, the leader's replica id
    (None while none is known) and the leader's epoch."""

    role: Role
    leader: str | None
    epoch: int | None


class Read(NamedTuple):
    """Read the lease: its revision (0 if it never existed) and record (None if absent)."""

    timeout_s: float


class Write(NamedTuple):
    """Write `record` if the key is still at `revision` (0: if it does not exist)."""

    record: LeaseRecord
    revision: int
    takeover: bool  # else a renewal
    sent_at: float  # on the monotonic clock
    timeout_s: float


def takeover_epoch(previous: int, now_ms: int) -> int:
    return max(previous + 1, now_ms)


class Lease:
    """One replica's side of the lease. The driver (bus/lease.py, on the bus loop) asks
    `next_step()` and reports each outcome; any thread may ask `still_leader()`, read
    `view` or call `step_down()`.

    `clock` is monotonic seconds and `wall` Unix seconds (both replaceable in tests).
    Listeners (`on_change`) get each new view on the thread that changed it, and must
    not block.
    """

    def __init__(
        self,
        replica_id: str,
        terms: LeaseTerms,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.replica_id = replica_id
        self.terms = terms
        self._clock = clock
        self._wall = wall
        self._lock = threading.RLock()
        self._listeners: list[Callable[[LeaseView], object]] = []
        self.view = LeaseView("standby", None, None)
        # While leading: (epoch, the revision it last wrote, when to stop acting). One
        # tuple, so that still_leader() reads it whole from any thread without the lock.
        self._tenure: tuple[int, int, float] | None = None
        self._renew_at = 0.0  # the next renewal is due then (sooner after a failure)
        # The lease as last read: revision, record, since when (first seen) on the clock.
        self._seen: tuple[int, LeaseRecord | None, float] | None = None
        self._read_at = -math.inf
        self._fresh = False  # read since the last write: a take-over may be tried
        self._highest_epoch = 0
        # The last record this replica sent: if it is what a read finds, it is its own
        # write (one it did not hear back from, or made before stepping down).
        self._sent: LeaseRecord | None = None
        # When the lease was last renewed, by its holder's clock (for people: `gatefleet
        # replicas`); None while no lease is known.
        self.renewed_at: datetime | None = None
        # The lease's revision at this replica's first read, and whether it took over a
        # lease still at that revision: one nobody renewed since this replica started,
        # whose holder had stopped before (a killed run, not a live replica).
        self.first_revision: int | None = None
        self.took_over_unrenewed = False

    # Any thread -----------------------------------------------------------------------

    def on_change(self, listener: Callable[[LeaseView], object]) -> None:
        self._listeners.append(listener)

    def still_leader(self) -> bool:
        """True while this replica may act as leader: check before each step."""
        tenure = self._tenure
        return tenure is not None and self._clock() < tenure[2]

    def step_down(
        self, higher_epoch: int = 0, why: str = "asked to step down", *, epoch: int | None = None
    ) -> None:
        """Stop leading now (a gateway refused the epoch as stale, or a write of leader
        state was fenced: `why`, logged if this replica was leading); the next take-over
        waits out the lease like any standby's and uses an epoch above `higher_epoch`.
        `epoch`: only if this replica leads in that epoch still (a step of an earlier
        tenure of this replica, ending late, leaves the present one alone)."""
        with self._lock:
            self._highest_epoch = max(self._highest_epoch, higher_epoch)
            tenure = self._tenure
            if epoch is not None and (tenure is None or tenure[0] != epoch):
                return
            self._sent = None
            if tenure is not None:
                self._stand_down(why)

    def release(self) -> Write | None:
        """Stop leading and say so in the lease (a clean stop), so that a standby, or this
        replica's next start, takes it at once instead of waiting the lease out. None
        when not leading. The driver writes it by compare-and-set, once."""
        with self._lock:
            tenure = self._tenure
            if tenure is None:
                return None
            epoch, revision, stop_at = tenure
            self._stand_down("stopping", level=logging.INFO)
            write = self._write(
                epoch, revision, self._clock(), stop_at - self._clock(), takeover=False
            )
            self._sent = None
            return write._replace(record=msgspec.structs.replace(write.record, released=True))

    # The driver -------------------------------------------------------------------------

    def next_step(self) -> Read | Write | None:
        """What to do now; None: nothing before `terms.poll_s` from now."""
        now = self._clock()
        with self._lock:
            tenure = self._tenure
            if tenure is not None and now >= tenure[2]:
                self._stand_down("no renewal succeeded in time")
                tenure = None
            if tenure is not None:
                if now < self._renew_at:
                    return None
                epoch, revision, stop_at = tenure
                self._renew_at = now + self.terms.renew_every_s
                return self._write(epoch, revision, now, stop_at - now, takeover=False)
            if now - self._read_at >= self.terms.poll_s:
                self._read_at = now
                return Read(min(READ_TIMEOUT_S, self.terms.renew_every_s))
            if self._fresh and self._seen is not None:
                revision, record, since = self._seen
                if not self._may_take(now, record, since):
                    return None
                previous = max(self._highest_epoch, record.epoch if record else 0)
                epoch = takeover_epoch(previous, int(self._wall() * 1000))
                return self._write(epoch, revision, now, self.terms.renew_every_s, takeover=True)
            return None

    def observed(self, revision: int, record: LeaseRecord | None) -> None:
        now = self._clock()
        with self._lock:
            if self.first_revision is None:
                self.first_revision = revision
            if self._seen is None or self._seen[0] != revision:
                self._seen = (revision, record, now)
            self._fresh = True
            self.renewed_at = record.renewed_at if record is not None else None
            if record is not None:
                self._highest_epoch = max(self._highest_epoch, record.epoch)
            if self._tenure is None:
                self._show(self._standby_view(now))

    def written(self, write: Write, revision: int) -> None:
        """The write succeeded: the key is at `revision`, holding `write.record`."""
        with self._lock:
            stop_at = write.sent_at + self.terms.step_down_after_s
            epoch = write.record.epoch
            if self._clock() >= stop_at:
                return  # too late to act on: a read finds it, as this replica's own
            self.renewed_at = write.record.renewed_at
            if self._tenure is not None and self._tenure[0] == epoch:
                self._tenure = (epoch, revision, stop_at)  # renewed
            elif self._tenure is None and write.takeover:
                log.info("lease: %s leads, epoch %d", self.replica_id, epoch)
                self.took_over_unrenewed = write.revision == self.first_revision
                self._tenure = (epoch, revision, stop_at)
                self._renew_at = write.sent_at + self.terms.renew_every_s
                self._show(LeaseView("leader", self.replica_id, epoch))

    def refused(self, write: Write) -> None:
        """The key was not at `write.revision`: another replica wrote it (or this one, in
        a write it did not hear back from: a read tells)."""
        with self._lock:
            if self._tenure is not None and self._tenure[0] == write.record.epoch:
                self._stand_down("the lease was not at the revision it renewed")

    def failed(self, write: Write) -> None:
        """No answer, or an error: the write may or may not have been made."""
        with self._lock:
            if self._tenure is not None and self._tenure[0] == write.record.epoch:
                self._renew_at = self._clock() + self.terms.poll_s  # try again soon

    # Inside -----------------------------------------------------------------------------

    def _write(
        self, epoch: int, revision: int, now: float, timeout_s: float, *, takeover: bool
    ) -> Write:
        renewed_at = datetime.fromtimestamp(self._wall(), UTC)
        self._sent = LeaseRecord(replica_id=self.replica_id, epoch=epoch, renewed_at=renewed_at)
        self._highest_epoch = max(self._highest_epoch, epoch)
        self._fresh = False  # the next take-over only after the next read
        return Write(self._sent, revision, takeover, now, timeout_s)

    def _may_take(self, now: float, record: LeaseRecord | None, since: float) -> bool:
        if record is None or record.released or self._is_own(record):
            return True  # nobody holds it, or this replica does and is not acting on it
        return now - since >= self.terms.lease_s

    def _is_own(self, record: LeaseRecord) -> bool:
        """Written by this replica in its last tenure (or take-over attempt): an epoch
        belongs to one acquisition, whoever else shares the replica id."""
        sent = self._sent
        return sent is not None and (record.replica_id, record.epoch) == (
            sent.replica_id,
            sent.epoch,
        )

    def _standby_view(self, now: float) -> LeaseView:
        if self._seen is None:
            return LeaseView("standby", None, None)
        _, record, since = self._seen
        if record is None:
            return LeaseView("standby", None, None)
        live = (
            not record.released
            and record.replica_id != self.replica_id
            and now - since < self.terms.lease_s
        )
        return LeaseView("standby", record.replica_id if live else None, record.epoch)

    def _stand_down(self, why: str, level: int = logging.WARNING) -> None:
        assert self._tenure is not None
        log.log(
            level, "lease: %s stops leading (epoch %d): %s", self.replica_id, self._tenure[0], why
        )
        self._tenure = None
        self._read_at = -math.inf  # read at once: who leads now?
        self._fresh = False
        self._show(self._standby_view(self._clock()))

    def _show(self, view: LeaseView) -> None:
        if view == self.view:
            return
        self.view = view
        for listener in list(self._listeners):
            try:
                listener(view)
            except Exception:
                log.exception("lease listener %r failed", listener)


def replica_metadata(lease: Lease) -> dict[str, str]:
    """This replica as its `$SRV` answers describe it (`gatefleet replicas` reads them)."""
    view, renewed = lease.view, lease.renewed_at
    return {
        "replica_id": lease.replica_id,
        "role": view.role,
        "leader": view.leader or "",
        "epoch": "" if view.epoch is None else str(view.epoch),
        "lease_renewed_at": "" if renewed is None else renewed.isoformat(),
    }
