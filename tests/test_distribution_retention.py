"""Retention of distributions (actors/retention.py): finished records past
`orchestrator.distribution_history` are deleted with their per-gateway states, the
contents of the last `orchestrator.config_history` versions of each type are kept, and
so is any content a gateway should run or an unfinished distribution pushes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors.retention import past_history, unneeded_contents
from bus.jetstream import KvStore, bucket_name
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient, NotFound
from schemas.api import Distribution
from tests import test_distribution
from tests.conftest import EventLog, wait_until
from tests.distribution_events import finished
from tests.test_distribution import ConfigFleet

fleet = test_distribution.fleet
run = test_distribution.run
T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


def record(n: int, status: str = "completed") -> Distribution:
    return msgspec.convert(
        {
            "id": f"dist-{n:02d}",
            "status": status,
            "config_type": "Route",
            "version": n,
            "target_gateways": [],
            "successful_gateways": [],
            "failed_gateways": [],
            "gateways": {},
            "created_at": T0 + timedelta(minutes=n % 5),  # not in id order
        },
        Distribution,
    )


def test_the_oldest_finished_records_past_the_history_go() -> None:
    records = [record(n, "in_progress" if n == 0 else "completed") for n in range(8)]
    old = past_history(records, keep=3)
    # Oldest first by created_at (n % 5 minutes), then id; the unfinished one stays.
    assert [r.id for r in old] == ["dist-05", "dist-01", "dist-06", "dist-02"]
    assert past_history(records, keep=10) == []


def test_contents_past_the_history_go_unless_needed() -> None:
    stored = [("Route", v) for v in range(1, 7)] + [("Acl", 1), ("Acl", 9)]
    unneeded = unneeded_contents(stored, keep=2, needed={("Route", 2)})
    assert unneeded == [("Route", 1), ("Route", 3), ("Route", 4)]


def stored_keys(bus: Bus, prefix: str) -> tuple[set[str], int]:
    """The live keys of the distributions bucket, and how many messages its stream holds
    (as many as keys when no delete marker is left behind)."""
    name = bucket_name(prefix, "distributions")
    keys = set(KvStore(bus, bus.run(bus.js.key_value(name)), name).entries())

    async def messages() -> int:
        return (await bus.js.stream_info(f"KV_{name}")).state.messages

    return keys, bus.run(messages())


def test_records_past_the_history_and_contents_nothing_needs_are_deleted(
    run: Callable[..., Orchestrator],
    fleet: ConfigFleet,
    client: GatefleetClient,
    event_log: EventLog,
    bus: Bus,
    prefix: str,
) -> None:
    silent, _, _ = fleet.add_many("gw-silent", "gw-1", "gw-2")
    silent.silent_config = True
    history = {"distribution_history": 3, "config_history": 2}
    orchestrator = run(distribution_ack_timeout_ms=60_000, **history)

    # In progress all along: never deleted, nor its content.
    waiting = client.distribute("Tls", {"v": 1}, ["gw-silent"]).distribution_id
    # gw-2 should run Acl v1 (its own desired version) while Acl goes on without it.
    done = [client.distribute("Acl", {"v": 1}, ["gw-2"]).distribution_id]
    done += [client.distribute("Acl", {"v": v}, ["gw-1"]).distribution_id for v in (2, 3, 4)]
    done += [client.distribute("Route", {"v": v}, ["gw-1"]).distribution_id for v in (1, 2)]
    for dist_id in done:
        finished(event_log, dist_id)

    def listed() -> list[str]:
        return [d.id for d in client.list_distributions().distributions]

    wait_until(lambda: listed() == [waiting, *done[-3:]], what="the newest 3 finished kept")
    for gone in done[:3]:
        with pytest.raises(NotFound):
            client.get_distribution(gone)
    keys, messages = stored_keys(bus, prefix)
    assert not any(gone in key for gone in done[:3] for key in keys)
    assert messages == len(keys)  # purged: no delete markers left behind
    assert {key for key in keys if key.startswith("content.")} == {
        "content.Tls.1",  # its distribution is unfinished
        "content.Acl.1",  # gw-2 should run it
        "content.Acl.3",
        "content.Acl.4",
        "content.Route.1",
        "content.Route.2",
    }
    status = client.status()
    assert (status.active_distributions, status.successfully_completed_distributions) == (1, 3)

    # A smaller history applies at the next start.
    orchestrator.stop()
    run(distribution_ack_timeout_ms=60_000, distribution_history=1, config_history=1)
    assert listed() == [waiting, done[-1]]
    keys, _ = stored_keys(bus, prefix)
    assert {key for key in keys if key.startswith("content.")} == {
        "content.Tls.1",
        "content.Acl.1",
        "content.Acl.4",
        "content.Route.2",
    }
