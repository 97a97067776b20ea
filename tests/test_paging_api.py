"""Paging of `P.api.gateways` and `P.api.distributions.list` end to end: over NATS with the
Python client, through `gatefleet gateways|distributions`, and over HTTP.

Many gateways are registered cheaply: one heartbeat each from the test bus, no agent, with
a heartbeat interval long enough that none goes down during a test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result

from bus.runtime import Bus
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.cli import main
from gatefleet.client import BadRequest, GatefleetClient
from gatefleet.http import HttpApi
from schemas.api import (
    GATEWAYS_DEFAULT_LIMIT,
    DistributionListReply,
    Empty,
    GatewaysReply,
)
from schemas.settings import Settings
from schemas.wire import Goodbye
from tests.conftest import SettingsFactory, wait_until
from tests.fleet import BUSY, Fleet
from tests.test_http import API, Http

MANY = 1200
StartFleet = Callable[..., Fleet]


@pytest.fixture
def start_fleet(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
) -> StartFleet:
    """Starts gatefleet, then registers `healthy` idle gateways `edge-NNNN` in us-west and
    `degraded` busy ones `busy-NNN` in eu-west; `listed` more are known from the config."""

    def start(healthy: int, degraded: int = 0, listed: int = 0) -> Fleet:
        entries = [{"id": f"listed-{i:03d}", "region": "ap-south"} for i in range(listed)]
        start_orchestrator(
            make_settings(health={"heartbeat_interval_ms": 600_000}, gateways=entries)
        )
        fleet = Fleet(bus, prefix)
        fleet.beat_once(f"edge-{i:04d}" for i in range(healthy))
        fleet.beat_once((f"busy-{i:03d}" for i in range(degraded)), "eu-west", BUSY)
        wait_until(
            lambda: (
                (fleet.status().gateways_by_status.get("degraded", 0), healthy_count(fleet))
                == (degraded, healthy)
            ),
            timeout=60,
            what="every gateway registered",
            show=fleet.status,
        )
        return fleet

    return start


def healthy_count(fleet: Fleet) -> int:
    return fleet.status().gateways_by_status.get("healthy", 0)


def edge_ids(n: int) -> list[str]:
    return [f"edge-{i:04d}" for i in range(n)]


# Over NATS ----------------------------------------------------------------------------------


def test_1200_gateways_in_pages_of_500(start_fleet: StartFleet, client: GatefleetClient) -> None:
    start_fleet(MANY)
    pages = []
    cursor = None
    while True:
        page = client.gateways(limit=500, cursor=cursor)
        pages.append(page)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [len(p.gateways) for p in pages] == [500, 500, 200]
    assert [g.gateway_id for p in pages for g in p.gateways] == edge_ids(MANY)
    # The iterator goes through the same pages (of the largest size).
    rows = [g.gateway_id for p in client.gateway_pages() for g in p.gateways]
    assert rows == edge_ids(MANY)


def test_old_requests_get_the_first_page(
    start_fleet: StartFleet, bus: Bus, prefix: str, client: GatefleetClient
) -> None:
    fleet = start_fleet(GATEWAYS_DEFAULT_LIMIT + 10)
    for body in (b"{}", b"", b'{"unknown": 1}'):
        raw = fleet.raw_call("gateways", body)
        assert len(raw["gateways"]) == GATEWAYS_DEFAULT_LIMIT
        assert isinstance(raw["next_cursor"], str)
    assert len(fleet.call("gateways", Empty(), GatewaysReply).gateways) == GATEWAYS_DEFAULT_LIMIT
    last = client.gateways(cursor=raw["next_cursor"])
    assert [g.gateway_id for g in last.gateways] == edge_ids(GATEWAYS_DEFAULT_LIMIT + 10)[-10:]
    assert last.next_cursor is None
    nulls = fleet.raw_call("gateways", b'{"limit": null, "cursor": null, "status": null}')
    assert len(nulls["gateways"]) == GATEWAYS_DEFAULT_LIMIT


def test_filters_by_status_and_region(start_fleet: StartFleet, client: GatefleetClient) -> None:
    start_fleet(30, degraded=20, listed=5)

    def listed(**filters: str) -> list[str]:
        pages = client.gateway_pages(**filters)  # type: ignore[arg-type]
        return [g.gateway_id for p in pages for g in p.gateways]

    assert listed(status="healthy") == edge_ids(30)
    assert listed(status="degraded") == [f"busy-{i:03d}" for i in range(20)]
    assert listed(region="eu-west") == [f"busy-{i:03d}" for i in range(20)]
    assert listed(status="unknown", region="ap-south") == [f"listed-{i:03d}" for i in range(5)]
    assert listed(status="healthy", region="eu-west") == []
    assert listed(status="down") == []
    # The filter holds on every page.
    page = client.gateways(status="degraded", limit=15)
    rest = client.gateways(status="degraded", limit=15, cursor=page.next_cursor)
    assert [g.status for g in page.gateways + rest.gateways] == ["degraded"] * 20
    assert rest.next_cursor is None


def test_a_cursor_from_a_gateway_that_left_still_works(
    start_fleet: StartFleet, bus: Bus, prefix: str, client: GatefleetClient
) -> None:
    fleet = start_fleet(10)
    first = client.gateways(limit=4)
    assert [g.gateway_id for g in first.gateways] == edge_ids(4)
    bus.publish(f"{prefix}.gw.edge-0003.goodbye", Goodbye(gateway_id="edge-0003"))
    wait_until(lambda: "edge-0003" not in fleet.gateways(), what="edge-0003 gone")
    second = client.gateways(limit=4, cursor=first.next_cursor)
    assert [g.gateway_id for g in second.gateways] == edge_ids(8)[4:]


@pytest.mark.parametrize(
    "body",
    [
        b'{"limit": 0}',
        b'{"limit": 1001}',
        b'{"limit": "ten"}',
        b'{"cursor": "garbage"}',
        b'{"cursor": 5}',
        b'{"status": "fine"}',
        b'{"region": ""}',
    ],
)
def test_bad_gateways_requests_get_bad_request(start_fleet: StartFleet, body: bytes) -> None:
    fleet = start_fleet(1)
    assert fleet.raw_call("gateways", body)["error"]["code"] == "bad_request"


def test_bad_distribution_list_requests_get_bad_request(
    start_fleet: StartFleet, client: GatefleetClient
) -> None:
    fleet = start_fleet(0)
    for body in (b'{"limit": 0}', b'{"limit": 1001}', b'{"cursor": "x"}', b'{"status": "ok"}'):
        assert fleet.raw_call("distributions.list", body)["error"]["code"] == "bad_request"
    gateway_cursor = client.gateways(limit=1).next_cursor  # None: no gateways; make one
    assert gateway_cursor is None
    fleet.beat_once(["edge-a", "edge-b"])
    wait_until(lambda: len(fleet.gateways()) == 2, what="two gateways")
    gateway_cursor = client.gateways(limit=1).next_cursor
    with pytest.raises(BadRequest, match="cursor"):
        client.list_distributions(cursor=gateway_cursor)


def test_distributions_page_and_filter(start_fleet: StartFleet, client: GatefleetClient) -> None:
    start_fleet(0)  # no gateways: each distribution completes at once ("no target gateways")
    created = []
    for n in range(7):
        created.append(client.distribute("Route", {"n": n}).distribution_id)
        if n % 3 == 0:
            created.append(client.distribute("Auth", {"n": n}).distribution_id)
    failed = client.distribute("Route", {}, ["nobody"]).distribution_id
    created.append(failed)
    wait_until(
        lambda: all(client.get_distribution(d).status in ("completed", "failed") for d in created),
        what="every distribution finished",
    )

    def listed(**fields: object) -> list[str]:
        rows = []
        cursor = None
        while True:
            page = client.list_distributions(limit=3, cursor=cursor, **fields)  # type: ignore[arg-type]
            assert len(page.distributions) <= 3
            rows += [d.id for d in page.distributions]
            cursor = page.next_cursor
            if cursor is None:
                return rows

    assert listed() == created  # oldest first, each once
    assert [d.id for p in client.distribution_pages() for d in p.distributions] == created
    auth = [d.id for d in client.list_distributions(config_type="Auth").distributions]
    assert len(auth) == 3
    assert listed(config_type="Auth") == auth
    assert listed(status="failed") == [failed]
    assert listed(include_completed=False) == []
    old = client.list_distributions()  # no paging fields: the first page, all of them here
    assert [d.id for d in old.distributions] == created
    assert old.next_cursor is None


# The command line ----------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, prefix: str, nats_server: EmbeddedServer) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(f'[bus]\nurl = "{nats_server.url}"\nsubject_prefix = "{prefix}"\n')
    return path


def run(config_file: Path, *args: str, input_: bytes | None = None) -> Result:
    result = CliRunner().invoke(main, [*args, "--config", str(config_file)], input=input_)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    return result


def test_cli_pages_through_every_gateway(start_fleet: StartFleet, config_file: Path) -> None:
    start_fleet(MANY, degraded=3)
    everything = json.loads(run(config_file, "gateways", "--json").stdout)
    assert [g["gateway_id"] for g in everything["gateways"]] == [
        *(f"busy-{i:03d}" for i in range(3)),
        *edge_ids(MANY),
    ]
    assert everything["next_cursor"] is None
    some = json.loads(run(config_file, "gateways", "--json", "--limit", "1100").stdout)
    assert len(some["gateways"]) == 1100
    assert some["next_cursor"] is not None  # where the listing would go on
    degraded = json.loads(run(config_file, "gateways", "--status", "degraded", "--json").stdout)
    assert [g["gateway_id"] for g in degraded["gateways"]] == ["busy-000", "busy-001", "busy-002"]
    region = run(config_file, "gateways", "--region", "eu-west").stdout
    assert "3 gateways" in region
    assert "edge-0000" not in region
    table = run(config_file, "gateways", "--limit", "5").stdout
    assert "5 gateways" in table
    assert "more follow" in table


def test_cli_distributions_filters_and_limit(
    start_fleet: StartFleet, config_file: Path, client: GatefleetClient
) -> None:
    start_fleet(0)
    ids = [
        json.loads(run(config_file, "distribute", kind, "--json", input_=b"{}").stdout)[
            "distribution_id"
        ]
        for kind in ("Route", "Auth", "Route")
    ]
    wait_until(
        lambda: {client.get_distribution(d).status for d in ids} == {"completed"},
        what="every distribution completed",
    )
    assert json.loads(run(config_file, "distributions", "--json").stdout)["distributions"] == []
    listed = json.loads(run(config_file, "distributions", "--all", "--json").stdout)
    assert [d["id"] for d in listed["distributions"]] == ids
    routes = json.loads(
        run(
            config_file, "distributions", "--type", "Route", "--status", "completed", "--json"
        ).stdout
    )
    assert [d["id"] for d in routes["distributions"]] == [ids[0], ids[2]]
    first = json.loads(run(config_file, "distributions", "--all", "--limit", "2", "--json").stdout)
    assert [d["id"] for d in first["distributions"]] == ids[:2]
    assert first["next_cursor"] is not None


# HTTP ------------------------------------------------------------------------------------------


@pytest.fixture
def http(start_fleet: StartFleet, prefix: str, nats_server: EmbeddedServer) -> Iterator[Http]:
    api = HttpApi()
    address = api.start(nats_server.url, prefix, "127.0.0.1", 0, "")
    yield Http(address)
    api.stop()


def test_http_query_string_pages_and_filters(
    start_fleet: StartFleet, http: Http, client: GatefleetClient
) -> None:
    start_fleet(250, degraded=5)
    seen: list[str] = []
    path = f"{API}/gateways?status=healthy&limit=100"
    cursor = None
    while True:
        response = http.get(path + (f"&cursor={cursor}" if cursor else ""))
        assert response.status == 200, response.body
        page = msgspec.json.decode(response.body, type=GatewaysReply)
        seen += [g.gateway_id for g in page.gateways]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == edge_ids(250)
    assert response.json()["next_cursor"] is None  # present, and null at the end
    eu = http.get(f"{API}/gateways?region=eu-west").json()
    assert [g["gateway_id"] for g in eu["gateways"]] == [f"busy-{i:03d}" for i in range(5)]
    assert len(http.get(f"{API}/gateways").json()["gateways"]) == 255  # no fields: page 1
    for query in ("limit=0", "limit=1001", "limit=many", "cursor=garbage", "status=fine"):
        response = http.get(f"{API}/gateways?{query}")
        assert response.status == 400, query
        assert response.error()[0] == "bad_request"

    # Targets unknown to gatefleet: each fails at once (the gateways here never ack).
    created = [client.distribute("Route", {}, ["nobody"]).distribution_id for _ in range(3)]
    wait_until(
        lambda: {client.get_distribution(d).status for d in created} == {"failed"},
        what="every distribution failed",
    )
    first = http.get(f"{API}/distributions?include_completed=true&limit=2&config_type=Route")
    listed = msgspec.json.decode(first.body, type=DistributionListReply)
    assert [d.id for d in listed.distributions] == created[:2]
    rest = http.get(f"{API}/distributions?limit=2&cursor={listed.next_cursor}").json()
    assert [d["id"] for d in rest["distributions"]] == created[2:]
    assert rest["next_cursor"] is None
    assert http.get(f"{API}/distributions?status=failed&limit=1").json()["next_cursor"]
    assert http.get(f"{API}/distributions?status=completed").json()["distributions"] == []
    assert http.get(f"{API}/distributions?limit=0").status == 400
