"""The lease's rules on a controllable clock, fed the outcomes a bucket would give."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bus.leadership import Lease, LeaseTerms, LeaseView, Read, Write, takeover_epoch
from schemas.lease import LeaseRecord

LEASE_S = 9.0
WALL_S = 1_800_000_000.0  # the wall clock's start, Unix seconds
WALL_MS = int(WALL_S * 1000)


class Clock:
    """One controllable clock for both: monotonic seconds and a wall clock in step."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_S + self.now - 100.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_lease(clock: Clock, replica_id: str = "a") -> tuple[Lease, list[LeaseView]]:
    lease = Lease(replica_id, LeaseTerms(LEASE_S), clock=clock, wall=clock.wall)
    views: list[LeaseView] = []
    lease.on_change(views.append)
    return lease, views


def other(epoch: int, replica_id: str = "b") -> LeaseRecord:
    # Renewed, by its own clock, long ago: a standby never compares it with its own.
    return LeaseRecord(
        replica_id=replica_id, epoch=epoch, renewed_at=datetime(2001, 1, 1, tzinfo=UTC)
    )


def read(lease: Lease, revision: int, record: LeaseRecord | None) -> Write | None:
    """A read step answered with (revision, record); then the step that follows it."""
    assert isinstance(lease.next_step(), Read)
    lease.observed(revision, record)
    step = lease.next_step()
    assert not isinstance(step, Read)
    return step


def lead(lease: Lease, revision: int = 1, record: LeaseRecord | None = None) -> Write:
    """Takes the lease at `revision`: the take-over write, reported written."""
    step = read(lease, revision - 1, record)
    assert step is not None
    assert step.takeover
    lease.written(step, revision)
    assert lease.still_leader()
    return step


def test_an_absent_lease_is_taken_at_once_with_an_epoch_from_the_wall_clock(
    clock: Clock,
) -> None:
    lease, views = make_lease(clock)
    assert lease.view == LeaseView("standby", None, None)
    step = read(lease, 0, None)
    assert step is not None
    assert (step.revision, step.takeover, step.record.replica_id) == (0, True, "a")
    assert step.record.epoch == WALL_MS  # a fresh bucket: epochs from now in ms
    assert not lease.still_leader()  # not before the write succeeded
    lease.written(step, 1)
    assert lease.still_leader()
    assert views == [LeaseView("leader", "a", WALL_MS)]


def test_a_standby_takes_over_only_after_seeing_the_revision_unchanged_for_the_lease(
    clock: Clock,
) -> None:
    lease, views = make_lease(clock)
    assert read(lease, 7, other(500)) is None
    assert views == [LeaseView("standby", "b", 500)]
    clock.advance(LEASE_S - 0.3)
    assert read(lease, 7, other(500)) is None
    clock.advance(0.3)
    step = read(lease, 7, other(500))
    assert views[-1] == LeaseView("standby", None, 500)  # stale: no leader known
    assert isinstance(step, Write)
    assert (step.revision, step.takeover) == (7, True)  # compare-and-set on what it read
    assert step.record.epoch == WALL_MS + int(LEASE_S * 1000)  # now in ms > 500 + 1


def test_a_renewal_seen_restarts_the_standbys_wait(clock: Clock) -> None:
    lease, _ = make_lease(clock)
    read(lease, 7, other(500))
    clock.advance(LEASE_S - 1)
    assert read(lease, 8, other(500)) is None  # renewed: a new revision
    clock.advance(LEASE_S - 0.5)
    assert read(lease, 8, other(500)) is None
    clock.advance(0.5)
    step = read(lease, 8, other(500))
    assert step is not None
    assert step.revision == 8


def test_a_takeover_epoch_grows_past_the_previous_one_even_ahead_of_the_clock(
    clock: Clock,
) -> None:
    ahead = WALL_MS + 3_600_000  # written by a replica whose wall clock ran an hour ahead
    lease, _ = make_lease(clock)
    read(lease, 3, other(ahead))
    clock.advance(LEASE_S)
    step = read(lease, 3, other(ahead))
    assert step is not None
    assert step.record.epoch == ahead + 1
    assert takeover_epoch(ahead, WALL_MS) == ahead + 1
    assert takeover_epoch(5, WALL_MS) == WALL_MS


def test_a_leader_renews_every_third_of_the_lease_keeping_its_epoch(clock: Clock) -> None:
    lease, views = make_lease(clock)
    taken = lead(lease)
    assert lease.next_step() is None
    for revision in (2, 3, 4):
        clock.advance(LEASE_S / 3 - 0.01)
        assert lease.next_step() is None
        clock.advance(0.01)
        renewal = lease.next_step()
        assert isinstance(renewal, Write)
        assert not renewal.takeover
        assert (renewal.revision, renewal.record.epoch) == (revision - 1, taken.record.epoch)
        lease.written(renewal, revision)
    assert len(views) == 1  # renewals change nothing anyone sees
    assert lease.still_leader()


def test_a_leader_that_cannot_renew_stops_two_thirds_into_its_last_renewal(
    clock: Clock,
) -> None:
    lease, views = make_lease(clock)
    lead(lease)
    clock.advance(LEASE_S / 3)
    renewal = lease.next_step()
    assert isinstance(renewal, Write)
    lease.written(renewal, 2)  # its send time counts, not when the answer came
    renewed_at = renewal.sent_at
    while True:  # then every renewal fails: retried every poll
        clock.advance(lease.terms.poll_s)
        if clock.now >= renewed_at + LEASE_S * 2 / 3:
            break
        assert lease.still_leader()
        step = lease.next_step()
        if isinstance(step, Write):
            assert step.revision == 2
            assert step.timeout_s <= renewed_at + LEASE_S * 2 / 3 - clock.now  # not past it
            lease.failed(step)
    # No step ran since: still_leader() goes by the clock alone.
    assert not lease.still_leader()
    # A standby that saw revision 2 at once takes over LEASE_S later: a third of it after.
    assert isinstance(lease.next_step(), Read)
    assert views[-1] == LeaseView("standby", None, None)


def test_an_answer_after_the_step_down_point_does_not_make_a_leader(clock: Clock) -> None:
    lease, views = make_lease(clock)
    step = read(lease, 0, None)
    assert step is not None
    clock.advance(LEASE_S * 2 / 3)
    lease.written(step, 1)  # too late to act on
    assert not lease.still_leader()
    assert views == []
    # A read shows it as its own: taken again at once, with a new epoch.
    clock.advance(1)
    again = read(lease, 1, step.record)
    assert again is not None
    assert again.record.epoch > step.record.epoch
    assert again.revision == 1


def test_a_refused_renewal_means_another_replica_leads(clock: Clock) -> None:
    lease, views = make_lease(clock)
    lead(lease)
    clock.advance(LEASE_S / 3)
    renewal = lease.next_step()
    assert isinstance(renewal, Write)
    lease.refused(renewal)
    assert not lease.still_leader()
    assert views[-1].role == "standby"
    assert read(lease, 5, other(WALL_MS + 9000)) is None  # and waits out the new lease
    assert lease.view == LeaseView("standby", "b", WALL_MS + 9000)


def test_step_down_stops_at_once_and_waits_out_its_own_lease(clock: Clock) -> None:
    lease, views = make_lease(clock)
    taken = lead(lease)
    stale = taken.record.epoch + 60_000  # a gateway has seen a higher epoch
    lease.step_down(stale)
    assert not lease.still_leader()
    assert views[-1].role == "standby"
    assert read(lease, 1, taken.record) is None  # not taken again at once
    clock.advance(LEASE_S)
    step = read(lease, 1, taken.record)
    assert step is not None
    assert step.record.epoch == stale + 1


def test_a_step_down_for_an_earlier_tenure_leaves_the_present_one_leading(clock: Clock) -> None:
    """A step of this replica's earlier tenure, ending late (a write refused as fenced),
    asks to step down in its own epoch: once the replica leads again, that changes
    nothing; asked in the present epoch, it steps down."""
    lease, _ = make_lease(clock)
    first = lead(lease)
    lease.step_down()
    assert read(lease, 1, first.record) is None  # its own lease waited out first
    clock.advance(LEASE_S)
    again = read(lease, 1, first.record)
    assert again is not None
    lease.written(again, 2)
    assert again.record.epoch > first.record.epoch

    lease.step_down(why="a late step of the first tenure", epoch=first.record.epoch)
    assert lease.still_leader()
    assert lease.view.epoch == again.record.epoch
    lease.step_down(why="a step of this tenure", epoch=again.record.epoch)
    assert not lease.still_leader()


def test_a_leader_that_lost_its_renewals_takes_its_own_lease_again_at_once(
    clock: Clock,
) -> None:
    lease, _ = make_lease(clock)
    taken = lead(lease)
    clock.advance(LEASE_S / 3)
    renewal = lease.next_step()
    assert isinstance(renewal, Write)
    lease.failed(renewal)  # no answer: but it was written
    clock.advance(LEASE_S / 3)
    assert isinstance(lease.next_step(), Read)  # stepped down
    assert not lease.still_leader()
    lease.observed(2, renewal.record)
    step = lease.next_step()
    assert isinstance(step, Write)  # nobody else can hold it: no wait
    assert step.takeover
    assert step.record.epoch > taken.record.epoch


def test_a_renewal_refused_because_one_unanswered_was_made_takes_the_lease_back(
    clock: Clock,
) -> None:
    lease, _ = make_lease(clock)
    taken = lead(lease)
    clock.advance(LEASE_S / 3)
    first = lease.next_step()
    assert isinstance(first, Write)
    lease.failed(first)  # no answer, but made: the key is at revision 2
    clock.advance(lease.terms.poll_s)
    second = lease.next_step()
    assert isinstance(second, Write)
    assert second.revision == 1
    lease.refused(second)
    assert not lease.still_leader()
    step = read(lease, 2, first.record)
    assert step is not None  # its own tenure's record: no wait
    assert (step.revision, step.takeover) == (2, True)
    assert step.record.epoch > taken.record.epoch


def test_a_released_lease_is_taken_at_once_by_a_standby_with_a_higher_epoch(
    clock: Clock,
) -> None:
    leader, views = make_lease(clock, "a")
    taken = lead(leader)
    release = leader.release()
    assert release is not None
    assert release.record.released
    assert (release.record.epoch, release.revision) == (taken.record.epoch, 1)
    assert not leader.still_leader()
    assert views[-1].role == "standby"
    assert leader.release() is None  # once

    standby, _ = make_lease(clock, "b")
    step = read(standby, 2, release.record)  # no waiting out the lease
    assert step is not None
    assert step.takeover
    assert step.record.epoch > taken.record.epoch
    assert standby.view.leader is None  # a released lease names no leader
