"""Fencing at the gateway edge (issue 16), on a real nats-server: every push carries the
leader's epoch; a gateway that has seen a higher one answers `stale_epoch`, and the
leader steps down without failing anyone; a DistributionActor whose replica no longer
leads stops acting, leaving its distribution as stored for the next leader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats.errors
import pykka
import pytest
from msgspec.structs import replace
from nats.js.kv import KeyValue

from actors.distribution import DistributionActor, read_answer
from actors.distribution_store import DistributionStore
from actors.distributor import DistributorActor
from bus.edge import Drops
from bus.jetstream import KvStore, bucket_name
from bus.runtime import Bus, Reply
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from schemas.api import Distribution
from schemas.codec import decode, encode
from schemas.wire import ConfigAck, ConfigPush
from tests import test_distribution
from tests.conftest import EventLog, wait_until
from tests.distribution_events import finished, steps
from tests.tenures import lead_again
from tests.test_distribution import ROUTE, ConfigFleet
from tests.test_kv_fencing import Faulty, Held

# The fixtures of the distribution tests: a fleet whose gateways record what they apply,
# and `run` to start an orchestrator with short timings.
fleet = test_distribution.fleet
run = test_distribution.run

K = TypeVar("K", bound=KeyValue)

GW_1_TO_3 = ("gw-1", "gw-2", "gw-3")
STOOD_BY = "this replica stopped leading"
PAUSED = "paused: this replica no longer leads"


def store(bus: Bus, prefix: str) -> DistributionStore:
    """The orchestrator's distribution store, on the test's own connection."""

    def bucket(name: str) -> KvStore:
        kv = bus.run(bus.js.key_value(bucket_name(prefix, name)))
        return KvStore(bus, kv, bucket_name(prefix, name))

    return DistributionStore(bucket("distributions"), bucket("desired"))


def stored(bus: Bus, prefix: str, dist_id: str) -> Distribution:
    """The distribution as its store holds it: what the next leader resumes from."""
    return store(bus, prefix).load().records[dist_id]


def pushes(fleet: ConfigFleet, dist_id: str) -> dict[str, list[int | None]]:
    """The epochs of the pushes of `dist_id` each gateway received."""
    return {
        gw: [p.epoch for _, p in agent.received if p.distribution_id == dist_id]
        for gw, agent in fleet.agents.items()
    }


def no_distribution_actor() -> bool:
    return not pykka.ActorRegistry.get_by_class(DistributionActor)


def test_a_gateway_that_has_seen_a_higher_epoch_makes_the_leader_step_down(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gw-2 has been pushed by a leader of a higher epoch (another replica, since): it
    refuses this leader's push with stale_epoch; the leader steps down, and gw-2 is not
    failed: the distribution stays as stored."""
    fleet.add_many("gw-1", "gw-2")
    orchestrator = run()
    epoch = orchestrator.lease.view.epoch
    assert orchestrator.lease.still_leader()
    assert epoch is not None
    newer = ConfigPush(
        distribution_id="dist-newer-leader",
        config_type="Acl",
        version=1,
        config_data={},
        epoch=epoch + 1000,
    )
    answer = decode(bus.ask(f"{prefix}.gw.gw-2.config", encode(newer), 5.0), ConfigAck)
    assert answer.ok

    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: not orchestrator.lease.still_leader(), what="the leader stepped down")
    # Stopped by itself at its next step, or by the distributor hearing of the new role
    # first, whichever comes first: either way as stored.
    wait_until(no_distribution_actor, what="its actor stopped")
    assert PAUSED in caplog.text or STOOD_BY in caplog.text

    assert orchestrator.lease.view.role == "standby"
    assert f"gateway gw-2 has seen epoch {epoch + 1000}" in caplog.text
    assert pushes(fleet, dist_id) == {"gw-1": [epoch], "gw-2": [epoch]}
    assert [p.distribution_id for _, _, p in fleet.applied["gw-2"]] == ["dist-newer-leader"]
    record = stored(bus, prefix, dist_id)
    assert record.status == "in_progress"
    assert {gw: d.state for gw, d in record.gateways.items()} == {"gw-1": "sent", "gw-2": "sent"}
    assert record.failed_gateways == []
    for step in ("gateway_nacked", "gateway_timed_out", "finished"):
        assert steps(event_log, dist_id, step) == []


def under_the_store(wrap: Callable[[KeyValue], K]) -> K:
    """Puts `wrap` around the bucket under the leader's distribution store: a fault on
    the way to the real server (FencedKv -> KvStore -> nats KeyValue)."""
    [distributor] = pykka.ActorRegistry.get_by_class(DistributorActor)
    kv = distributor.proxy().store.get()._kv.kv
    kv._kv = wrapped = wrap(kv._kv)
    return wrapped


class StoredThenCut(Faulty):
    """The first write of a gateways' chunk is stored and then its answer lost for good,
    the lease lost meanwhile (`cut`)."""

    def __init__(self, kv: KeyValue, cut: Callable[[], None]) -> None:
        super().__init__(kv)
        self.cut = cut
        self.done = False

    async def write(self, key: str, make: Callable[[], Awaitable[int]]) -> int:
        revision = await make()
        if ".gw." in key and not self.done:
            self.done = True
            self.cut()
            raise nats.errors.ConnectionClosedError
        return revision


def holding_fleet(fleet: ConfigFleet, *gateway_ids: str) -> Callable[[], Coroutine[Any, Any, None]]:
    """Adds these gateways, each holding its ack to a push until the gate the returned
    coroutine function opens (run it on the test bus)."""
    gate = asyncio.Event()

    async def hold(push: ConfigPush) -> None:
        await gate.wait()

    async def open_gate() -> None:
        gate.set()

    for gw in gateway_ids:
        fleet.add(gw, "eu-west", interval_s=0.5, on_config=hold)
    return open_gate


def test_a_distribution_actor_stops_sending_once_its_replica_no_longer_leads(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Batches of one: the first gateway holds its ack until the lease is lost; its ack
    then finds no leader, and nothing more is sent, stored or failed."""
    open_gate = holding_fleet(fleet, *GW_1_TO_3)
    orchestrator = run(distribution_batch_size=1, distribution_ack_timeout_ms=10_000)
    epoch = orchestrator.lease.view.epoch

    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: any(pushes(fleet, dist_id).values()), what="the first batch sent")
    orchestrator.lease.step_down()  # as if no renewal had succeeded in time
    bus.run(open_gate())
    wait_until(no_distribution_actor, what="its actor stopped")
    assert PAUSED in caplog.text or STOOD_BY in caplog.text

    sent = {gw: epochs for gw, epochs in pushes(fleet, dist_id).items() if epochs}
    assert list(sent.values()) == [[epoch]]  # one gateway, once
    [first] = sent
    record = stored(bus, prefix, dist_id)
    assert (record.status, record.batch) == ("in_progress", 1)
    assert {gw: d.state for gw, d in record.gateways.items()} == {
        gw: "sent" if gw == first else "pending" for gw in fleet.agents
    }
    for step in ("gateway_acked", "gateway_nacked", "gateway_timed_out", "finished"):
        assert steps(event_log, dist_id, step) == []


def test_a_stale_leaders_store_write_after_a_newer_leader_wrote_the_key_is_refused(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The leader has lost its lease without noticing yet: meanwhile a newer leader has
    loaded the distribution and written its record. The old leader's next step is
    refused as it stores its record (before it sends anything): it steps down, and the
    newer leader's record is what stays stored."""
    open_gate = holding_fleet(fleet, *GW_1_TO_3)
    orchestrator = run(distribution_batch_size=1, distribution_ack_timeout_ms=10_000)
    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: any(pushes(fleet, dist_id).values()), what="the first batch sent")

    newer = store(bus, prefix)
    record = newer.load().records[dist_id]
    newers = replace(record, reason="as the newer leader left it")
    newer.put_progress(newers, range(len(newers.target_gateways)))
    bus.run(open_gate())  # the first gateway acks: the old leader's next step

    wait_until(lambda: not orchestrator.lease.still_leader(), what="the old leader stepped down")
    wait_until(no_distribution_actor, what="its actor stopped")
    fenced = [r for r in caplog.records if "was written by another replica since" in r.message]
    assert len(fenced) == 1, [r.message for r in fenced]
    assert f"distributions key {dist_id}" in fenced[0].message
    assert "stops leading" in fenced[0].message
    assert stored(bus, prefix, dist_id) == newers
    sent = {gw: epochs for gw, epochs in pushes(fleet, dist_id).items() if epochs}
    assert len(sent) == 1  # the step's push to the next gateway was not sent
    for step in ("gateway_acked", "gateway_nacked", "gateway_timed_out", "finished"):
        assert steps(event_log, dist_id, step) == []


def test_a_step_whose_write_may_have_been_made_as_the_lease_is_lost_is_recorded(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    """The first gateway's ack: its step's write is stored, but its answer is lost for
    good while the lease is lost. Nothing more of the step is done, but its events are
    recorded: the next leader resumes after that step (it is in the store) and would
    never tell them."""
    open_gate = holding_fleet(fleet, *GW_1_TO_3)
    orchestrator = run(
        distribution_batch_size=1, distribution_ack_timeout_ms=10_000, kv_write_retries=0
    )
    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: any(pushes(fleet, dist_id).values()), what="the first batch sent")
    [first] = [gw for gw, epochs in pushes(fleet, dist_id).items() if epochs]
    cut = under_the_store(lambda kv: StoredThenCut(kv, orchestrator.lease.step_down))
    bus.run(open_gate())

    wait_until(no_distribution_actor, what="its actor stopped")
    assert cut.done
    record = stored(bus, prefix, dist_id)
    assert record.gateways[first].state == "acked"
    wait_until(lambda: steps(event_log, dist_id, "gateway_acked") != [], what="the ack")
    assert [e.gateway_id for e in steps(event_log, dist_id, "gateway_acked")] == [first]
    sent = {gw: epochs for gw, epochs in pushes(fleet, dist_id).items() if epochs}
    assert list(sent) == [first]  # the step's push to the next gateway was not sent


def test_a_late_step_of_this_replicas_earlier_tenure_leaves_the_present_one_alone(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    """This replica steps down while a step's write is held on its way, and leads again
    (a new epoch) before it lands: the new tenure resumes the distribution from the
    store and completes it. The old step's write then comes back refused (the new tenure
    wrote the key): that actor stops, and the present tenure keeps leading."""
    open_gate = holding_fleet(fleet, *GW_1_TO_3)
    orchestrator = run(
        distribution_batch_size=1, distribution_ack_timeout_ms=10_000, cluster={"lease_ms": 2000}
    )
    lease = orchestrator.lease
    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(lambda: any(pushes(fleet, dist_id).values()), what="the first batch sent")
    held = under_the_store(Held)
    held.hold()
    bus.run(open_gate())  # the first ack: its step's write is held
    assert held.waiting.wait(5)

    second_epoch = lead_again(lease)
    assert finished(event_log, dist_id, timeout=15).details["status"] == "completed"
    bus.run(held.release())
    wait_until(no_distribution_actor, what="the earlier tenure's actor stopped")

    assert lease.still_leader()
    assert lease.view.epoch == second_epoch
    record = stored(bus, prefix, dist_id)
    assert record.status == "completed"
    assert {d.state for d in record.gateways.values()} == {"acked"}
    for agent in fleet.agents.values():
        assert agent.config_versions == {"Route": 1}


@pytest.mark.parametrize(
    ("pushed", "ack", "expected"),
    [
        (5, {"error": "stale_epoch", "held_epoch": 9}, ("stale_epoch", None, 9)),
        (5, {"error": "stale_epoch", "held_epoch": 5}, ("nack", "stale_epoch", None)),
        (5, {"error": "stale_epoch"}, ("nack", "stale_epoch", None)),  # seen what?
        (None, {"error": "stale_epoch", "held_epoch": 9}, ("nack", "stale_epoch", None)),
    ],
)
def test_only_a_stale_epoch_above_the_one_pushed_is_a_fence(
    pushed: int | None, ack: dict[str, object], expected: tuple[str, str | None, int | None]
) -> None:
    push = ConfigPush(
        distribution_id="dist-1", config_type="Route", version=1, config_data={}, epoch=pushed
    )
    body = {"distribution_id": "dist-1", "gateway_id": "gw-1", "version": 1, "ok": False, **ack}
    answer = read_answer(Reply(encode(body), None), push, "gw-1", Drops(), "p.gw.gw-1.config")
    assert (answer.outcome, answer.detail, answer.held_epoch) == expected
