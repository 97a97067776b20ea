"""A short seeded run of `python -m bench fuzz` (bench/bench_fuzz.py): the same code, a
few thousand fuzzed messages on every inbound subject, the same checks."""

from __future__ import annotations

from pathlib import Path

from bench.bench_fuzz import FuzzOptions, print_report, run_fuzz
from bus.server import EmbeddedServer


def test_a_short_seeded_fuzz_breaks_nothing(
    nats_server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    options = FuzzOptions(
        messages=3000,
        seed=20261201,
        bank_size=30,
        prefix=prefix,
        heartbeat_interval_ms=300,
        probe_interval_ms=100,
        settle_timeout_s=20,
        audit_max_bytes=16 * 1024 * 1024,
    )
    report = run_fuzz(options, nats_server.url, tmp_path)
    lines: list[str] = []
    print_report(report, lines.append)
    assert report.ok, "\n".join(lines)
    assert report.load.fuzz_messages >= options.messages
    # Every kind of message was sent, and every drop cause the edge knows was hit.
    assert set(report.load.sent) >= {
        "heartbeat",
        "goodbye",
        "gateway_subject",
        "api",
        "api_no_reply",
        "api_subject",
        "pong",
        "ack",
    }
    assert set(report.status.malformed_messages) >= {
        "malformed_json",
        "invalid_fields",
        "too_deep",
        "invalid_utf8",
        "id_mismatch",
        "bad_subject",
        "bad_request",
        "no_reply_subject",
    }
