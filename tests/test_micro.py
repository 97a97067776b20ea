"""NATS service discovery: `$SRV.PING|INFO|STATS` answered for gatefleet's endpoints, as a
plain nats-py client (and nats-py's own micro types) reads them; and the stats' accounting,
on a clock the test controls."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import nats
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from bus.micro import SWEEP_ABOVE, UNANSWERED_AFTER_NS, MicroService
from bus.runtime import Inbound
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from gatefleet.app import Orchestrator
from schemas.endpoints import API_QUEUE, ENDPOINTS
from schemas.settings import Settings
from tests.conftest import SettingsFactory


async def ask(nc: Any, subject: str, body: bytes = b"") -> dict[str, Any]:
    reply: dict[str, Any] = json.loads((await nc.request(subject, body, timeout=5)).data)
    return reply


async def test_srv_lists_the_endpoints_with_true_counts(
    nats_server: EmbeddedServer,
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    prefix: str,
) -> None:
    orchestrator = start_orchestrator(make_settings(cluster={"replica_id": "r1"}))
    nc = await nats.connect(nats_server.url)
    try:
        ping = await ask(nc, "$SRV.PING.gatefleet")
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        renewed = orchestrator.lease.renewed_at
        assert renewed is not None
        assert (ping["name"], ping["metadata"]) == (
            "gatefleet",
            {
                "subject_prefix": prefix,
                "replica_id": "r1",
                "role": "leader",
                "leader": "r1",
                "epoch": str(orchestrator.lease.view.epoch),
                "lease_renewed_at": renewed.isoformat(),
            },
        )
        assert ServicePing.from_dict(ping).id == ping["id"]
        assert (await ask(nc, "$SRV.PING"))["id"] == ping["id"]
        service = f"gatefleet.{ping['id']}"

        info = await ask(nc, "$SRV.INFO.gatefleet")
        assert info["type"] == "io.nats.micro.v1.info_response"
        assert ServiceInfo.from_dict(info).id == ping["id"]
        assert [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]] == [
            (e.name, f"{prefix}.api.{e.name}", API_QUEUE) for e in ENDPOINTS
        ]
        assert await ask(nc, f"$SRV.INFO.{service}") == info

        api = f"{prefix}.api"
        for _ in range(3):
            assert "gateway_id" in await ask(nc, f"{api}.select-gateway", b'{"region": "x"}')
        bad = await ask(nc, f"{api}.select-gateway", b'{"region": ""}')
        assert bad["error"]["code"] == "bad_request"
        missing = await ask(nc, f"{api}.failback", b'{"gateway_id": "nobody"}')
        assert missing["error"]["code"] == "not_found"
        await ask(nc, f"{api}.status")

        stats = await ask(nc, f"$SRV.STATS.{service}")
        assert stats["type"] == "io.nats.micro.v1.stats_response"
        assert ServiceStats.from_dict(stats).id == ping["id"]
        by_name = {e["name"]: e for e in stats["endpoints"]}
        assert list(by_name) == [e.name for e in ENDPOINTS]
        counts = {
            name: (e["num_requests"], e["num_errors"], e["last_error"][:4])
            for name, e in by_name.items()
            if e["num_requests"]
        }
        assert counts == {
            "select-gateway": (4, 1, "400:"),
            "failback": (1, 1, "404:"),
            "status": (1, 0, ""),
        }
        select = by_name["select-gateway"]
        assert select["processing_time"] > 0
        assert select["average_processing_time"] == select["processing_time"] // 4
        for verb in ("PING", "INFO", "STATS"):  # every form of each subject is answered
            for subject in (f"$SRV.{verb}", f"$SRV.{verb}.gatefleet", f"$SRV.{verb}.{service}"):
                answer = await ask(nc, subject)
                assert answer["type"] == f"io.nats.micro.v1.{verb.lower()}_response"
                assert answer["id"] == ping["id"]
    finally:
        await nc.close()


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def request(reply: str) -> Inbound:
    return Inbound("t.api.status", b"{}", reply, None)


def endpoint(micro: MicroService, name: str) -> Any:
    return next(e for e in micro.stats().endpoints if e.name == name)


def test_processing_time_runs_until_the_reply_is_published() -> None:
    clock = Clock()
    micro = MicroService(Subjects("t"), clock=clock)
    handled: list[Inbound] = []
    handle = micro.timed("status", handled.append)
    handle(request("_INBOX.a"))
    handle(request("_INBOX.b"))
    assert len(handled) == 2  # the request goes on to its handler at once
    clock.ns = 3_000_000  # the actor answers 3 ms later
    micro.published("_INBOX.a", None)
    micro.published("somewhere.else", None)  # not a reply: ignored
    clock.ns = 5_000_000
    micro.published("_INBOX.b", {"Nats-Service-Error-Code": "503", "Nats-Service-Error": "busy"})
    stats = endpoint(micro, "status")
    assert (stats.num_requests, stats.num_errors, stats.last_error) == (2, 1, "503:busy")
    assert (stats.processing_time, stats.average_processing_time) == (8_000_000, 4_000_000)
    micro.published("_INBOX.a", None)  # a second reply to one request counts once
    assert endpoint(micro, "status").num_requests == 2


def test_a_request_never_answered_counts_as_an_error_and_is_forgotten() -> None:
    clock = Clock()
    micro = MicroService(Subjects("t"), clock=clock)
    handle = micro.timed("status", lambda msg: None)
    handle(request("_INBOX.lost"))
    handle(Inbound("t.api.status", b"{}", "", None))  # no reply subject: nothing to time
    clock.ns = UNANSWERED_AFTER_NS + 1
    for n in range(SWEEP_ABOVE):  # in flight together: the last one starts a sweep
        handle(request(f"_INBOX.{n}"))
    micro.published("_INBOX.lost", None)  # too late: already counted as unanswered
    for n in range(SWEEP_ABOVE):
        micro.published(f"_INBOX.{n}", None)
    stats = endpoint(micro, "status")
    assert (stats.num_requests, stats.num_errors) == (SWEEP_ABOVE + 1, 1)
    assert stats.last_error == "500:no reply within 60 s"
    handle(request("_INBOX.late"))
    clock.ns += UNANSWERED_AFTER_NS + 1
    assert endpoint(micro, "status").num_errors == 2  # a STATS request sweeps too
