"""docs/PROTOCOL.md is held to the endpoint table (schemas/endpoints.py)."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.endpoints import ENDPOINTS, HTTP_PREFIX

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


def test_every_endpoint_is_documented_with_its_subject() -> None:
    documented = set(re.findall(r"`P\.api\.([a-z.-]+)`", PROTOCOL))
    assert {e.name for e in ENDPOINTS} <= documented
    assert documented - {e.name for e in ENDPOINTS} == set(), "documented but not served"


def test_every_http_route_is_documented() -> None:
    http = PROTOCOL[PROTOCOL.index("## 6. The HTTP API") :]
    for endpoint in ENDPOINTS:
        if endpoint.http is None:
            continue
        method, path = endpoint.http
        assert f"`{method} {HTTP_PREFIX}{path}" in http, (method, path)
        assert f"`P.api.{endpoint.name}`" in http, endpoint.name
