"""A distribution to a large fleet: its per-gateway states paged in `distributions.get` and
`distributions.list` (actors/paging.py, pure), and stored in chunks that a restart reads
back (actors/distribution_store.py, on the test's real nats-server)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from nats.js.api import KeyValueConfig

from actors.distribution_machine import DistributionMachine, Send, clip, new_distribution
from actors.distribution_store import DistributionStore
from actors.paging import BadCursor, distribution_page, distributions_page, encode_cursor
from bus.jetstream import KvStore, bucket_name
from bus.runtime import Bus
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.client import BadRequest, GatefleetClient, merge_pages
from schemas.api import (
    GATEWAY_STATES_DEFAULT_LIMIT,
    Distribution,
    DistributionListRequest,
    DistributionPage,
    GatewayDelivery,
    GatewayDeliveryState,
)
from schemas.codec import encode
from schemas.settings import Settings
from schemas.stored import CHUNK_GATEWAYS, DistributionSpec
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.distribution_events import finished
from tests.fleet import Fleet

NATS_MAX_PAYLOAD = 1024 * 1024
T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


def gateway_ids(count: int) -> list[str]:
    return [f"gw-{n:06d}-".ljust(64, "x") for n in range(count)]


STATES: tuple[GatewayDeliveryState, ...] = (
    "pending",
    "sent",
    "retrying",
    "acked",
    "nacked",
    "failed",
)


def progressed(count: int, *, seed: int = 7, error: str = "no route to svc-a") -> Distribution:
    """A distribution part way through: every state, in a seeded mix."""
    rng = random.Random(seed)
    record = new_distribution(
        "dist-big", "Route", 3, targets=gateway_ids(count), unknown=[], created_at=T0
    )
    gateways = {}
    for gw in record.target_gateways:
        state = rng.choice(STATES)
        text = clip(error) if state in ("nacked", "failed") else None
        gateways[gw] = GatewayDelivery(state=state, attempts=int(state != "pending"), error=text)
    return msgspec.structs.replace(
        record,
        status="in_progress",
        gateways=gateways,
        successful_gateways=[gw for gw, d in gateways.items() if d.state == "acked"],
        failed_gateways=[gw for gw, d in gateways.items() if d.state in ("nacked", "failed")],
        batch=4,
    )


def every_page(record: Distribution, limit: int | None = None) -> list[DistributionPage]:
    pages = [distribution_page(record, limit=limit)]
    while pages[-1].next_cursor is not None:
        pages.append(distribution_page(record, limit=limit, cursor=pages[-1].next_cursor))
    return pages


# Paging ----------------------------------------------------------------------------------


def test_a_distribution_is_answered_with_its_states_paged_in_target_order() -> None:
    record = progressed(2_500)
    first = distribution_page(record)
    assert first.target_gateways == record.target_gateways[:GATEWAY_STATES_DEFAULT_LIMIT]
    assert first.gateways == {gw: record.gateways[gw] for gw in first.target_gateways}
    assert set(first.successful_gateways) == {
        gw for gw in first.target_gateways if record.gateways[gw].state == "acked"
    }
    # The counts are of every target, on every page.
    assert first.target_count == 2_500
    assert first.successful_count == len(record.successful_gateways)
    assert first.failed_count == len(record.failed_gateways)
    assert first.state_counts == dict(Counter(d.state for d in record.gateways.values()))
    assert (first.status, first.batch, first.version) == ("in_progress", 4, 3)

    pages = every_page(record, limit=1000)
    assert [len(p.target_gateways) for p in pages] == [1000, 1000, 500]
    assert pages[-1].next_cursor is None
    whole = merge_pages(pages)
    assert whole.target_gateways == record.target_gateways
    assert whole.gateways == record.gateways
    assert whole.successful_gateways == record.successful_gateways
    assert whole.failed_gateways == record.failed_gateways


def test_a_small_distribution_reads_as_before_in_one_page() -> None:
    record = progressed(20)
    page = distribution_page(record)
    assert page.next_cursor is None
    fields = msgspec.structs.asdict(record)
    assert {name: getattr(page, name) for name in fields} == fields


def test_every_page_stays_under_the_payload_limit_even_with_long_errors() -> None:
    # Errors of control characters (6 bytes each in JSON), clipped to 1,000 characters.
    record = progressed(3_000, error="\x01" * 5_000)
    pages = every_page(record, limit=1000)
    assert len(pages) > 3  # cut short by bytes, not by the limit
    assert max(len(encode(p)) for p in pages) < NATS_MAX_PAYLOAD
    assert merge_pages(pages).target_gateways == record.target_gateways


def test_list_rows_carry_the_first_page_and_the_counts() -> None:
    big, small = progressed(5_000), progressed(3, seed=8)
    small = msgspec.structs.replace(small, id="dist-small", created_at=T0.replace(hour=8))
    reply = distributions_page([big, small], DistributionListRequest())
    assert [(r.id, r.target_count) for r in reply.distributions] == [
        ("dist-big", 5_000),
        ("dist-small", 3),
    ]
    assert len(reply.distributions[0].target_gateways) == GATEWAY_STATES_DEFAULT_LIMIT
    assert reply.distributions[0].next_cursor == distribution_page(big).next_cursor
    assert reply.distributions[1].gateways == small.gateways
    assert len(encode(reply)) < NATS_MAX_PAYLOAD


@pytest.mark.parametrize(
    "cursor",
    [
        "not-base64!",
        encode_cursor("dgw", "dist-other", 10),  # another distribution's
        encode_cursor("dgw", "dist-big", -1),
        encode_cursor("gw", "edge-1"),  # the gateways list's
    ],
)
def test_a_bad_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        distribution_page(progressed(10), cursor=cursor)


def test_a_cursor_stays_valid_when_a_gateway_joins_at_the_end() -> None:
    record = progressed(600)
    first = distribution_page(record)
    joined = msgspec.structs.replace(
        record,
        target_gateways=[*record.target_gateways, "late"],
        gateways={**record.gateways, "late": GatewayDelivery()},
    )
    second = distribution_page(joined, cursor=first.next_cursor)
    assert second.target_gateways == [*record.target_gateways[500:], "late"]


# Storing ---------------------------------------------------------------------------------


@pytest.fixture
def buckets(bus: Bus, prefix: str) -> tuple[KvStore, KvStore]:
    """The distributions and desired buckets, made as the orchestrator makes them."""

    async def make(name: str) -> KvStore:
        config = KeyValueConfig(bucket=bucket_name(prefix, name), history=1)
        return KvStore(bus, await bus.js.create_key_value(config), config.bucket)

    return bus.run(make("distributions")), bus.run(make("desired"))


def test_a_distribution_to_20000_gateways_stores_in_bounded_values_and_resumes(
    buckets: tuple[KvStore, KvStore],
) -> None:
    """20,000 targets with 64-character ids: as one record (layout 2) that was 3.6 MB,
    over NATS's 1 MiB payload limit."""
    kv, desired = buckets
    store = DistributionStore(kv, desired)
    spec = DistributionSpec(config_type="Route", version=1, fleet_wide=True, created_at=T0)
    record = new_distribution(
        "dist-20k", "Route", 1, targets=gateway_ids(20_000), unknown=[], created_at=T0
    )
    assert len(encode(record)) > 3 * NATS_MAX_PAYLOAD
    started = time.perf_counter()
    store.create(record, spec, {"routes": []})
    stored_s = time.perf_counter() - started
    # Its actor starts it and sends the first batch: only that chunk is written again.
    machine = DistributionMachine(record, batch_size=150, retry_count=1, retry_delay_s=1.0)
    sent = [c.gateway_id for c in machine.start(T0) if isinstance(c, Send)]
    positions = {gw: n for n, gw in enumerate(record.target_gateways)}
    store.put_progress(machine.record, [positions[gw] for gw in machine.changed])

    values = kv.entries()
    assert sum(".gw." in key for key in values) == 20_000 // CHUNK_GATEWAYS
    assert max(len(value) for value in values.values()) < 20 * 1024
    started = time.perf_counter()
    loaded = DistributionStore(kv, desired).load().records["dist-20k"]
    loaded_s = time.perf_counter() - started
    assert loaded == machine.record
    resumed = DistributionMachine(loaded, batch_size=150, retry_count=1, retry_delay_s=1.0)
    assert [c.gateway_id for c in resumed.resume(T0) if isinstance(c, Send)] == sent
    print(
        f"20,000 gateways: stored in {stored_s * 1000:.0f} ms, loaded in {loaded_s * 1000:.0f} ms"
    )


# End to end ------------------------------------------------------------------------------


def test_a_distribution_to_1200_gateways_pages_over_nats_in_the_cli_and_after_a_restart(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
    client: GatefleetClient,
    event_log: EventLog,
    tmp_path: Path,
    nats_server: EmbeddedServer,
) -> None:
    settings = make_settings(
        health={"heartbeat_interval_ms": 600_000},
        # Nothing answers the pushes: each fails at once (no responders), for good.
        orchestrator={"distribution_batch_size": 1200, "distribution_retry_count": 0},
    )
    orchestrator = start_orchestrator(settings)
    ids = [f"edge-{i:04d}" for i in range(1200)]
    Fleet(bus, prefix).beat_once(ids)
    wait_until(lambda: client.status().gateways_healthy == 1200, timeout=30, what="1200 healthy")
    dist_id = client.distribute("Route", {"routes": []}).distribution_id
    assert finished(event_log, dist_id, timeout=20).details["status"] == "failed"

    first = client.get_distribution(dist_id)
    assert (len(first.target_gateways), first.target_count) == (GATEWAY_STATES_DEFAULT_LIMIT, 1200)
    assert (first.failed_count, first.state_counts) == (1200, {"failed": 1200})
    assert first.next_cursor is not None
    pages = list(client.distribution_gateway_pages(dist_id))
    assert [len(p.target_gateways) for p in pages] == [1000, 200]
    whole = client.whole_distribution(dist_id)
    assert whole.target_gateways == whole.failed_gateways == ids
    assert whole.gateways["edge-0042"].error == "no ack after 1 attempts: no_responders"
    with pytest.raises(BadRequest):
        client.get_distribution(dist_id, cursor="garbage")

    config = tmp_path / "client.toml"
    config.write_text(f'[bus]\nurl = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n')
    shown = CliRunner().invoke(main, ["distributions", dist_id, "--json", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["target_gateways"] == ids

    orchestrator.stop()
    start_orchestrator(settings)
    assert client.whole_distribution(dist_id) == whole
