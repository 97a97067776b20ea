"""The lease on a real three-node cluster, in an R3 bucket: one leader, take-over after
its death, step-down before expiry, and no two leaders when a NATS node dies."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import nats.errors
import pytest
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus.lease import lease_bucket
from bus.runtime import Bus
from tests.cluster import NatsCluster
from tests.conftest import wait_until
from tests.replicas import PREFIX, Holder, LeaderWatch

LEASE_S = 2.0
PROBE_KEY = "probe"
HolderFactory = Callable[..., Holder]


@pytest.fixture
def holder(nats_cluster: NatsCluster) -> Iterator[HolderFactory]:
    """Starts lease holders on the cluster; closes them after the test."""
    started: list[Holder] = []

    def start(replica_id: str, lease_s: float = LEASE_S, **options: object) -> Holder:
        started.append(Holder(nats_cluster.url, replica_id, lease_s, **options))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for one in started:
        one.close()


def leader_of(holders: list[Holder], timeout: float = 10.0) -> Holder:
    """The one holder leading, once one does."""
    found: list[Holder] = []

    def one_leads() -> bool:
        found[:] = [h for h in holders if h.lease.still_leader()]
        return len(found) == 1

    wait_until(one_leads, timeout, "one leader", show=lambda: [h.lease.view for h in holders])
    return found[0]


def test_one_of_two_leads_and_the_other_knows_who(holder: HolderFactory) -> None:
    before_ms = time.time_ns() // 1_000_000
    holders = [holder("a"), holder("b")]
    watch = LeaderWatch(holders)
    leader = leader_of(holders)
    standby = next(h for h in holders if h is not leader)
    epoch = leader.lease.view.epoch
    assert epoch is not None
    assert epoch >= before_ms  # a fresh bucket: epochs start from now in ms
    wait_until(lambda: standby.lease.view.leader == leader.lease.replica_id, what="known")
    assert standby.lease.view == ("standby", leader.lease.replica_id, epoch)
    time.sleep(LEASE_S * 1.5)  # renewals go on: the lease never changes hands
    assert leader.lease.still_leader()
    assert leader.lease.view.epoch == epoch
    assert [h.lease.replica_id for h in holders if h.became("leader")] == [leader.lease.replica_id]
    watch.stop()


def test_a_standby_takes_over_within_the_lease_and_a_second(holder: HolderFactory) -> None:
    holders = [holder("a"), holder("b")]
    watch = LeaderWatch(holders)
    epochs: list[int] = []
    for successor in ("c", "d"):  # every take-over with a newer epoch
        leader = leader_of(holders)
        epochs.append(leader.lease.view.epoch or 0)
        leader.keeper.stop(release=False)  # dies: renews no more, releases nothing
        died = time.monotonic()
        holders.remove(leader)
        new = holder(successor)
        watch.add(new)
        holders.append(new)
        # The standby, or the newcomer if it saw the last renewal first.
        took_over = leader_of(holders, timeout=LEASE_S + 5)
        elapsed = (took_over.became("leader") or 0) - died
        assert 0 < elapsed <= LEASE_S + 1, elapsed
    epochs.append(leader_of(holders).lease.view.epoch or 0)
    assert epochs == sorted(set(epochs)), epochs  # strictly growing
    watch.stop()


def test_a_leader_cut_off_steps_down_before_its_lease_can_expire(
    holder: HolderFactory,
) -> None:
    a = holder("a")
    leader_of([a])
    b = holder("b")
    watch = LeaderWatch([a, b])
    wait_until(lambda: b.lease.view.leader == "a", what="b knows a leads")
    a.bus.run(a.bus.nc.close())  # every renewal fails from here on
    cut = time.monotonic()
    wait_until(lambda: b.became("leader") is not None, LEASE_S + 5, "b takes over")
    stepped_down, took_over = a.stepped_down(), b.became("leader")
    assert stepped_down is not None
    assert took_over is not None
    # a stopped at most two thirds of a lease after the cut (its last renewal was
    # before), b took over at least a lease after a's last renewal: a third between.
    assert stepped_down - cut <= LEASE_S * 2 / 3 + 0.1
    assert took_over - stepped_down >= LEASE_S / 3 - 0.1, (took_over, stepped_down)
    watch.stop()


class SkewedClock:
    """The monotonic clock, moved forward by the test (a clock that jumps, a pause)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_a_leader_whose_clock_runs_past_its_renewals_stops_before_its_lease_does(
    holder: HolderFactory,
) -> None:
    clock = SkewedClock()
    a = holder("a", clock=clock)
    first = leader_of([a]).lease.view.epoch
    b = holder("b")
    watch = LeaderWatch([a, b])
    wait_until(lambda: b.lease.view.leader == "a", what="b knows a leads")
    clock.offset = LEASE_S * 2 / 3  # by its own clock, no renewal for two thirds of a lease
    assert not a.lease.still_leader()  # at once, before any step of its own
    # Its lease is still valid for b: a takes its own lease again, with a new epoch.
    wait_until(a.lease.still_leader, LEASE_S, "a leads again")
    second = a.lease.view.epoch
    assert first is not None
    assert second is not None
    assert second > first
    assert b.became("leader") is None
    watch.stop()


def write_outage(bus: Bus, kv: KeyValue, revision: int, since: float) -> float:
    """Compare-and-set on a key of its own (at `revision`) every 50 ms or so until one
    succeeds: how long after `since` that was."""
    deadline = since + 30
    while time.monotonic() < deadline:
        try:
            bus.run(kv.update(PROBE_KEY, b"x", last=revision), timeout=1.0)
        except KeyWrongLastSequenceError:  # an update that timed out was made after all
            return time.monotonic() - since
        except (nats.errors.Error, TimeoutError):
            time.sleep(0.05)
        else:
            return time.monotonic() - since
    raise AssertionError("no write within 30 s")


@pytest.mark.slow
def test_killing_the_node_that_leads_the_lease_bucket_makes_no_two_leaders(
    nats_cluster: NatsCluster, holder: HolderFactory
) -> None:
    lease_s = 10.0  # the default: longer than writes fail after a node dies
    holders = [holder("a", lease_s), holder("b", lease_s)]
    watch = LeaderWatch(holders)
    leader_of(holders)
    bus = Bus(nats_cluster.url, use_uvloop=False)
    bus.start()
    try:
        kv = lease_bucket(bus, PREFIX, 3)
        revision = bus.run(kv.put(PROBE_KEY, b"x"))
        nats_cluster.kill(nats_cluster.stream_leader(f"KV_{PREFIX}_leader"))
        killed = time.monotonic()
        outage = write_outage(bus, kv, revision, killed)
    finally:
        bus.stop()
    # A lease on: writes work again, and the standby has seen the last renewal go stale
    # if there was one.
    leader = leader_of(holders, timeout=lease_s + 5)
    time.sleep(max(0.0, killed + outage + lease_s - time.monotonic()))
    watch.stop()
    assert leader.lease.still_leader()
    stepped_down = [h.lease.replica_id for h in holders if h.stepped_down()]
    print(f"writes failed for {outage:.1f}s; stepped down: {stepped_down}")
