"""Configuration distribution when JetStream refuses writes: a real nats-server whose
buckets are made to refuse any write that would grow them (their stream's `max_bytes` set
to what they hold), as a full disk or an account over its limits would. No write is
half-done: a failed one is retried with backoff, then its step fails visibly. A write
that gets no answer (the bucket's subjects taken from its stream, as while the stream
elects a leader) is tried again for longer, and a step stored as its replica lost the
lease is recorded once, by it."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pykka
import pytest
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

import actors.distribution_store
from actors.base import CRASH
from actors.distribution import DistributionActor
from actors.distribution_machine import new_distribution
from actors.distribution_store import DistributionStore
from bus.jetstream import KvError, KvStore, bucket_name, ensure_bucket
from bus.runtime import Bus, Inbound
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient, NotFound, Unavailable
from schemas.codec import decode, encode
from schemas.events import Alarm, DistributionEvent
from schemas.settings import Settings
from schemas.stored import DistributionSpec
from schemas.wire import ConfigAck, ConfigPush
from tests import test_distribution, test_fencing
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.distribution_events import finished, steps
from tests.test_distribution import FAST, ROUTE, ConfigFleet

# The fixtures of the distribution tests: a fleet whose gateways record what they apply,
# and `run` to start an orchestrator with short timings.
fleet = test_distribution.fleet
run = test_distribution.run

REFUSED = "JetStream refused it (maximum bytes exceeded)"
T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
RETRIES = {"kv_write_retries": 2, "kv_write_backoff_ms": 10}


class Bucket:
    """One of the orchestrator's buckets, seen from the test's own connection."""

    def __init__(self, bus: Bus, prefix: str, name: str) -> None:
        self.bus = bus
        bucket = bucket_name(prefix, name)
        self.stream = "KV_" + bucket
        self.subject_prefix = f"$KV.{bucket}."
        self.kv = KvStore(bus, bus.run(bus.js.key_value(bucket)), bucket)

    def refuse_growth(self) -> None:
        """From now on JetStream refuses any write that makes the bucket hold more."""
        self._limit(None)

    def lift_limit(self) -> None:
        self._limit(-1)

    def answer_nothing(self) -> None:
        """From now on no stream takes the bucket's subjects: a write gets no answer (no
        responders), as while its stream elects a leader after a node is lost."""
        self._subjects([f"{self.subject_prefix}detached.>"])

    def answer_again(self) -> None:
        self._subjects([f"{self.subject_prefix}>"])

    def last_seq(self) -> int:
        """The sequence number of the bucket's last accepted write."""

        async def info() -> int:
            return (await self.bus.js.stream_info(self.stream)).state.last_seq

        return self.bus.run(info())

    def _subjects(self, subjects: list[str]) -> None:
        async def update() -> None:
            config = (await self.bus.js.stream_info(self.stream)).config
            config.subjects = subjects
            await self.bus.js.update_stream(config)

        self.bus.run(update())

    def _limit(self, max_bytes: int | None) -> None:
        async def limit() -> None:
            info = await self.bus.js.stream_info(self.stream)
            config = info.config
            # At least 1: 0 would mean no limit.
            config.max_bytes = max(info.state.bytes, 1) if max_bytes is None else max_bytes
            await self.bus.js.update_stream(config)

        self.bus.run(limit())


@pytest.fixture
def bucket(bus: Bus, prefix: str) -> Callable[[str], Bucket]:
    return lambda name: Bucket(bus, prefix, name)


def retries_logged(caplog: pytest.LogCaptureFixture, key: str) -> int:
    return sum(f"put {key}" in r.getMessage() for r in caplog.records)


class HeldGateway:
    """A gateway (listed in [[gateways]]) whose config pushes the test answers when it
    wants: what the store holds at each step is then the test's to choose."""

    def __init__(self, bus: Bus, subject: str, gateway_id: str) -> None:
        self.bus = bus
        self.gateway_id = gateway_id
        self.pushes: list[ConfigPush] = []
        self.held: list[tuple[str, ConfigPush]] = []
        self.auto = False  # answer at once
        bus.subscribe(subject, self._on_push)

    def _on_push(self, msg: Inbound) -> None:
        push = decode(msg.data, ConfigPush)
        self.pushes.append(push)
        self.held.append((msg.reply, push))
        if self.auto:
            self.answer()

    def answer(self) -> None:
        while self.held:
            reply, push = self.held.pop(0)
            ack = ConfigAck(
                distribution_id=push.distribution_id,
                gateway_id=self.gateway_id,
                ok=True,
                version=push.version,
            )
            self.bus.publish(reply, ack)


def held_gateway(
    run: Callable[..., Orchestrator], bus: Bus, **settings: Any
) -> tuple[Orchestrator, HeldGateway]:
    """Starts an orchestrator that knows the held gateway."""
    orchestrator = run(gateways=[{"id": "held", "region": "eu-west"}], **settings)
    return orchestrator, HeldGateway(bus, orchestrator.subjects.config("held"), "held")


def test_a_step_that_cannot_be_stored_fails_the_distribution_and_the_queue_moves_on(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bucket: Callable[[str], Bucket],
    bus: Bus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [other] = fleet.add_many("gw-other")
    orchestrator, held = held_gateway(run, bus, **RETRIES)
    first = client.distribute("Route", ROUTE, ["held"]).distribution_id
    queued = client.distribute("Route", ROUTE, ["gw-other"]).distribution_id
    wait_until(lambda: len(held.pushes) == 1, what="the first push")
    distributions = bucket("distributions")
    distributions.refuse_growth()
    held.answer()

    # Its last step (finished) must be stored before it is told: refused, so it is not.
    first_end = finished(event_log, first).details
    assert first_end["status"] == "failed"
    assert first_end["reason"] == f"cannot store its progress: {REFUSED}"
    # Each write tried 1 + kv_write_retries times: the step's, then the failure's own.
    assert retries_logged(caplog, first) == 2 * RETRIES["kv_write_retries"]
    # The queue moved on: the next one started, and failed at its first write likewise.
    assert finished(event_log, queued).details["reason"] == f"cannot store its progress: {REFUSED}"
    assert not other.received
    record = client.get_distribution(first)
    assert (record.status, record.reason) == ("failed", f"cannot store its progress: {REFUSED}")
    assert record.gateways["held"].state == "sent"  # as it was last stored and told
    status = client.status()
    assert (status.active_distributions, status.failed_distributions) == (0, 2)

    # Nothing is stuck after a restart: the failures could not be stored either, so both
    # resume from what was stored and end.
    orchestrator.stop()
    distributions.lift_limit()
    held.auto = True
    run(gateways=[{"id": "held", "region": "eu-west"}])

    def both_completed() -> bool:
        return all(client.get_distribution(d).status == "completed" for d in (first, queued))

    wait_until(
        both_completed,
        timeout=10,
        what="both completed after the restart",
        show=lambda: [client.get_distribution(d) for d in (first, queued)],
    )
    assert [push.attempt for push in held.pushes] == [1, 1]  # the same attempt again


def test_a_write_refused_for_a_while_is_retried_and_the_distribution_goes_on(
    run: Callable[..., Orchestrator],
    client: GatefleetClient,
    event_log: EventLog,
    bucket: Callable[[str], Bucket],
    bus: Bus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, held = held_gateway(run, bus, kv_write_retries=5, kv_write_backoff_ms=200)
    dist_id = client.distribute("Route", ROUTE, ["held"]).distribution_id
    wait_until(lambda: len(held.pushes) == 1, what="the first push")
    distributions = bucket("distributions")
    distributions.refuse_growth()
    held.answer()
    wait_until(lambda: retries_logged(caplog, dist_id) >= 1, what="a retry")
    distributions.lift_limit()

    assert finished(event_log, dist_id).details["status"] == "completed"
    assert [push.attempt for push in held.pushes] == [1]


def test_desired_state_that_cannot_be_stored_fails_the_distribution_before_any_push(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bucket: Callable[[str], Bucket],
) -> None:
    [gw] = fleet.add_many("gw-1")
    run(**RETRIES)
    desired = bucket("desired")
    desired.refuse_growth()
    first = client.distribute("Route", ROUTE, ["gw-1"]).distribution_id
    second = client.distribute("Route", ROUTE).distribution_id

    for dist_id in (first, second):
        end = finished(event_log, dist_id).details
        assert (end["status"], end["reason"]) == ("failed", f"cannot start it: {REFUSED}")
    assert not gw.received
    assert desired.kv.entries() == {}

    desired.lift_limit()
    third = client.distribute("Route", ROUTE).distribution_id
    assert finished(event_log, third).details["status"] == "completed"
    assert gw.config_versions == {"Route": 3}


def test_distribute_answers_unavailable_when_jetstream_refuses_writes_and_the_rest_works(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bucket: Callable[[str], Bucket],
) -> None:
    fleet.add_many("gw-1", "gw-2")
    run(**RETRIES)
    done = client.distribute("Route", ROUTE).distribution_id
    finished(event_log, done)
    distributions = bucket("distributions")
    written = distributions.last_seq()
    distributions.refuse_growth()

    for config_type in ("Route", "Tls"):  # a new version of a type, and a new type
        with pytest.raises(Unavailable) as refused:
            client.distribute(config_type, {"blob": "x" * 200})
        assert str(refused.value) == f"cannot store it: {REFUSED}"
    assert distributions.last_seq() == written  # nothing half-stored
    assert [d.id for d in client.list_distributions().distributions] == [done]
    # Selection and health are not held up.
    fleet.stop("gw-2", goodbye=False)
    wait_until(lambda: client.status().gateways_healthy == 1, what="gw-2 seen down")
    assert client.select_optimal_gateway().gateway_id == "gw-1"

    distributions.lift_limit()
    again = client.distribute("Route", ROUTE, ["gw-1"]).distribution_id
    assert finished(event_log, again).details["status"] == "completed"
    assert client.get_distribution(again).version == 2


# No answer: a stream electing its leader -------------------------------------------------


def test_a_write_with_no_answer_is_tried_again_until_the_stream_answers_a_refusal_is_not(
    bus: Bus, prefix: str
) -> None:
    name = bucket_name(prefix, "probe")
    bus.run(ensure_bucket(bus, name, 1))
    probe = Bucket(bus, prefix, "probe")

    spec = DistributionSpec(config_type="Route", version=1, fleet_wide=True, created_at=T0)

    def store(patience_s: float) -> KvStore:
        return KvStore(bus, bus.run(bus.js.key_value(name)), name, patience_s=patience_s)

    probe.answer_nothing()
    answering = threading.Timer(1.5, probe.answer_again)
    answering.start()
    started = time.monotonic()
    store(patience_s=12).put("key", spec)
    assert time.monotonic() - started >= 1.5
    assert probe.kv.get("key", DistributionSpec) == spec

    probe.answer_nothing()
    started = time.monotonic()
    with pytest.raises(KvError, match=r"^no JetStream stream answers for the bucket$"):
        store(patience_s=1).put("key", spec)
    assert time.monotonic() - started >= 1

    probe.answer_again()
    probe.refuse_growth()
    started = time.monotonic()
    with pytest.raises(KvError, match=re.escape(REFUSED)):
        store(patience_s=12).put("other", spec)
    assert time.monotonic() - started < 1


def test_a_step_stored_while_its_replica_lost_the_lease_is_recorded_and_the_leader_resumes_after_it(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bucket: Callable[[str], Bucket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gw-1 acks while the distributions bucket does not answer (its stream electing a
    leader): the step (gw-1 acked, gw-2 next) is tried again and again, and the replica
    loses its lease meanwhile. Once stored, that step's events are recorded, but gw-2 is
    not pushed; the replica, leading again, resumes after that step."""
    gw1, gw2 = fleet.add_many("gw-1", "gw-2")
    gw1.ack_delay_s = 0.5
    settings = make_settings(
        orchestrator={**FAST, "distribution_batch_size": 1, "distribution_ack_timeout_ms": 3000},
        health={"heartbeat_interval_ms": 500},
        cluster={"lease_ms": 3000},
    )
    orchestrator = start_orchestrator(settings)
    wait_until(lambda: client.status().gateways_healthy == 2, what="2 healthy gateways")
    old_epoch = orchestrator.lease.view.epoch
    dist_id = client.distribute("Route", ROUTE, ["gw-1", "gw-2"]).distribution_id
    wait_until(lambda: len(fleet.applied["gw-1"]) == 1, what="gw-1 applied")
    distributions = bucket("distributions")
    distributions.answer_nothing()
    wait_until(lambda: "tried again every" in caplog.text, what="the store tried again")
    orchestrator.lease.step_down()
    distributions.answer_again()

    acked = event_log.wait_for(
        lambda e: isinstance(e, DistributionEvent) and e.step == "gateway_acked", timeout=3
    )
    assert isinstance(acked, DistributionEvent)
    assert (acked.distribution_id, acked.gateway_id) == (dist_id, "gw-1")
    assert not orchestrator.lease.still_leader()
    assert not gw2.received  # the step's push is not sent by a replica that does not lead

    assert finished(event_log, dist_id, timeout=10).details["status"] == "completed"
    [resumed] = steps(event_log, dist_id, "resumed")
    assert resumed.details["resent"] == ["gw-2"]
    assert len(steps(event_log, dist_id, "gateway_acked")) == 2  # gw-1's told once
    assert [p.epoch for _, p in gw1.received] == [old_epoch]
    [(_, push)] = gw2.received
    assert old_epoch is not None
    assert push.epoch is not None
    assert push.epoch > old_epoch


# Bad stored values -----------------------------------------------------------------------


def test_an_actor_restarted_from_memory_stores_the_acks_its_predecessor_had_not(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks of two gateways. gw-1 and gw-2 ack (not stored: acks alone are not) while
    gw-3 holds its ack; then the DistributionActor dies. The new one resumes from the
    record in memory, in which they are acked, and only ever changes the second chunk
    again: it must store the first one too, or the store says they were never acked."""
    monkeypatch.setattr(actors.distribution_store, "CHUNK_GATEWAYS", 2)
    fleet.add_many("gw-1", "gw-2", "gw-4")
    open_gate = test_fencing.holding_fleet(fleet, "gw-3")
    run(distribution_ack_timeout_ms=10_000)  # batches of three
    dist_id = client.distribute("Route", ROUTE).distribution_id
    wait_until(
        lambda: len(steps(event_log, dist_id, "gateway_acked")) == 2, what="gw-1, gw-2 acked"
    )
    [actor] = pykka.ActorRegistry.get_by_class(DistributionActor)
    actor.tell(CRASH)
    wait_until(lambda: not actor.is_alive(), what="the actor dead")
    bus.run(open_gate())

    assert finished(event_log, dist_id).details["status"] == "completed"
    record = test_fencing.stored(bus, prefix, dist_id)
    assert (record.status, sorted(record.successful_gateways)) == (
        "completed",
        sorted(fleet.agents),
    )


def test_no_stored_value_stops_start_up_each_bad_one_is_alarmed_and_skipped_or_replaced(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    """The buckets as gatefleet would have left them (layout 3), with bad values put in."""

    async def bucket(name: str) -> KeyValue:
        config = KeyValueConfig(bucket=bucket_name(prefix, name), history=1)
        return await bus.js.create_key_value(config)

    distributions, desired = bus.run(bucket("distributions")), bus.run(bucket("desired"))
    store = DistributionStore(
        KvStore(bus, distributions, bucket_name(prefix, "distributions")),
        KvStore(bus, desired, bucket_name(prefix, "desired")),
    )
    store.put_version("Route", 3)
    ids = {}
    for name, (config_type, version) in {
        "good": ("Route", 3),
        "bad-spec": ("Route", 2),
        "bad-chunk": ("Acl", 1),
        "naive-time": ("Acl", 2),
    }.items():
        record = new_distribution(
            f"dist-{name}", config_type, version, targets=["gw-1"], unknown=[], created_at=T0
        )
        spec = DistributionSpec(
            config_type=config_type, version=version, fleet_wide=False, created_at=T0
        )
        store.create(record, spec, {"v": version})
        ids[name] = record.id
    naive = {
        "config_type": "Acl",
        "version": 2,
        "fleet_wide": False,
        "created_at": "2026-12-01T07:00:00",
    }
    bad = {
        "layout": b"not json",
        "versions.Route": b'{"config_type": "Route", "last_version": "three"}',
        "content.Acl.1": b'{"config_type": "Acl"}',
        "dist-good": b'{"status": "sideways"}',  # its progress
        "dist-bad-spec.spec": b'{"config_type": 7}',
        "dist-bad-chunk.gw.0": b"[1, 2",
        "dist-naive-time.spec": encode(naive),
    }
    for key, data in bad.items():
        bus.run(distributions.put(key, data))
    bus.run(desired.put("Route", b'{"version": 1}'))

    fleet.add_many("gw-1")
    run()
    alarms = [a for a in event_log.of_type(Alarm) if a.kind == "bad_stored_value"]
    assert len(alarms) == len(bad) + 1
    for named in (
        "layout",
        "versions.Route",
        "content.Acl.1",
        "desired state Route",
        *ids.values(),
    ):
        assert any(named in alarm.message for alarm in alarms), named
    # The distribution whose progress was unreadable is pending again: it runs.
    assert finished(event_log, ids["good"]).details["status"] == "completed"
    for skipped in ("bad-spec", "bad-chunk", "naive-time"):
        with pytest.raises(NotFound):
            client.get_distribution(ids[skipped])
    # Versions go on from the distributions that could be read.
    assert client.get_distribution(client.distribute("Route", ROUTE).distribution_id).version == 4
