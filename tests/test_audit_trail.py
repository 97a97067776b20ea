"""The audit trail has no silent gaps (bus/outbox.py): every event is stored with the
stream's ack or counted lost and reported by an `audit.gap` event; a clean stop stores
what was emitted before it, and a start after a killed run records the window it cannot
vouch for. A real nats-server throughout: the session's, or one of the test's own where
the test kills it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from nats.js.api import DiscardPolicy

from bus.jetstream import JetStream, stream_name
from bus.outbox import EventOutbox, unclean_stop_gap
from bus.replay import Replay
from bus.runtime import Bus
from bus.server import EmbeddedServer
from bus.subjects import Subjects
from gatefleet import metrics
from gatefleet.app import Orchestrator
from gatefleet.audit import audit
from schemas.events import (
    Alarm,
    AuditGap,
    Event,
    OrchestratorStarted,
    OrchestratorStopped,
    decode_event,
)
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet


def alarms(count: int, kind: str = "test") -> list[Event]:
    return [Alarm(kind=kind, message=f"alarm {n}", active=True) for n in range(count)]


def stored_events(bus: Bus, prefix: str) -> list[Event]:
    with Replay(bus, stream_name(prefix), [Subjects(prefix).all_events]) as replay:
        return [decode_event(data) for batch in replay for _, _, data in batch]


def stored_count(bus: Bus, prefix: str) -> int:
    return int(bus.run(bus.js.stream_info(stream_name(prefix))).state.messages)


def limit_stream(bus: Bus, prefix: str, max_msgs: int) -> None:
    """The stream refuses writes past `max_msgs` messages (-1: no limit again)."""

    async def update() -> None:
        info = await bus.js.stream_info(stream_name(prefix))
        config = dataclasses.replace(info.config, max_msgs=max_msgs, discard=DiscardPolicy.NEW)
        await bus.js.update_stream(config)

    bus.run(update())


def settled(outbox: EventOutbox, timeout: float = 5.0) -> None:
    wait_until(
        lambda: outbox.settled,
        timeout,
        what="every event stored, or lost and reported",
        show=lambda: (outbox.waiting, outbox.lost),
    )


def audit_lines(settings: Settings, tmp_path: Path, *args: str) -> list[str]:
    """`gatefleet audit ARGS`'s lines, the header left out."""
    config = tmp_path / "audit.toml"
    config.write_text(
        f'[bus]\nurl = "{settings.bus.url}"\nsubject_prefix = "{settings.bus.subject_prefix}"\n'
    )
    result = CliRunner().invoke(audit, ["--config", str(config), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[1:]


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    # Short retries: a refused event is lost within a second.
    return make_settings(audit={"event_retry_ms": 300})


@pytest.fixture
def gatefleet(
    settings: Settings, start_orchestrator: Callable[[Settings], Orchestrator]
) -> Orchestrator:
    orchestrator = start_orchestrator(settings)
    assert orchestrator.events is not None
    settled(orchestrator.events)
    return orchestrator


def test_a_burst_from_two_threads_is_stored_whole_and_once(
    gatefleet: Orchestrator, bus: Bus, prefix: str, fleet: Fleet
) -> None:
    outbox = gatefleet.events
    assert outbox is not None
    batches = [alarms(2500, kind=f"thread-{t}") for t in range(2)]

    def emit_all(batch: list[Event]) -> None:
        for event in batch:
            outbox.emit(event)

    threads = [threading.Thread(target=emit_all, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    settled(outbox)

    ids = [e.id for e in stored_events(bus, prefix)]
    assert len(ids) == len(set(ids))
    assert {e.id for batch in batches for e in batch} <= set(ids)
    assert (outbox.lost, fleet.status().events_lost) == (0, 0)


def test_events_the_stream_refuses_are_counted_then_reported_once_it_takes_writes(
    gatefleet: Orchestrator, bus: Bus, prefix: str, fleet: Fleet, settings: Settings, tmp_path: Path
) -> None:
    outbox = gatefleet.events
    assert outbox is not None
    limit_stream(bus, prefix, max_msgs=stored_count(bus, prefix) + 10)
    batch = alarms(30)
    for event in batch:
        outbox.emit(event)
    wait_until(
        lambda: fleet.status().events_lost == 20,
        what="20 events counted lost",
        show=lambda: (outbox.lost, outbox.waiting),
    )
    assert "gatefleet_events_lost_total 20.0\n" in metrics.render(fleet.status()).decode()

    # The report waits for room in the stream, then is stored after the 10 that fitted.
    limit_stream(bus, prefix, max_msgs=-1)
    settled(outbox)
    stored = stored_events(bus, prefix)
    ids = {e.id for e in stored}
    assert [e.id for e in batch if e.id in ids] == [e.id for e in batch[:10]]
    [gap] = [e for e in stored if isinstance(e, AuditGap)]
    assert stored[-1] == gap
    lost = batch[10:]
    assert (gap.cause, gap.events_lost) == ("not_stored", 20)
    assert (gap.since, gap.until) == (lost[0].ts, lost[-1].ts)
    assert "maximum messages exceeded" in gap.reason

    [line] = audit_lines(settings, tmp_path, "--type", "audit")
    assert "audit.gap" in line
    assert "20 events not stored, emitted from" in line


def test_an_overflowing_outbox_counts_and_reports_what_it_drops(bus: Bus, prefix: str) -> None:
    subjects = Subjects(prefix)
    JetStream(bus, subjects).setup(max_age_s=0, max_bytes=16 * 1024 * 1024)
    outbox = EventOutbox(bus, subjects, retry_for_s=30, max_events=10)
    outbox.start()
    try:
        # Hold the bus loop: emitted events can only wait, 10 of them at most.
        release = threading.Event()
        bus.call_soon(release.wait, 5)
        batch = alarms(50)
        for event in batch:
            outbox.emit(event)
        release.set()
        settled(outbox)
    finally:
        outbox.close()
    assert (outbox.lost, outbox.acked) == (40, 10 + 1 + 1)  # with the report and the stop
    # The report first (the losses were known before anything was sent), then the rest.
    gap, *kept, stopped = stored_events(bus, prefix)
    assert [e.id for e in kept] == [e.id for e in batch[:10]]
    assert isinstance(gap, AuditGap)
    assert (gap.events_lost, gap.reason) == (40, "outbox full (10 events waiting)")
    assert isinstance(stopped, OrchestratorStopped)
    assert stopped.events_lost == 40


def test_events_emitted_across_a_server_kill_and_restart_are_all_stored_once(
    tmp_path: Path,
) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=0)
    server.start()
    bus = Bus(server.url, use_uvloop=False)
    bus.start()
    try:
        subjects = Subjects("restart")
        JetStream(bus, subjects).setup(max_age_s=0, max_bytes=-1)
        outbox = EventOutbox(bus, subjects, retry_for_s=30, ack_timeout_s=0.5)
        outbox.start()
        before, during, after = alarms(1000), alarms(100), alarms(100)
        for event in before:
            outbox.emit(event)
        server.kill()  # SIGKILL, with events in flight
        wait_until(lambda: not bus.nc.is_connected, what="the bus sees the server gone")
        for event in during:
            outbox.emit(event)
        server.start()  # same port and store
        for event in after:
            outbox.emit(event)
        settled(outbox, timeout=20)
        ids = [e.id for e in stored_events(bus, "restart")]
        outbox.close()
    finally:
        bus.stop()
        server.stop()
    assert len(ids) == len(set(ids))  # a retried event whose ack was lost is stored once
    assert {e.id for e in before + during + after} <= set(ids)
    assert outbox.lost == 0


def test_events_in_flight_when_the_connection_drops_are_sent_again_once_it_is_back(
    tmp_path: Path,
) -> None:
    server = EmbeddedServer(tmp_path / "nats", port=0)
    server.start()
    assert server.pid is not None
    bus = Bus(server.url, use_uvloop=False)
    bus.start()
    try:
        subjects = Subjects("inflight")
        JetStream(bus, subjects).setup(max_age_s=0, max_bytes=-1)
        # An ack timeout no test waits out: only the reconnection can send them again.
        outbox = EventOutbox(bus, subjects, retry_for_s=120, ack_timeout_s=60)
        outbox.start()
        os.kill(server.pid, signal.SIGSTOP)  # it takes them in and answers nothing
        sent_before = bus.nc.stats["out_msgs"]
        events = alarms(200)
        for event in events:
            outbox.emit(event)
        wait_until(
            lambda: bus.nc.stats["out_msgs"] - sent_before >= len(events),
            what="every event sent to the stopped server",
        )
        server.kill()
        wait_until(lambda: not bus.nc.is_connected, what="the bus sees the server gone")
        server.start()  # same port and store
        settled(outbox, timeout=15)
        ids = [e.id for e in stored_events(bus, "inflight")]
        outbox.close()
    finally:
        bus.stop()
        server.stop()
    assert sorted(ids) == sorted(e.id for e in events)
    assert (outbox.failed, outbox.lost) == (len(events), 0)


def test_a_clean_stop_stores_what_was_emitted_before_it(
    gatefleet: Orchestrator,
    bus: Bus,
    prefix: str,
    settings: Settings,
    start_orchestrator: Callable[[Settings], Orchestrator],
    event_log: EventLog,
) -> None:
    assert gatefleet.events is not None
    batch = alarms(500)  # stored well within the stop's 2 s, even on a loaded machine
    for event in batch:
        gatefleet.events.emit(event)
    gatefleet.stop()
    stored = stored_events(bus, prefix)
    assert {e.id for e in batch} <= {e.id for e in stored}
    assert isinstance(stored[-1], OrchestratorStopped)
    assert stored[-1].events_lost == 0

    again = start_orchestrator(settings)  # after a clean stop: nothing to record
    assert again.events is not None
    event_log.wait_for(lambda e: isinstance(e, OrchestratorStarted))
    settled(again.events)
    assert not [e for e in stored_events(bus, prefix) if isinstance(e, AuditGap)]


def test_a_stop_while_the_stream_refuses_counts_the_rest_and_the_next_start_says_so(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings()  # retries outlast the stop's wait
    first = start_orchestrator(settings)
    assert first.events is not None
    settled(first.events)
    [started] = stored_events(bus, prefix)
    limit_stream(bus, prefix, max_msgs=1)
    for event in alarms(5):
        first.events.emit(event)
    first.stop()
    assert "5 events could not be stored before the stop" in caplog.text
    assert stored_events(bus, prefix) == [started]  # no orchestrator.stopped

    limit_stream(bus, prefix, max_msgs=-1)
    second = start_orchestrator(settings)
    assert second.events is not None
    settled(second.events)
    gap = stored_events(bus, prefix)[1]
    assert isinstance(gap, AuditGap)
    assert (gap.cause, gap.since) == ("unclean_stop", started.ts)


def test_a_killed_run_is_recorded_as_a_gap_by_the_next_start(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    bus: Bus,
    prefix: str,
    event_log: EventLog,
    tmp_path: Path,
) -> None:
    settings = make_settings()
    config = tmp_path / "killed.toml"
    config.write_text(
        f'[bus]\nurl = "{settings.bus.url}"\nsubject_prefix = "{prefix}"\n'
        f'data_dir = "{tmp_path / "killed"}"\n[health]\nprobe_interval_ms = 0\n'
        f"[audit]\nmax_bytes = {settings.audit.max_bytes}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gatefleet", "up", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        event_log.wait_for(lambda e: isinstance(e, OrchestratorStarted), timeout=30)
        wait_until(lambda: stored_count(bus, prefix) == 1, what="its start stored")
    finally:
        process.kill()
        process.wait(10)
    [last] = stored_events(bus, prefix)

    # The killed run's lease is waited out (a short one here): the next start leads
    # only then, and records the gap as it takes over.
    gatefleet = start_orchestrator(make_settings(cluster={"lease_ms": 1000}))
    assert gatefleet.events is not None
    wait_until(gatefleet.lease.still_leader, what="the next start leads")
    wait_until(
        lambda: any(isinstance(e, AuditGap) for e in stored_events(bus, prefix)),
        what="the gap stored",
    )
    settled(gatefleet.events)
    stored = stored_events(bus, prefix)
    [gap] = [e for e in stored if isinstance(e, AuditGap)]
    assert (gap.cause, gap.since, gap.events_lost) == ("unclean_stop", last.ts, None)
    assert last.ts < gap.until <= datetime.now(UTC)
    assert isinstance(stored[1], OrchestratorStarted)  # the next run's, from its start

    [line] = audit_lines(settings, tmp_path, "--type", "audit.gap")
    assert f"may miss events from {last.ts:%Y-%m-%d %H:%M:%S}" in line


def test_which_last_event_means_a_gap() -> None:
    stored_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert unclean_stop_gap(OrchestratorStopped(events_lost=0), stored_at) is None
    other = Alarm(kind="k", message="m", active=True, ts=stored_at - timedelta(seconds=9))
    gap = unclean_stop_gap(other, stored_at)
    assert gap is not None
    assert (gap.cause, gap.since, gap.events_lost) == ("unclean_stop", other.ts, None)
    unreadable = unclean_stop_gap(None, stored_at)  # an event this release cannot decode
    assert unreadable is not None
    assert unreadable.since == stored_at


def test_the_outbox_logs_an_event_emitted_after_it_closed(
    bus: Bus, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    subjects = Subjects(prefix)
    JetStream(bus, subjects).setup(max_age_s=0, max_bytes=16 * 1024 * 1024)
    outbox = EventOutbox(bus, subjects, retry_for_s=30)
    outbox.start()
    outbox.close()
    with caplog.at_level(logging.ERROR):
        outbox.emit(Alarm(kind="late", message="after stop", active=True))
    assert outbox.lost == 1
    assert "emitted after the event outbox closed" in caplog.text
