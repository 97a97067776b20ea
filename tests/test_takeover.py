"""Take-over on a real three-node NATS cluster (issue 16): two `gatefleet up` processes,
replicas on R3 JetStream, and gateway agents in this process that ack each push late,
so that a distribution sent one gateway at a time is still running when something dies.

- The leader process SIGKILLed mid-distribution: the standby leads within lease_ms + 1 s,
  resumes the distribution from its last stored step (only the push in flight is sent
  again), every gateway applies the version once, and the next distribution gets the
  next version.
- The NATS node leading the distributions bucket SIGKILLed mid-distribution: the
  distribution completes, its record is stored, every step its record implies is in the
  event stream, and no two replicas lead at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import nats.errors
import pytest

from bench.bench_chaos import missing_events, retrying
from bus.connection import BusError
from bus.jetstream import KvError, bucket_name, stream_name
from bus.replay import Replay
from bus.runtime import Bus, Inbound
from gatefleet.client import GatefleetClient, GatefleetError
from schemas.api import Distribution
from schemas.events import Event, OrchestratorLeader, OrchestratorStarted, decode_event
from tests.cluster import NatsCluster
from tests.conftest import EventLog, wait_until
from tests.distribution_events import finished, steps
from tests.gatefleet_up import GatefleetUp
from tests.test_distribution import ROUTE, ConfigFleet
from tests.test_fencing import pushes, stored

T = TypeVar("T")

LEASE_MS = 2000
LEASE_S = LEASE_MS / 1000
# How long a request is asked again while gatefleet does not answer (or no replica leads).
ANSWER_TIMEOUT_S = 15.0
ACK_DELAY_S = 0.3  # each gateway applies a push at once and acks it this much later
GATEWAYS = [f"gw-{n}" for n in range(1, 7)]


def replica_config(directory: Path, url: str, prefix: str, replica_id: str) -> Path:
    """`gatefleet up`'s config for one replica: the cluster's three nodes, R3, one
    gateway per batch, a short lease (a killed leader's is waited out)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gatefleet.toml"
    config.write_text(
        f'[bus]\nurl = "{url}"\nreplicas = 3\nsubject_prefix = "{prefix}"\n'
        f'data_dir = "{directory}"\n'
        "[orchestrator]\ndistribution_batch_size = 1\ndistribution_ack_timeout_ms = 3000\n"
        "distribution_retry_delay_ms = 100\n"
        "[health]\nheartbeat_interval_ms = 500\nprobe_interval_ms = 0\n"
        f"[audit]\nmax_bytes = {16 * 1024 * 1024}\n"
        f'[cluster]\nreplica_id = "{replica_id}"\nlease_ms = {LEASE_MS}\n'
    )
    return config


ReplicaFactory = Callable[[str], GatefleetUp]


@pytest.fixture
def replica(nats_cluster: NatsCluster, prefix: str, tmp_path: Path) -> Iterator[ReplicaFactory]:
    """Starts `gatefleet up` as the replica named, once ready; stops them all after."""
    started: list[GatefleetUp] = []

    def start(replica_id: str) -> GatefleetUp:
        config = replica_config(tmp_path / replica_id, nats_cluster.url, prefix, replica_id)
        started.append(GatefleetUp(config))
        started[-1].wait_ready(30)
        return started[-1]

    yield start
    for up in reversed(started):
        up.kill(signal.SIGTERM)


class Observer:
    """The test's side of the bus, on the nodes given: gateway agents, a client, every
    event as published."""

    def __init__(self, url: str, prefix: str) -> None:
        self.bus = Bus(url, use_uvloop=False)
        self.bus.start()
        self.fleet = ConfigFleet(self.bus, prefix)
        self.client = GatefleetClient(url, prefix=prefix)
        self.client.connect()
        self.events = EventLog()
        self.bus.subscribe(f"{prefix}.events.>", self._on_event)
        self.prefix = prefix

    def _on_event(self, msg: Inbound) -> None:
        self.events.add(decode_event(msg.data))

    def gateways(self, *gateway_ids: str) -> None:
        """Agents that ack late; returns once every replica counts them healthy."""
        for agent in self.fleet.add_many(*gateway_ids):
            agent.ack_delay_s = ACK_DELAY_S
        wait_until(
            lambda: healthy(self.client) == len(self.fleet.agents),
            timeout=10,
            what="every gateway healthy",
        )

    def record(self, dist_id: str) -> Distribution:
        """The distribution as the leader has it (retried through a change of leader)."""
        return retrying(lambda: self.client.get_distribution(dist_id), ANSWER_TIMEOUT_S)

    def stored_events(self) -> list[Event]:
        """Every event the stream holds, read back from JetStream (asked again while the
        stream elects a new leader after a node's loss: no answer meanwhile)."""
        subjects = [f"{self.prefix}.events.>"]

        def read() -> list[Event]:
            with Replay(self.bus, stream_name(self.prefix), subjects) as replay:
                return [decode_event(data) for batch in replay for _, _, data in batch]

        return retrying(read, ANSWER_TIMEOUT_S, (nats.errors.TimeoutError, BusError))

    def close(self) -> None:
        self.fleet.close()
        self.client.close()
        self.bus.stop()


@pytest.fixture
def observe(prefix: str) -> Iterator[Callable[[str], Observer]]:
    made: list[Observer] = []

    def make(url: str) -> Observer:
        made.append(Observer(url, prefix))
        return made[-1]

    yield make
    for observer in made:
        observer.close()


def healthy(client: GatefleetClient) -> int:
    return retrying(client.status, ANSWER_TIMEOUT_S).gateways_healthy


class LeaderSamples:
    """Asks every replica (`$SRV.PING`, as `gatefleet replicas`) which it is, again and
    again in a thread, on a client of its own: remembers any answer naming two leaders."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = GatefleetClient(url, prefix=prefix)
        self.client.connect()
        self.samples: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-samples", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                replicas = self.client.replicas()
            except GatefleetError:
                continue
            self.samples.append({r.replica_id: r.role for r in replicas})

    def leaders(self) -> set[str]:
        """The replicas that led in any sample."""
        return {r for sample in self.samples for r, role in sample.items() if role == "leader"}

    def stop(self) -> list[dict[str, str]]:
        """The samples with more than one leader."""
        self._stop.set()
        self._thread.join(5)
        self.client.close()
        assert len(self.samples) > 5, "the sampling hardly ran"
        return [s for s in self.samples if list(s.values()).count("leader") > 1]


def wait_for_roles(client: GatefleetClient, roles: dict[str, str]) -> None:
    wait_until(
        lambda: {r.replica_id: r.role for r in client.replicas()} == roles,
        timeout=10,
        what=f"roles {roles}",
        show=client.replicas,
    )


def applied_versions(fleet: ConfigFleet) -> dict[str, list[int]]:
    return {gw: [push.version for _, _, push in applied] for gw, applied in fleet.applied.items()}


@pytest.mark.slow
def test_sigkill_of_the_leader_mid_distribution_the_standby_resumes_it(
    nats_cluster: NatsCluster,
    replica: ReplicaFactory,
    observe: Callable[[str], Observer],
) -> None:
    a = replica("a")  # alone: it takes the fresh lease
    replica("b")
    seen = observe(nats_cluster.url)
    wait_for_roles(seen.client, {"a": "leader", "b": "standby"})
    seen.gateways(*GATEWAYS)
    dist_id = seen.client.distribute("Route", ROUTE).distribution_id

    # gw-3 has applied its push and not acked yet (gw-1 and gw-2 have, and gw-3's send
    # stored that): the leader dies now.
    wait_until(lambda: len(seen.fleet.applied["gw-3"]) == 1, what="gw-3 applied")
    killed = time.time()
    a.kill(signal.SIGKILL)

    took_over = seen.events.wait_for(
        lambda e: isinstance(e, OrchestratorLeader) and (e.replica_id, e.role) == ("b", "leader"),
        timeout=LEASE_S + 5,
    )
    elapsed = took_over.ts.timestamp() - killed
    assert 0 < elapsed <= LEASE_S + 1, elapsed
    print(f"b took over {elapsed:.2f}s after the kill (lease {LEASE_S:g}s)")
    assert finished(seen.events, dist_id, timeout=15).details["status"] == "completed"

    record = seen.record(dist_id)
    assert (record.status, record.version) == ("completed", 1)
    assert sorted(record.successful_gateways) == GATEWAYS
    assert stored(seen.bus, seen.fleet.prefix, dist_id).status == "completed"
    # Every gateway applied version 1 once; only gw-3, in flight at the kill, was sent
    # it twice (the same attempt), first by a's epoch then by b's.
    assert applied_versions(seen.fleet) == {gw: [1] for gw in GATEWAYS}
    epochs = pushes(seen.fleet, dist_id)
    assert {gw: len(e) for gw, e in epochs.items()} == {**dict.fromkeys(GATEWAYS, 1), "gw-3": 2}
    assert [p.attempt for _, p in seen.fleet.agents["gw-3"].received] == [1, 1]
    a_epoch, b_epoch = epochs["gw-3"]
    assert a_epoch is not None
    assert b_epoch is not None
    assert b_epoch > a_epoch
    assert epochs["gw-1"] == epochs["gw-2"] == [a_epoch]
    assert all(epochs[gw] == [b_epoch] for gw in ("gw-4", "gw-5", "gw-6"))
    [resumed] = steps(seen.events, dist_id, "resumed")
    assert resumed.details["resent"] == ["gw-3"]

    # The new leader goes on with the stored counter.
    second = seen.client.distribute("Route", {"routes": []}).distribution_id
    assert finished(seen.events, second, timeout=15).details["status"] == "completed"
    assert seen.record(second).version == 2
    assert applied_versions(seen.fleet) == {gw: [1, 2] for gw in GATEWAYS}


def leaders_at_once(events: list[Event]) -> list[str]:
    """From the replicas' own reports (orchestrator.started, then orchestrator.leader at
    each change, each stamped by the replica's clock): every moment a replica reported
    leading while another's last report was leading too."""
    role: dict[str, str] = {}
    overlaps = []
    reports = [e for e in events if isinstance(e, OrchestratorStarted | OrchestratorLeader)]
    for event in sorted(reports, key=lambda e: e.ts):
        assert event.replica_id is not None
        assert event.role is not None
        if event.role == "leader":
            others = [r for r, was in role.items() if was == "leader" and r != event.replica_id]
            if others:
                overlaps.append(f"{event.ts.isoformat()}: {event.replica_id} while {others}")
        role[event.replica_id] = event.role
    return overlaps


def stored_after_election(bus: Bus, prefix: str, dist_id: str) -> Distribution:
    """`stored`, asked again while the bucket's stream elects a new leader after a node's
    loss (4-9 s with no answer)."""
    errors = (nats.errors.TimeoutError, KvError)
    return retrying(lambda: stored(bus, prefix, dist_id), 20.0, errors)


@pytest.mark.slow
def test_a_nats_node_killed_mid_distribution_loses_nothing_and_makes_no_two_leaders(
    nats_cluster: NatsCluster,
    replica: ReplicaFactory,
    observe: Callable[[str], Observer],
    prefix: str,
) -> None:
    replica("a")
    replica("b")
    # The node to kill leads the distributions bucket: the stream the records are
    # written to. The test's own connection is on the two others.
    victim = nats_cluster.stream_leader(f"KV_{bucket_name(prefix, 'distributions')}")
    survivors = ",".join(url for i, url in enumerate(nats_cluster.urls) if i != victim)
    seen = observe(survivors)
    wait_for_roles(seen.client, {"a": "leader", "b": "standby"})
    seen.gateways(*GATEWAYS)
    samples = LeaderSamples(survivors, prefix)
    dist_id = seen.client.distribute("Route", ROUTE).distribution_id

    wait_until(lambda: len(seen.fleet.applied["gw-2"]) == 1, what="gw-2 applied")
    nats_cluster.kill(victim)
    killed = time.monotonic()

    assert finished(seen.events, dist_id, timeout=40).details["status"] == "completed"
    took_s = time.monotonic() - killed
    record = seen.record(dist_id)
    assert record.status == "completed"
    assert sorted(record.successful_gateways) == GATEWAYS
    assert stored_after_election(seen.bus, prefix, dist_id).status == "completed"
    assert applied_versions(seen.fleet) == {gw: [1] for gw in GATEWAYS}

    # The events are stored through the outbox, acked by the stream, which may still be
    # electing its new leader when the distribution ends: each is retried until stored
    # (for audit.event_retry_ms, 30 s), and only one never stored is lost.
    wait_until(
        lambda: missing_events({dist_id: record}, seen.stored_events()) == [],
        timeout=35.0,
        what="every acked event stored",
        show=lambda: missing_events({dist_id: record}, seen.stored_events()),
    )
    events = seen.stored_events()
    overlaps = samples.stop()
    assert overlaps == [], overlaps
    assert leaders_at_once(events) == []
    print(f"completed {took_s:.1f}s after the node kill; leaders seen: {sorted(samples.leaders())}")
