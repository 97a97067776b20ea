"""The docs are held to the code: docs/PROTOCOL.md to the endpoint table
(schemas/endpoints.py), the actors' picture in docs/ARCHITECTURE.md to actors/messages.py
and the endpoint table."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from actors import messages
from schemas.endpoints import ENDPOINTS, HTTP_PREFIX

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROTOCOL = (DOCS / "PROTOCOL.md").read_text()
ARCHITECTURE = (DOCS / "ARCHITECTURE.md").read_text()


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


def _picture() -> tuple[str, str]:
    """The actors' mermaid picture, and the paragraph after it saying what it leaves out."""
    start = ARCHITECTURE.index("```mermaid\nflowchart")
    end = ARCHITECTURE.index("```\n", start + 3)
    after = ARCHITECTURE[end + 4 :].lstrip("\n")
    assert after.startswith("Not drawn:")
    return ARCHITECTURE[start:end], after.split("\n\n", 1)[0]


def test_the_actors_picture_shows_every_message() -> None:
    picture, not_drawn = _picture()
    names = {
        name
        for name, kind in vars(messages).items()
        if isinstance(kind, type)
        and issubclass(kind, msgspec.Struct)
        and kind.__module__ == messages.__name__
        and not name.startswith("_")
    }
    drawn = {name for name in names if re.search(rf"\b{name}\b", picture)}
    left_out = {name for name in names if f"`{name}`" in not_drawn}
    assert names - drawn - left_out == set(), "messages missing from the picture"
    assert drawn & left_out == set(), "drawn, and said not to be"


def test_the_actors_picture_shows_who_serves_every_endpoint() -> None:
    picture, _ = _picture()
    node = {"supervisor": "sup", "load_balancer": "lb", "distributor": "dist"}
    served = {
        server: re.search(rf'api -- "Request\(([^)]*)\)" --> {name}\n', picture)
        for server, name in node.items()
    }
    for endpoint in ENDPOINTS:
        found = served[endpoint.served_by]
        assert found is not None, endpoint.served_by
        listed = {name.strip() for name in found.group(1).split(",")}
        family = endpoint.name.split(".")[0] + ".*"
        assert endpoint.name in listed or family in listed, (endpoint.name, listed)
