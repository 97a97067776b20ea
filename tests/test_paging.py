"""Paging of `P.api.gateways` and `P.api.distributions.list` (actors/paging.py), pure."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors.paging import (
    BadCursor,
    distributions_page,
    encode_cursor,
    gateways_page,
    take_page,
)
from gatefleet.output import read_gateways, read_pages
from schemas.api import (
    DISTRIBUTIONS_DEFAULT_LIMIT,
    GATEWAYS_DEFAULT_LIMIT,
    GATEWAYS_MAX_LIMIT,
    Distribution,
    DistributionListRequest,
    GatewaySnapshot,
    GatewaysReply,
    GatewaysRequest,
)
from schemas.codec import decode, encode
from schemas.types import GatewayStatus

NATS_MAX_PAYLOAD = 1024 * 1024
T0 = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
STATUSES: tuple[GatewayStatus, ...] = ("healthy", "degraded", "down", "unknown")


def snapshot(gateway_id: str, region: str = "us-west", **fields: object) -> GatewaySnapshot:
    return msgspec.convert({"gateway_id": gateway_id, "region": region, **fields}, GatewaySnapshot)


def full_row(i: int) -> GatewaySnapshot:
    """A realistic row at its largest id: 64 chars, every field set, a few labels."""
    gateway_id = f"gw-{i:05d}-".ljust(64, "x")
    return GatewaySnapshot(
        gateway_id=gateway_id,
        region="ap-southeast-2",
        role="backup",
        backup_for=gateway_id[:-1] + "y",
        status=STATUSES[i % 4],
        score=87.123456789,
        cpu_percent=35.5123,
        memory_percent=61.0456,
        active_connections=123_456,
        max_connections=1_000_000,
        reported_latency_ms=12.3456789,
        probe_latency_ms=11.987654321,
        consecutive_failures=1,
        last_seq=1_234_567_890,
        last_seen=T0,
        heartbeats=9_876_543,
        config_versions={"Route": 1234, "RateLimit": 56, "Auth": 7},
        labels={"az": "ap-southeast-2a", "rack": "r-017", "tier": "edge"},
    )


def all_pages(table: list[GatewaySnapshot], request: GatewaysRequest) -> Iterator[GatewaysReply]:
    while True:
        page = gateways_page(table, request)
        yield page
        if page.next_cursor is None:
            return
        request = msgspec.structs.replace(request, cursor=page.next_cursor)


def ids(reply: GatewaysReply) -> list[str]:
    return [g.gateway_id for g in reply.gateways]


# Gateways ---------------------------------------------------------------------------------


def test_1200_gateways_in_three_pages_every_id_once_in_order() -> None:
    table = [snapshot(f"edge-{i:04d}") for i in range(1200)]
    table.reverse()  # the table's order is not the page order
    pages = list(all_pages(table, GatewaysRequest(limit=500)))
    assert [len(p.gateways) for p in pages] == [500, 500, 200]
    assert [p.next_cursor is None for p in pages] == [False, False, True]
    seen = [gateway_id for page in pages for gateway_id in ids(page)]
    assert seen == sorted(g.gateway_id for g in table)


def test_an_empty_request_is_the_first_page_of_the_default_size() -> None:
    table = [snapshot(f"edge-{i:04d}") for i in range(GATEWAYS_DEFAULT_LIMIT + 1)]
    request = decode(b"{}", GatewaysRequest)
    first = gateways_page(table, request)
    assert len(first.gateways) == GATEWAYS_DEFAULT_LIMIT
    assert first.next_cursor is not None
    rest = gateways_page(table, GatewaysRequest(cursor=first.next_cursor))
    assert ids(rest) == [f"edge-{GATEWAYS_DEFAULT_LIMIT:04d}"]
    assert rest.next_cursor is None


def test_exactly_limit_rows_is_the_last_page() -> None:
    table = [snapshot(f"edge-{i}") for i in range(3)]
    assert gateways_page(table, GatewaysRequest(limit=3)).next_cursor is None
    assert gateways_page([], GatewaysRequest()) == GatewaysReply(gateways=[], next_cursor=None)
    assert gateways_page(table, GatewaysRequest(cursor="")).gateways == sorted(
        table, key=lambda g: g.gateway_id
    )


def test_filters_by_status_and_region_apply_to_every_page() -> None:
    table = [
        snapshot(f"edge-{i:03d}", ("us-west", "eu-west")[i % 2], status=STATUSES[i % 4])
        for i in range(100)
    ]
    rows = [
        g
        for page in all_pages(table, GatewaysRequest(status="healthy", region="us-west", limit=7))
        for g in page.gateways
    ]
    assert [g.gateway_id for g in rows] == [f"edge-{i:03d}" for i in range(0, 100, 4)]
    eu = [
        g
        for page in all_pages(table, GatewaysRequest(region="eu-west", limit=10))
        for g in page.gateways
    ]
    assert len(eu) == 50
    assert {g.region for g in eu} == {"eu-west"}
    assert gateways_page(table, GatewaysRequest(region="nowhere")).gateways == []


def test_a_cursor_stays_valid_when_its_gateway_leaves_and_others_come() -> None:
    table = {f"edge-{i:02d}": snapshot(f"edge-{i:02d}") for i in range(10)}
    first = gateways_page(table.values(), GatewaysRequest(limit=4))
    assert ids(first) == ["edge-00", "edge-01", "edge-02", "edge-03"]
    del table["edge-03"]  # the cursor's own gateway
    del table["edge-01"]  # one already seen
    table["edge-00a"] = snapshot("edge-00a")  # before the cursor: not seen by this pass
    table["edge-05a"] = snapshot("edge-05a")  # after it: seen
    second = gateways_page(table.values(), GatewaysRequest(limit=4, cursor=first.next_cursor))
    assert ids(second) == ["edge-04", "edge-05", "edge-05a", "edge-06"]


def test_the_cursor_is_opaque_base64url_of_the_last_key() -> None:
    table = [snapshot("edge-1"), snapshot("edge-2")]
    cursor = gateways_page(table, GatewaysRequest(limit=1)).next_cursor
    assert cursor == encode_cursor("gw", "edge-1")
    assert cursor is not None
    assert msgspec.json.decode(base64.urlsafe_b64decode(cursor + "==")) == ["gw", "edge-1"]
    assert "=" not in cursor


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "e30",  # {}
        encode_cursor("gw", "bad id with spaces"),
        encode_cursor("gw"),
        encode_cursor("dist", T0, "dist-1"),  # the other list's
        "%%%",
    ],
)
def test_a_cursor_that_is_not_ours_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        gateways_page([snapshot("edge-1")], GatewaysRequest(cursor=cursor))


def test_limit_is_checked_when_decoding() -> None:
    for body in (b'{"limit": 0}', b'{"limit": 1001}', b'{"limit": "5"}', b'{"status": "ok"}'):
        with pytest.raises(msgspec.ValidationError):
            decode(body, GatewaysRequest)
    assert decode(b'{"limit": 1000, "cursor": null}', GatewaysRequest).limit == GATEWAYS_MAX_LIMIT
    for body in (b'{"limit": 0}', b'{"limit": 1001}', b'{"status": "done"}'):
        with pytest.raises(msgspec.ValidationError):
            decode(body, DistributionListRequest)


def test_a_page_is_cut_short_before_max_bytes_and_paging_still_sees_every_row() -> None:
    labels = {f"k{n:02d}": "v" * 200 for n in range(64)}  # the largest a heartbeat allows
    table = [snapshot(f"edge-{i:03d}", labels=labels) for i in range(300)]
    row_bytes = len(encode(table[0]))
    assert row_bytes > 13_000
    first = gateways_page(table, GatewaysRequest(limit=1000))
    assert 0 < len(first.gateways) < 300
    assert len(encode(first)) < NATS_MAX_PAYLOAD
    assert first.next_cursor is not None
    seen = [g for page in all_pages(table, GatewaysRequest(limit=1000)) for g in page.gateways]
    assert [g.gateway_id for g in seen] == [g.gateway_id for g in table]


def test_one_row_over_max_bytes_is_still_returned_alone() -> None:
    rows, more = take_page(["a" * 50, "b" * 50], str, after=None, limit=10, max_bytes=10)
    assert (rows, more) == (["a" * 50], True)


def test_a_full_page_of_10000_gateways_stays_well_under_1_mib() -> None:
    table = [full_row(i) for i in range(10_000)]
    row = len(encode(table[0]))
    assert 550 < row < 800, row
    first = gateways_page(table, GatewaysRequest(limit=GATEWAYS_MAX_LIMIT))
    assert len(first.gateways) == GATEWAYS_MAX_LIMIT  # not cut by bytes
    size = len(encode(first))
    assert size < 0.75 * NATS_MAX_PAYLOAD, size
    default = gateways_page(table, GatewaysRequest())
    assert len(encode(default)) < 0.4 * NATS_MAX_PAYLOAD
    pages = list(all_pages(table, GatewaysRequest(limit=GATEWAYS_MAX_LIMIT)))
    assert len(pages) == 10
    assert sum(len(p.gateways) for p in pages) == 10_000


# Distributions ----------------------------------------------------------------------------


def record(n: int, *, minutes: int | None = None, **fields: object) -> Distribution:
    values: dict[str, object] = {
        "id": f"dist-{n:04d}",
        "status": "completed",
        "config_type": "Route",
        "version": n + 1,
        "target_gateways": [],
        "successful_gateways": [],
        "failed_gateways": [],
        "gateways": {},
        "created_at": T0 + timedelta(minutes=n if minutes is None else minutes),
    }
    values.update(fields)
    return msgspec.convert(values, Distribution)


def all_distribution_pages(
    records: list[Distribution], request: DistributionListRequest
) -> list[Distribution]:
    rows: list[Distribution] = []
    while True:
        page = distributions_page(records, request)
        rows += page.distributions
        if page.next_cursor is None:
            return rows
        request = msgspec.structs.replace(request, cursor=page.next_cursor)


def test_distributions_page_oldest_first_ties_broken_by_id() -> None:
    # Some share a created_at: the cursor must hold the id too.
    records = [record(n, minutes=n // 3) for n in range(250)]
    records.reverse()
    first = distributions_page(records, DistributionListRequest())
    assert len(first.distributions) == DISTRIBUTIONS_DEFAULT_LIMIT
    rows = all_distribution_pages(records, DistributionListRequest(limit=7))
    assert [r.id for r in rows] == [f"dist-{n:04d}" for n in range(250)]


def test_old_requests_still_read_the_first_page() -> None:
    records = [record(0), record(1, status="in_progress")]
    for body in (b"{}", b'{"include_completed": true}', b""):
        request = decode(body or b"{}", DistributionListRequest)
        reply = distributions_page(records, request)
        assert [r.id for r in reply.distributions] == ["dist-0000", "dist-0001"]
        assert reply.next_cursor is None
    request = decode(b'{"include_completed": false}', DistributionListRequest)
    assert [r.id for r in distributions_page(records, request).distributions] == ["dist-0001"]


def test_distribution_filters() -> None:
    statuses = ("pending", "in_progress", "completed", "partially_failed", "failed")
    records = [
        record(n, status=statuses[n % 5], config_type=("Route", "Auth")[n % 2]) for n in range(40)
    ]

    def listed(**fields: object) -> list[int]:
        request = msgspec.convert({"limit": 3, **fields}, DistributionListRequest)
        return [int(r.id[5:]) for r in all_distribution_pages(records, request)]

    assert listed(status="failed") == [n for n in range(40) if n % 5 == 4]
    assert listed(config_type="Auth") == [n for n in range(40) if n % 2]
    assert listed(status="completed", config_type="Route") == [n for n in range(40) if n % 10 == 2]
    assert listed(include_completed=False) == [n for n in range(40) if n % 5 < 2]
    assert listed(include_completed=False, status="failed") == []


def test_distribution_cursor_keeps_its_place_when_records_change() -> None:
    records = {n: record(n) for n in range(10)}
    first = distributions_page(records.values(), DistributionListRequest(limit=5))
    del records[4]
    records[10] = record(10)
    second = distributions_page(
        records.values(), DistributionListRequest(limit=50, cursor=first.next_cursor)
    )
    assert [r.id for r in second.distributions] == [f"dist-{n:04d}" for n in range(5, 11)]


def test_a_large_distribution_page_is_cut_by_bytes() -> None:
    targets = [f"gw-{i:05d}-".ljust(64, "x") for i in range(2000)]  # ~200 KB per record
    big = [
        record(n, target_gateways=targets, gateways={t: {"state": "acked"} for t in targets})
        for n in range(20)
    ]
    first = distributions_page(big, DistributionListRequest(limit=20))
    assert 1 <= len(first.distributions) < 20
    assert len(encode(first)) < NATS_MAX_PAYLOAD
    assert [r.id for r in all_distribution_pages(big, DistributionListRequest())] == [
        r.id for r in big
    ]


@pytest.mark.parametrize(
    "cursor",
    [
        encode_cursor("gw", "edge-1"),
        encode_cursor("dist", "2026-11-28T07:00:00", "dist-1"),  # no time zone
        encode_cursor("dist", T0, "not-a-dist-id"),
        "garbage",
    ],
)
def test_a_bad_distribution_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(BadCursor):
        distributions_page([record(0)], DistributionListRequest(cursor=cursor))


# Reading every page (gatefleet gateways|distributions) ---------------------------------------


def test_reading_pages_shows_progress_on_stderr_only_once_it_is_slow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = [snapshot(f"edge-{i:02d}") for i in range(10)]
    pages = list(all_pages(table, GatewaysRequest(limit=4)))
    rows, cursor = read_pages(pages, lambda p: p.gateways, lambda p: p.next_cursor, "gateways")
    assert (len(rows), cursor) == (10, None)
    assert capsys.readouterr() == ("", "")
    everything = read_gateways(iter(pages))
    assert everything == GatewaysReply(gateways=sorted(table, key=lambda g: g.gateway_id))
    read_pages(pages, lambda p: p.gateways, lambda p: p.next_cursor, "gateways", quiet_s=0)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "gatefleet: read 4 gateways so far...",
        "gatefleet: read 8 gateways so far...",
    ]
    _, cursor = read_pages(pages[:2], lambda p: p.gateways, lambda p: p.next_cursor, "gateways")
    assert cursor == pages[1].next_cursor  # cut short: where it would go on
