"""Sticky clients across replicas (issue 16): two orchestrators on one prefix and one
server, each answering `select-gateway`, give a sticky client the same gateway, follow
each other when it moves, and forget it after `load_balancing.sticky_ttl_s`.

A selection is put to one replica's load balancer exactly as its API lane does (a
`Request` told to the actor, answered on a reply subject), so that the test, not the
queue group, chooses who answers; one check goes through the queue group itself. Three
gateways stay up throughout (one is made unselectable by its load, not by a failure):
two orchestrators on one prefix would both fail over, which this test does not need.
"""

from __future__ import annotations

import itertools
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pykka
import pytest
from nats.js.errors import NoKeysError

from actors.load_balancer import LoadBalancerActor, StickyOf
from actors.messages import Request, TableStats
from bus.jetstream import STICKY_BUCKET, bucket_name
from bus.runtime import Bus, Inbound
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from schemas import endpoints as api
from schemas.api import SelectReply, SelectRequest
from schemas.codec import decode
from schemas.settings import Settings
from tests.conftest import SettingsFactory, wait_until
from tests.fleet import BUSY, Fleet, MutableMetrics

GATEWAYS = ("edge-a", "edge-b", "edge-c")


@dataclass
class Replica:
    orchestrator: Orchestrator
    load_balancer: pykka.ActorRef[Any]


def start_replica(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Replica:
    before = set(pykka.ActorRegistry.get_by_class(LoadBalancerActor))
    orchestrator = start_orchestrator(settings)
    [load_balancer] = set(pykka.ActorRegistry.get_by_class(LoadBalancerActor)) - before
    return Replica(orchestrator, load_balancer)


class Replies:
    """One reply subscription for the whole test, a subject of its own under it for each
    request (a reply to a subscription made just before was seen lost, 1 to 3 in 100)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.base = f"_INBOX.sticky-test.{uuid.uuid4().hex}"
        self._replies: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._count = itertools.count()
        bus.subscribe(f"{self.base}.*", self._replies.put)

    def select_on(self, replica: Replica, client_id: str) -> SelectReply:
        """`select-gateway` answered by this replica."""
        reply = f"{self.base}.{next(self._count)}"
        body = SelectRequest(client_id=client_id)
        replica.load_balancer.tell(Request(endpoint=api.SELECT_GATEWAY, body=body, reply=reply))
        answer = self._replies.get(timeout=5.0)
        assert answer.subject == reply
        return decode(answer.data, SelectReply)


def sticky_of(replica: Replica, client_id: str) -> str | None:
    return cast("str | None", replica.load_balancer.ask(StickyOf(client_id), timeout=5.0))


def bucket_keys(bus: Bus, prefix: str) -> list[str]:
    async def keys() -> list[str]:
        kv = await bus.js.key_value(bucket_name(prefix, STICKY_BUCKET))
        try:
            return list(await kv.keys())
        except NoKeysError:
            return []

    return bus.run(keys())


def healthy(replicas: tuple[Replica, ...], count: int) -> None:
    """Waits until every replica has `count` healthy gateways."""

    def on(replica: Replica) -> int:
        stats = cast("tuple[int, int, int]", replica.load_balancer.ask(TableStats(), timeout=5))
        return stats[2]

    wait_until(
        lambda: all(on(replica) == count for replica in replicas),
        what=f"{count} healthy everywhere",
        show=lambda: [on(replica) for replica in replicas],
    )


def knows(replica: Replica, client_id: str, gateway_id: str | None) -> None:
    """Waits until the replica's copy gives the client that gateway."""
    wait_until(
        lambda: sticky_of(replica, client_id) == gateway_id,
        what=f"{client_id} on {gateway_id} here",
        show=lambda: sticky_of(replica, client_id),
    )


@pytest.fixture
def replies(bus: Bus) -> Replies:
    return Replies(bus)


@pytest.fixture
def metrics() -> dict[str, MutableMetrics]:
    return {gateway_id: MutableMetrics() for gateway_id in GATEWAYS}


@pytest.fixture
def replicas(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    metrics: dict[str, MutableMetrics],
    request: pytest.FixtureRequest,
) -> tuple[Replica, Replica]:
    ttl_s = getattr(request, "param", 3600.0)
    settings = make_settings(
        health={"heartbeat_interval_ms": 100},
        load_balancing={"random_seed": 1, "sticky_ttl_s": ttl_s},
    )
    a = start_replica(settings, start_orchestrator)
    b = start_replica(settings, start_orchestrator)
    for gateway_id in GATEWAYS:
        fleet.add(gateway_id, metrics=metrics[gateway_id])
    healthy((a, b), len(GATEWAYS))
    return a, b


def test_any_replica_gives_a_sticky_client_the_same_gateway(
    replicas: tuple[Replica, Replica], replies: Replies, client: GatefleetClient
) -> None:
    a, b = replicas
    # Any id a client may send: dots, wildcards, spaces, 256 characters of 4 UTF-8 bytes.
    clients = [*(f"client-{n}" for n in range(6)), "a.b *>/ c", "😀" * 256]
    # RoundRobin on A spreads them over the three gateways.
    assigned = {c: replies.select_on(a, c).gateway_id for c in clients}
    assert set(assigned.values()) == set(GATEWAYS)
    for c in clients:
        knows(b, c, assigned[c])
    # Asked in the other order, B's own rotation would answer otherwise.
    for c in reversed(clients):
        reply = replies.select_on(b, c)
        assert (reply.gateway_id, reply.reason) == (assigned[c], "sticky client")
    # Through the queue group, whichever replica answers.
    answers = {
        c: {client.select_optimal_gateway(client_id=c).gateway_id for _ in range(8)}
        for c in clients
    }
    assert answers == {c: {assigned[c]} for c in clients}


def test_a_client_moves_when_its_gateway_is_not_selectable_and_the_other_replica_follows(
    replicas: tuple[Replica, Replica], replies: Replies, metrics: dict[str, MutableMetrics]
) -> None:
    a, b = replicas
    first = replies.select_on(a, "alice").gateway_id
    assert first is not None
    knows(b, "alice", first)
    metrics[first].metrics = BUSY  # still beating, but scored below the threshold
    healthy((a, b), 2)
    moved = replies.select_on(b, "alice")
    assert moved.gateway_id not in (None, first)
    assert moved.reason != "sticky client"
    knows(a, "alice", moved.gateway_id)
    again = replies.select_on(a, "alice")
    assert (again.gateway_id, again.reason) == (moved.gateway_id, "sticky client")
    # Back to health, it does not take the client back: the client stays where it is.
    metrics[first].metrics = MutableMetrics().metrics
    healthy((a, b), 3)
    assert {replies.select_on(r, "alice").gateway_id for r in (a, b, a, b)} == {moved.gateway_id}


@pytest.mark.parametrize("replicas", [2.0], indirect=True)
def test_an_assignment_lives_while_its_client_comes_and_expires_after_the_ttl(
    replicas: tuple[Replica, Replica], replies: Replies, bus: Bus, prefix: str
) -> None:
    a, b = replicas
    gateway_id = replies.select_on(a, "alice").gateway_id
    knows(b, "alice", gateway_id)
    # Coming back every 0.25 s for twice the TTL: refreshed, never forgotten, anywhere.
    until = time.monotonic() + 4.0
    while time.monotonic() < until:
        reply = replies.select_on(a, "alice")
        assert (reply.gateway_id, reply.reason) == (gateway_id, "sticky client")
        time.sleep(0.25)
    assert sticky_of(b, "alice") == gateway_id
    # Gone quiet: forgotten by every replica, and by the bucket, once the TTL is over.
    quiet = time.monotonic()
    knows(a, "alice", None)
    knows(b, "alice", None)
    assert time.monotonic() - quiet > 2.0 * 0.9 - 0.25  # not before its time
    wait_until(
        lambda: not bucket_keys(bus, prefix),
        what="the bucket forgot it",
        show=lambda: bucket_keys(bus, prefix),
    )
    reply = replies.select_on(b, "alice")
    assert reply.reason != "sticky client"
