"""What auth and TLS cost: selections and heartbeats with the bus open, with NATS auth,
and with auth and TLS, in the same run (issue 14; aim: within 10 % of open).

    python -m bench security [--gateways 500] [--selections 2000] [--heartbeats 100000]
                             [--rounds 3]

Each mode runs in a fresh process with its own embedded nats-server, gatefleet's own
connections authenticated as in production (admin creds; a simulator credential for the
heartbeat publisher; TLS on loopback with a certificate from gatefleet's generated CA):

- `bare echo`: sequential NATS request/reply to a plain echo subscriber on the same
  server (what the transport alone costs: the baseline of each mode);
- `select`: sequential `select-gateway` calls through GatefleetClient (p50, p99, rate);
- `heartbeats`: N heartbeats over the registered gateways published flat out on one
  connection; the rate at which gatefleet's load balancer has taken them all in.

The modes run interleaved for `--rounds` rounds (a shared machine drifts); each figure is
the median of its rounds, and "of open" compares with the open mode's median.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats

from bench.common import (
    SEED,
    accepted_heartbeats,
    fmt_rate,
    heartbeat_templates,
    machine_line,
    percentile,
    print_table,
    run_case,
    safe_div,
    wait_for,
)
from bus.connection import ClientAuth
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient
from gatefleet.security.tls import ensure_tls
from schemas.settings import Settings

MODES = ("open", "auth", "auth+tls")
PREFIX = "bench"


def _settings(mode: str, data_dir: Path) -> Settings:
    bus: dict[str, Any] = {"port": 0, "data_dir": str(data_dir), "subject_prefix": PREFIX}
    bus["auth"] = mode != "open"
    if mode == "auth+tls":
        cert, key, ca = ensure_tls(data_dir / "auth", "127.0.0.1")
        bus |= {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca)}
    return msgspec.convert(
        {
            "bus": bus,
            "health": {"probe_interval_ms": 0, "heartbeat_interval_ms": 600_000},
            "load_balancing": {"random_seed": SEED},
        },
        Settings,
    )


def mode_case(mode: str, gateways: int, selections: int, heartbeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gatefleet-bench-") as tmp:
        orchestrator = Orchestrator(_settings(mode, Path(tmp)))
        orchestrator.start()
        try:
            own = orchestrator.client_auth
            sender = own
            if orchestrator.authority is not None:
                creds = orchestrator.authority.issue("simulator", "bench", PREFIX)
                sender = ClientAuth(creds=str(creds), tls_ca=own.tls_ca)
            beats = asyncio.run(_heartbeats(orchestrator, sender, gateways, heartbeats))
            echo = asyncio.run(_echo(orchestrator.url, own, selections))
            with GatefleetClient(orchestrator.url, prefix=PREFIX, auth=own) as client:
                client.select_optimal_gateway()  # warm up
                latencies = []
                started = time.perf_counter()
                for _ in range(selections):
                    t0 = time.perf_counter()
                    client.select_optimal_gateway()
                    latencies.append(time.perf_counter() - t0)
                elapsed = time.perf_counter() - started
        finally:
            orchestrator.stop()
    return {
        "mode": mode,
        "echo_p50_ms": percentile(echo, 50) * 1000,
        "select_p50_ms": percentile(latencies, 50) * 1000,
        "select_p99_ms": percentile(latencies, 99) * 1000,
        "select_rate": selections / elapsed,
        "heartbeat_rate": beats,
    }


async def _connect(url: str, auth: ClientAuth) -> nats.NATS:
    return await nats.connect(url, max_reconnect_attempts=0, **auth.options())


async def _echo(url: str, auth: ClientAuth, n: int) -> list[float]:
    nc = await _connect(url, auth)
    try:

        async def answer(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("_INBOX.bench-echo", cb=answer)  # the admin may use any subject
        await nc.flush()
        latencies = []
        for _ in range(n):
            t0 = time.perf_counter()
            await nc.request("_INBOX.bench-echo", b"{}", timeout=5)
            latencies.append(time.perf_counter() - t0)
        return latencies
    finally:
        await nc.close()


async def _heartbeats(
    orchestrator: Orchestrator, auth: ClientAuth, gateways: int, total: int
) -> float:
    templates = heartbeat_templates(PREFIX, gateways)
    nc = await _connect(orchestrator.url, auth)
    try:
        for t in templates:  # registration first, not measured
            await nc.publish(t.subject, t.body(1))
        await nc.flush()
        await asyncio.to_thread(
            wait_for, lambda: accepted_heartbeats(orchestrator) == (gateways, gateways), 60, "reg"
        )
        started = time.perf_counter()
        for i in range(total):
            t = templates[i % gateways]
            await nc.publish(t.subject, t.body(2 + i // gateways))
            if i % 256 == 0:
                await asyncio.sleep(0)  # let the flusher write
        await nc.flush()
        want = gateways + total
        await asyncio.to_thread(
            wait_for, lambda: accepted_heartbeats(orchestrator)[1] >= want, 120, "all taken in"
        )
        return total / (time.perf_counter() - started)
    finally:
        await nc.close()


def _medians(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode (in MODES order): the median of each figure over the rounds."""
    rows = []
    for mode in MODES:
        runs = [r for r in results if r["mode"] == mode]
        if runs:
            keys = [k for k in runs[0] if k != "mode"]
            rows.append({"mode": mode} | {k: percentile([r[k] for r in runs], 50) for k in keys})
    return rows


def report(results: Sequence[dict[str, Any]]) -> None:
    medians = _medians(results)
    base = next((r for r in medians if r["mode"] == "open"), medians[0])
    rows = []
    for r in medians:
        rows.append(
            [
                r["mode"],
                f"{r['echo_p50_ms']:.3f} ms",
                f"{r['select_p50_ms']:.3f} ms",
                f"{r['select_p99_ms']:.3f} ms",
                fmt_rate(r["select_rate"]),
                f"{safe_div(r['select_rate'], base['select_rate']) * 100:.0f} %",
                fmt_rate(r["heartbeat_rate"]),
                f"{safe_div(r['heartbeat_rate'], base['heartbeat_rate']) * 100:.0f} %",
            ]
        )
    print_table(
        f"auth and TLS on the bus, median of {len(results) // len(medians)} rounds "
        f"({machine_line()})",
        [
            "mode",
            "bare echo p50",
            "select p50",
            "select p99",
            "selects",
            "of open",
            "heartbeats",
            "of open",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench security", description=__doc__)
    parser.add_argument("--gateways", type=int, default=500)
    parser.add_argument("--selections", type=int, default=2000)
    parser.add_argument("--heartbeats", type=int, default=100_000)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results = [
        run_case(mode_case, mode, args.gateways, args.selections, args.heartbeats, timeout=600)
        for _ in range(args.rounds)
        for mode in args.modes
    ]
    report(results)
