"""The HTTP API's read-only token (issue 14): GET routes and select-gateway, nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gatefleet.app import Orchestrator
from gatefleet.http import HttpApi
from tests.conftest import SettingsFactory
from tests.test_http import API, TOKEN, Http

READER = "read-only-token"
WRONG = "nope"


@pytest.fixture
def http(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[..., Orchestrator],
    prefix: str,
) -> Iterator[Http]:
    gatefleet = start_orchestrator(make_settings())
    api = HttpApi(access_log=False)
    address = api.start(gatefleet.url, prefix, "127.0.0.1", 0, TOKEN, read_only_token=READER)
    yield Http(address)
    api.stop()


def test_the_read_only_token_reads_and_selects_but_changes_nothing(http: Http) -> None:
    for path in ("/status", "/gateways", "/load-balancing", "/distributions"):
        assert http.get(f"{API}{path}", token=READER).status == 200, path
    assert http.get("/metrics", token=READER).status == 200
    selected = http.call("POST", f"{API}/select-gateway", b"{}", token=READER)
    assert selected.status != 403  # 503: no gateway to select; not refused
    for path, body in (
        ("/load-balancing", b'{"strategy": "LeastConnections"}'),
        ("/distribute", b'{"config_type": "Route", "config_data": {}}'),
        ("/maintenance", b'{"gateway_id": "gw-1", "enabled": true}'),
    ):
        refused = http.call("POST", f"{API}{path}", body, token=READER)
        assert refused.status == 403, path
        assert refused.error() == ("bad_request", "this token may only read and select")
    # The full token still does everything; a wrong one nothing.
    changed = http.call("POST", f"{API}/load-balancing", b'{"strategy": "LeastConnections"}')
    assert changed.status == 401  # no token sent
    changed = http.call(
        "POST", f"{API}/load-balancing", b'{"strategy": "LeastConnections"}', token=TOKEN
    )
    assert changed.status == 200
    assert http.get(f"{API}/status", token=WRONG).status == 401
