"""How a distribution to a large fleet is stored and resumed, next to bare NATS.

    python -m bench distribution_store [--gateways 20000] [--id-length 64] [--batch 1000]

Registers `--gateways` gateways (ids of `--id-length` characters, heartbeats only: nothing
answers their config pushes, so the first batch fails at once and waits for its retry),
distributes to all of them, stops the orchestrator while that batch waits, and starts it
again. Prints the time `distribute` took to answer (the distribution stored) and the time
the restart took to load and resume it; the largest value in the distributions bucket and
the largest reply of `distributions.get` (paging through every gateway's state) and of
`distributions.list`, each against NATS's 1 MiB payload limit. The baseline, measured in
the same run on the same server: the same stored values written to, and read back from, a
bare key-value bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.js.api import KeyValueConfig, StorageType

from bus.jetstream import KvStore, bucket_name
from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from schemas.api import GATEWAY_STATES_MAX_LIMIT
from schemas.codec import encode
from schemas.events import DistributionEvent, decode_event
from schemas.settings import Settings
from schemas.wire import Heartbeat

PREFIX = "bench"
MIB = 1024 * 1024
CONFIG = {"routes": [{"path": f"/svc-{n}", "upstream": f"svc-{n}"} for n in range(20)]}


def gateway_ids(count: int, length: int) -> list[str]:
    return [f"gw-{n:06d}-".ljust(length, "x") for n in range(count)]


def register(bus: Bus, ids: list[str]) -> None:
    """Two heartbeats each (healthy after `rise` = 2), published without agents."""
    for seq in (1, 2):
        for gw in ids:
            beat = Heartbeat(
                gateway_id=gw,
                region="eu-west",
                seq=seq,
                ts=datetime.now(UTC),
                cpu_percent=10.0,
                memory_percent=10.0,
                active_connections=1,
                max_connections=1000,
                latency_ms=1.0,
            )
            bus.publish(f"{PREFIX}.gw.{gw}.heartbeat", beat)
        bus.run(bus.nc.flush(), timeout=60)


def wait(condition: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout_s:g}s")
        time.sleep(0.05)


def largest_get_reply(
    bus: Bus, dist_id: str, limit: int | None = None
) -> tuple[int, int, list[str]]:
    """(largest reply in bytes, pages, every gateway id in order) of distributions.get."""
    largest, pages, ids = 0, 0, []
    cursor = None
    while True:
        body = encode({"distribution_id": dist_id, "cursor": cursor, "limit": limit})
        reply = bus.ask(f"{PREFIX}.api.distributions.get", body, 30)
        page = msgspec.json.decode(reply)
        largest, pages = max(largest, len(reply)), pages + 1
        ids += page["target_gateways"]
        cursor = page["next_cursor"]
        if cursor is None:
            return largest, pages, ids


def bare_baseline(bus: Bus, values: dict[str, bytes]) -> tuple[float, float]:
    """Seconds to put `values` into a bare bucket (all at once) and to read them back."""

    async def run() -> tuple[float, float]:
        kv = await bus.js.create_key_value(
            KeyValueConfig(bucket="bench_bare", storage=StorageType.FILE, history=1)
        )
        started = time.perf_counter()
        await asyncio.gather(*(kv.put(key, data) for key, data in values.items()))
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        watcher = await kv.watchall(ignore_deletes=True)
        read = 0
        async for entry in watcher:
            if entry is None:
                break
            read += 1
        await watcher.stop()
        assert read == len(values)
        return put_s, time.perf_counter() - started

    return bus.run(run(), timeout=300)


@dataclass
class Figures:
    store_s: float = 0.0
    load_s: float = 0.0
    resume_s: float = 0.0
    values: dict[str, bytes] = field(default_factory=dict)
    largest_get: int = 0
    pages: int = 0
    largest_get_max_limit: int = 0
    list_reply: int = 0
    states_after: dict[str, int] = field(default_factory=dict)
    bare_put_s: float = 0.0
    bare_read_s: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=20_000)
    parser.add_argument("--id-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    ids = gateway_ids(args.gateways, args.id_length)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "nats", port=0)
        server.start()
        bus = Bus(server.url, name="bench")
        bus.start()
        try:
            figures = measure(server.url, bus, ids, args.batch, tmp)
        finally:
            bus.stop()
            server.stop()
    report(figures, ids, args.id_length, args.batch)


def measure(url: str, bus: Bus, ids: list[str], batch: int, tmp: str) -> Figures:
    settings = msgspec.convert(
        {
            "bus": {"url": url, "subject_prefix": PREFIX, "data_dir": tmp},
            "health": {"probe_interval_ms": 0, "heartbeat_interval_ms": 600_000},
            "orchestrator": {
                "distribution_batch_size": batch,
                "distribution_retry_count": 1,
                "distribution_retry_delay_ms": 600_000,
                "ha_enabled": False,
            },
            "audit": {"record_selections": False},
        },
        Settings,
    )
    resumed = threading.Event()

    def on_event(msg: Inbound) -> None:
        event = decode_event(msg.data)
        if isinstance(event, DistributionEvent) and event.step == "resumed":
            resumed.set()

    bus.subscribe(f"{PREFIX}.events.distribution.>", on_event)
    figures = Figures()
    orchestrator = Orchestrator(settings)
    try:
        orchestrator.start()
        with GatefleetClient(url, prefix=PREFIX, timeout=60) as client:
            register(bus, ids)
            wait(lambda: client.status().gateways_healthy == len(ids), "fleet healthy")
            started = time.perf_counter()
            dist_id = client.distribute("Route", CONFIG).distribution_id
            figures.store_s = time.perf_counter() - started

            def first_batch_waits() -> bool:
                counts = client.get_distribution(dist_id).state_counts
                return counts.get("retrying", 0) == min(batch, len(ids))

            wait(first_batch_waits, "the first batch waiting for its retry")
            figures.list_reply = len(bus.ask(f"{PREFIX}.api.distributions.list", b"{}", 30))
        orchestrator.stop()

        name = bucket_name(PREFIX, "distributions")
        kv = KvStore(bus, bus.run(bus.js.key_value(name)), name)
        figures.values = kv.entries()
        started = time.perf_counter()
        orchestrator = Orchestrator(settings)
        orchestrator.start()
        figures.load_s = time.perf_counter() - started
        if not resumed.wait(60):
            raise SystemExit("the distribution was not resumed")
        figures.resume_s = time.perf_counter() - started
        figures.largest_get, figures.pages, paged_ids = largest_get_reply(bus, dist_id)
        if paged_ids != ids:
            raise SystemExit("the resumed distribution does not target every gateway")
        figures.largest_get_max_limit, _, _ = largest_get_reply(
            bus, dist_id, GATEWAY_STATES_MAX_LIMIT
        )
        with GatefleetClient(url, prefix=PREFIX, timeout=60) as client:
            figures.states_after = client.get_distribution(dist_id).state_counts
        figures.bare_put_s, figures.bare_read_s = bare_baseline(bus, figures.values)
    finally:
        orchestrator.stop()
    return figures


def report(figures: Figures, ids: list[str], id_length: int, batch: int) -> None:
    values = figures.values
    total = sum(len(v) for v in values.values())
    largest_key = max(values, key=lambda key: len(values[key]))
    largest = len(values[largest_key])
    print(f"{len(ids)} gateways, ids of {id_length} characters, batches of {batch}")
    print(
        f"stored: {len(values)} values, {total / MIB:.2f} MiB; largest {largest_key}: "
        f"{largest} bytes ({largest / MIB:.1%} of 1 MiB)"
    )
    print(
        f"distributions.get: {figures.pages} pages, largest reply {figures.largest_get} bytes "
        f"({figures.largest_get / MIB:.1%} of 1 MiB), {figures.largest_get_max_limit} bytes "
        f"with limit {GATEWAY_STATES_MAX_LIMIT}; distributions.list: {figures.list_reply} bytes"
    )
    print(f"after the restart: states {figures.states_after}")
    print(
        f"distribute answered (stored) in {figures.store_s * 1000:.0f} ms; the restart "
        f"loaded it in {figures.load_s * 1000:.0f} ms, resumed in "
        f"{figures.resume_s * 1000:.0f} ms"
    )
    print(
        f"bare NATS, the same {len(values)} values: put in {figures.bare_put_s * 1000:.0f} ms, "
        f"read back in {figures.bare_read_s * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
