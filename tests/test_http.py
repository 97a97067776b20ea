"""The HTTP API end to end: a real orchestrator and gateway agents on the test server,
the HTTP API on its own bus, and aiohttp's client as a real HTTP client.

The happy paths run twice: with no token configured, and with one configured and sent.
"""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import aiohttp
import msgspec
import pykka
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.distributor import DistributorActor
from bus.edge import MAX_REQUEST_BYTES
from bus.runtime import Bus
from gatefleet.app import Orchestrator
from gatefleet.http import HttpApi
from schemas.api import (
    DistributeReply,
    Distribution,
    DistributionListReply,
    GatewaysReply,
    LoadBalancingConfig,
    SelectReply,
    StatusReply,
)
from schemas.events import GatewayStatusChanged
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet

API = "/api/v1/orchestration"


def without_lag(status: StatusReply) -> StatusReply:
    return msgspec.structs.replace(status, orchestrator_lag_ms=0.0, orchestrator_max_lag_ms=0.0)


TOKEN = "s3cret-token"  # noqa: S105 - a test token, not a secret
UNKNOWN_ID = "dist-00000000-0000-0000-0000-000000000000"
ROUTE = {"routes": [{"path": "/api", "upstream": "svc-a"}]}
# Every authenticated endpoint: (method, path, body).
ENDPOINTS = [
    ("GET", f"{API}/status", None),
    ("GET", f"{API}/gateways", None),
    ("GET", f"{API}/load-balancing", None),
    ("POST", f"{API}/load-balancing", b'{"strategy": "RoundRobin"}'),
    ("POST", f"{API}/select-gateway", b"{}"),
    ("POST", f"{API}/distribute", b'{"config_type": "Route", "config_data": {}}'),
    ("GET", f"{API}/distributions/{UNKNOWN_ID}", None),
    ("GET", f"{API}/distributions?include_completed=true", None),
    ("GET", "/metrics", None),
]


class Response(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    def error(self) -> tuple[str, str]:
        """(code, message) of an error body; fails the test if it is not one."""
        detail = self.json()["error"]
        assert set(detail) == {"code", "message"}, detail
        return detail["code"], detail["message"]


class Http:
    """A synchronous face on aiohttp's client: one session per call (tests are sync)."""

    def __init__(self, address: tuple[str, int], token: str = "") -> None:
        self.base = f"http://{address[0]}:{address[1]}"
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        sent = dict(headers or {})
        token = self.token if token is None else token
        if token:
            sent["Authorization"] = f"Bearer {token}"
        return asyncio.run(self._call(method, path, body, sent))

    async def _call(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> Response:
        # A stream, not raw bytes: aiohttp warns of raw bodies over 1 MiB.
        data = None if body is None else io.BytesIO(body)
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.base + path, data=data, headers=headers) as response,
        ):
            return Response(response.status, await response.read(), dict(response.headers))

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: bytes | None, **kwargs: Any) -> Response:
        return self.call("POST", path, body, **kwargs)


def metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for each sample of a Prometheus text page, as Prometheus's
    own text parser reads it (it raises on a syntax error)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


# Fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        health={"heartbeat_interval_ms": 100},
        orchestrator={"distribution_ack_timeout_ms": 500, "distribution_retry_delay_ms": 100},
        # Each test has its own stream on the shared server: reserve little disk for it.
        audit={"max_bytes": 16 * 1024 * 1024},
    )


@pytest.fixture
def gatefleet(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Orchestrator:
    return start_orchestrator(settings)


@pytest.fixture
def fleet(gatefleet: Orchestrator, bus: Bus, prefix: str, event_log: EventLog) -> Iterator[Fleet]:
    """Two healthy gateways in us-west."""
    fleet = Fleet(bus, prefix)
    for gateway_id in ("edge-a", "edge-b"):
        fleet.add(gateway_id, "us-west")
    for gateway_id in ("edge-a", "edge-b"):
        event_log.wait_for(
            lambda e, g=gateway_id: (  # type: ignore[misc]
                isinstance(e, GatewayStatusChanged)
                and e.gateway_id == g
                and e.new_status == "healthy"
            )
        )
    yield fleet
    fleet.close()


@pytest.fixture
def serve(gatefleet: Orchestrator, prefix: str) -> Iterator[Callable[[str], Http]]:
    """Starts the HTTP API on a free port with a token ("" for none); stopped after the test."""
    started: list[HttpApi] = []

    def start(token: str) -> Http:
        api = HttpApi()
        started.append(api)
        address = api.start(gatefleet.url, prefix, "127.0.0.1", 0, token)
        assert address[0] == "127.0.0.1"
        assert address[1] > 0
        return Http(address, token)

    yield start
    for api in started:
        api.stop()


@pytest.fixture(params=["", TOKEN], ids=["no-token", "token"])
def http(request: pytest.FixtureRequest, serve: Callable[[str], Http], fleet: Fleet) -> Http:
    """The API with two healthy gateways; with no token, or with one that the client sends."""
    token: str = request.param
    return serve(token)


# Every endpoint, happy paths ----------------------------------------------------------------


def test_status_and_gateways(http: Http, fleet: Fleet) -> None:
    response = http.get(f"{API}/status")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    status = msgspec.json.decode(response.body, type=StatusReply)
    assert (status.status, status.gateways_managed, status.gateways_healthy) == ("ok", 2, 2)
    # The same body as over NATS, but for the lag figures, measured anew at each request.
    assert without_lag(status) == without_lag(fleet.status())

    response = http.get(f"{API}/gateways")
    assert response.status == 200
    gateways = msgspec.json.decode(response.body, type=GatewaysReply).gateways
    assert {(g.gateway_id, g.region, g.status) for g in gateways} == {
        ("edge-a", "us-west", "healthy"),
        ("edge-b", "us-west", "healthy"),
    }


def test_load_balancing_get_and_set(http: Http, fleet: Fleet) -> None:
    response = http.get(f"{API}/load-balancing")
    assert response.status == 200
    assert response.json() == {"strategy": "RoundRobin", "health_threshold": 70.0}
    assert response.body == fleet.bus.ask(f"{fleet.prefix}.api.load-balancing.get", b"{}", 5)

    response = http.post(
        f"{API}/load-balancing", b'{"strategy": "LeastConnections", "health_threshold": 75.0}'
    )
    assert response.status == 200
    assert response.json() == {"strategy": "LeastConnections", "health_threshold": 75.0}
    # Either field alone; the other keeps its value.
    response = http.post(f"{API}/load-balancing", b'{"health_threshold": 60}')
    assert msgspec.json.decode(response.body, type=LoadBalancingConfig) == LoadBalancingConfig(
        strategy="LeastConnections", health_threshold=60.0
    )
    assert http.get(f"{API}/load-balancing").json() == {
        "strategy": "LeastConnections",
        "health_threshold": 60.0,
    }


def test_select_gateway(http: Http) -> None:
    picked: list[str | None] = []
    for body in (b'{"region": "us-west", "client_id": null}', b"{}", b"", None):
        response = http.post(f"{API}/select-gateway", body)
        assert response.status == 200, response
        reply = msgspec.json.decode(response.body, type=SelectReply)
        assert reply.strategy == "RoundRobin"
        picked.append(reply.gateway_id)
    assert Counter(picked) == {"edge-a": 2, "edge-b": 2}  # round robin

    sticky = b'{"client_id": "client-7"}'
    first = http.post(f"{API}/select-gateway", sticky).json()["gateway_id"]
    assert {http.post(f"{API}/select-gateway", sticky).json()["gateway_id"] for _ in range(4)} == {
        first
    }


def test_distribute_get_and_list(http: Http) -> None:
    body = msgspec.json.encode({"config_type": "Route", "config_data": ROUTE})
    response = http.post(f"{API}/distribute", body)
    assert response.status == 200, response
    reply = msgspec.json.decode(response.body, type=DistributeReply)
    assert reply.status == "pending"

    def record() -> Distribution:
        response = http.get(f"{API}/distributions/{reply.distribution_id}")
        assert response.status == 200, response
        return msgspec.json.decode(response.body, type=Distribution)

    wait_until(lambda: record().status == "completed", what="distribution completed", show=record)
    done = record()
    assert (done.id, done.config_type, done.version) == (reply.distribution_id, "Route", 1)
    assert sorted(done.successful_gateways) == ["edge-a", "edge-b"]

    for query in ("", "?include_completed=true", "?include_completed=1"):
        response = http.get(f"{API}/distributions{query}")
        assert response.status == 200
        listed = msgspec.json.decode(response.body, type=DistributionListReply).distributions
        assert [d.id for d in listed] == [reply.distribution_id]
    for query in ("?include_completed=false", "?include_completed=False"):
        response = http.get(f"{API}/distributions{query}")
        expected: dict[str, object] = {"distributions": [], "next_cursor": None}
        assert (response.status, response.json()) == (200, expected)


def test_healthz_and_metrics(http: Http, fleet: Fleet, gatefleet: Orchestrator) -> None:
    response = http.get("/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok"})

    # Something to count in each family.
    for _ in range(3):
        assert http.post(f"{API}/select-gateway", b"{}").status == 200
    fleet.publish_raw(f"{fleet.prefix}.gw.edge-a.heartbeat", b"{not json")
    wait_until(
        lambda: fleet.status().malformed_messages.get("malformed_json") == 1,
        what="the malformed heartbeat counted",
    )
    body = msgspec.json.encode({"config_type": "Route", "config_data": ROUTE})
    dist_id = http.post(f"{API}/distribute", body).json()["distribution_id"]
    wait_until(
        lambda: http.get(f"{API}/distributions/{dist_id}").json()["status"] == "completed",
        what="distribution completed",
    )

    response = http.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = metrics(response.body.decode())
    expected = {
        "gatefleet_up": 1,
        "gatefleet_gateways_managed": 2,
        'gatefleet_gateways{status="healthy"}': 2,
        'gatefleet_gateways{status="degraded"}': 0,
        'gatefleet_gateways{status="down"}': 0,
        'gatefleet_gateways{status="unknown"}': 0,
        'gatefleet_distributions{state="completed"}': 1,
        'gatefleet_distributions{state="failed"}': 0,
        'gatefleet_malformed_messages_total{cause="malformed_json"}': 1,
        "gatefleet_actor_restarts_total": 0,
        "gatefleet_health_threshold_percent": 70,
        'gatefleet_load_balancing_strategy{strategy="RoundRobin"}': 1,
        'gatefleet_selections_total{strategy="RoundRobin"}': 3,
        'gatefleet_selections_total{strategy="LeastConnections"}': 0,
        'gatefleet_shed_total{kind="requests"}': 0,
        'gatefleet_shed_total{kind="heartbeats"}': 0,
        "gatefleet_detection_suspended": 0,
        "gatefleet_events_lost_total": 0,
    }
    assert {name: samples.get(name) for name in expected} == expected
    assert samples["gatefleet_orchestrator_lag_ms"] >= 0
    assert samples["gatefleet_detection_suspended_seconds_total"] >= 0
    # The selections' latency, per strategy.
    assert samples['gatefleet_selection_latency_seconds_count{strategy="RoundRobin"}'] == 3
    assert 0 < samples['gatefleet_selection_latency_seconds_sum{strategy="RoundRobin"}'] < 5
    # The distribution's duration, in the histogram.
    assert samples["gatefleet_distribution_duration_seconds_count"] == 1
    assert samples['gatefleet_distribution_duration_seconds_bucket{le="+Inf"}'] == 1
    assert 0 < samples["gatefleet_distribution_duration_seconds_sum"] < 60
    # A small fleet: each gateway's heartbeat age, recent.
    ages = {k: v for k, v in samples.items() if k.startswith("gatefleet_gateway_heartbeat_age")}
    assert len(ages) == 2
    assert all(0 <= age < 5 for age in ages.values())


def test_no_per_gateway_series_above_per_gateway_metrics_max(
    gatefleet: Orchestrator, fleet: Fleet, prefix: str
) -> None:
    api = HttpApi(per_gateway_metrics_max=1)  # the fleet has 2
    try:
        http = Http(api.start(gatefleet.url, prefix, "127.0.0.1", 0, ""), "")
        samples = metrics(http.get("/metrics").body.decode())
    finally:
        api.stop()
    assert samples["gatefleet_gateways_managed"] == 2
    assert not [k for k in samples if k.startswith("gatefleet_gateway_heartbeat_age")]


# Authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_token_is_required(
    serve: Callable[[str], Http], method: str, path: str, body: bytes | None
) -> None:
    http = serve(TOKEN)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        response = http.call(method, path, body, token="", headers=headers)
        assert response.status == 401, (headers, response)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.error() == ("bad_request", "missing or wrong bearer token")
    # The scheme is case-insensitive (RFC 7235).
    response = http.call(method, path, body, token="", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status != 401


def test_healthz_needs_no_token(serve: Callable[[str], Http]) -> None:
    http = serve(TOKEN)
    response = http.get("/healthz", token="")
    assert (response.status, response.json()) == (200, {"status": "ok"})


def test_unknown_paths_are_401_before_404_with_a_token(serve: Callable[[str], Http]) -> None:
    http = serve(TOKEN)
    assert http.get(f"{API}/nothing-here", token="").status == 401
    response = http.get(f"{API}/nothing-here")
    assert response.status == 404
    assert response.error() == ("not_found", "no such path")


# Error paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [f"{API}/load-balancing", f"{API}/select-gateway", f"{API}/distribute"]
)
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_bad_json_is_400_with_the_error_body(http: Http, path: str, body: bytes) -> None:
    response = http.post(path, body)
    assert response.status == 400, response
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.error()[0] == "bad_request"


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        (f"{API}/load-balancing", b'{"strategy": "Fastest"}', "strategy"),
        (f"{API}/load-balancing", b'{"health_threshold": 101}', "health_threshold"),
        (f"{API}/load-balancing", b'{"health_threshold": "high"}', "health_threshold"),
        (f"{API}/select-gateway", b'{"region": 7}', "region"),
        (f"{API}/distribute", b'{"config_type": "Route"}', "config_data"),
        (f"{API}/distribute", b'{"config_type": "Route", "config_data": [1]}', "config_data"),
    ],
)
def test_invalid_fields_are_400(http: Http, path: str, body: bytes, fragment: str) -> None:
    response = http.post(path, body)
    assert response.status == 400, response
    code, message = response.error()
    assert code == "bad_request"
    assert fragment in message


def test_unknown_distribution_is_404_and_a_malformed_id_400(http: Http) -> None:
    response = http.get(f"{API}/distributions/{UNKNOWN_ID}")
    assert response.status == 404, response
    assert response.error()[0] == "not_found"
    response = http.get(f"{API}/distributions/not-a-distribution")
    assert response.status == 400
    assert response.error()[0] == "bad_request"
    response = http.get(f"{API}/distributions?include_completed=maybe")
    assert response.status == 400
    assert response.error() == ("bad_request", "include_completed must be true or false")


def test_unknown_path_and_wrong_method(http: Http) -> None:
    for path in ("/", f"{API}", f"{API}/statuses", "/api/v2/orchestration/status"):
        response = http.get(path)
        assert response.status == 404, path
        assert response.error() == ("not_found", "no such path")
    response = http.call("DELETE", f"{API}/status")
    assert response.status == 405
    assert response.error() == ("bad_request", "method not allowed")
    assert "GET" in response.headers["Allow"]
    response = http.get(f"{API}/select-gateway")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"


def test_oversized_bodies_are_413(http: Http) -> None:
    # Over the NATS server's max_payload (1 MiB by default) but within the HTTP limit.
    response = http.post(f"{API}/distribute", b" " * (2 * 1024 * 1024) + b"{}")
    assert response.status == 413
    code, message = response.error()
    assert code == "bad_request"
    assert "over the NATS server's limit" in message
    # Over the HTTP limit: refused before anything goes to NATS.
    response = http.post(f"{API}/distribute", b" " * (MAX_REQUEST_BYTES + 1))
    assert response.status == 413
    assert response.error() == ("bad_request", f"request body over {MAX_REQUEST_BYTES} bytes")


# When the orchestrator is gone ------------------------------------------------------------


def test_orchestrator_down_is_503(serve: Callable[[str], Http], gatefleet: Orchestrator) -> None:
    http = serve("")
    assert http.get("/healthz").status == 200
    gatefleet.stop()

    response = http.get("/healthz")
    assert response.status == 503
    assert response.error()[0] == "unavailable"
    for method, path, body in ENDPOINTS[:-1]:
        response = http.call(method, path, body)
        assert response.status == 503, (path, response)
        code, message = response.error()
        assert code == "unavailable"
        assert "nobody answers" in message
    response = http.get("/metrics")
    assert response.status == 200
    assert metrics(response.body.decode()) == {"gatefleet_up": 0}


def test_start_fails_cleanly_on_a_busy_port(
    serve: Callable[[str], Http], gatefleet: Orchestrator, prefix: str
) -> None:
    port = int(serve("").base.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="address already in use"):
        HttpApi().start(gatefleet.url, prefix, "127.0.0.1", port, "")


def test_healthz_names_a_top_level_actor_that_is_down(
    serve: Callable[[str], Http], gatefleet: Orchestrator, fleet: Fleet
) -> None:
    http = serve("")
    assert http.get("/healthz").status == 200
    assert set(fleet.status().health.values()) == {"ok"}
    assert set(fleet.status().health) == {
        "nats",
        "jetstream",
        "load_balancer",
        "distributor",
        "supervisor",
    }
    [distributor] = pykka.ActorRegistry.get_by_class(DistributorActor)
    distributor.stop(timeout=5)

    response = http.get("/healthz")
    assert response.status == 503
    assert response.error() == ("unavailable", "distributor: stopped")
    assert fleet.status().health["distributor"] == "stopped"
