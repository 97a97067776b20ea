"""Fleet scale and faults: what an overloaded, blind or restarting orchestrator does.

Real nats-servers throughout: the session's for most, and one per test that kills and
restarts its own (an external server, `[bus] url` set). Heartbeats are fast (100 ms, fall
3) so that a false `gateway.down` would show within a fraction of a second.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import actors.base
import actors.paging
import actors.strategies
from actors.dispatch import Pool, PooledActor
from actors.runtime import GATEWAY_WORKERS
from bus.connection import ClientAuth
from bus.runtime import Bus, Inbound
from bus.server import EmbeddedServer
from gatefleet.app import Orchestrator
from gatefleet.client import GatefleetClient, Unavailable
from gatefleet.gateway import GatewayAgent
from schemas.api import DistributionListReply, ErrorReply
from schemas.codec import decode
from schemas.events import GatewayDown, decode_event
from schemas.settings import Settings
from tests.conftest import EventLog, SettingsFactory, wait_until
from tests.fleet import Fleet

FAST = {"heartbeat_interval_ms": 100, "fall": 3, "rise": 2}


def downs(event_log: EventLog, since: int = 0) -> list[str]:
    return [e.gateway_id for e in event_log.of_type(GatewayDown)[since:]]


# --- a blind or slow orchestrator accuses nobody ------------------------------------------


def test_a_stalled_loop_marks_nobody_down_and_still_detects_a_real_stop(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    orchestrator = start_orchestrator(make_settings(health=FAST))
    agents = [fleet.add(f"gw-{n}", interval_s=0.1) for n in range(5)]
    wait_until(lambda: fleet.status().gateways_healthy == 5, what="5 healthy")
    bus = orchestrator.bus
    assert bus is not None

    # gatefleet's own loop stalls for 1.5 s: no heartbeat can be seen, for 15 intervals.
    bus.call_soon(time.sleep, 1.5)
    wait_until(lambda: fleet.status().detection_suspended_s > 1.0, what="a suspension recorded")
    # Given every chance to accuse: several intervals after the stall.
    wait_until(lambda: agents[0].beats_sent > 30, what="beats after the stall")
    assert downs(event_log) == []
    status = fleet.status()
    assert status.gateways_healthy == 5
    assert status.orchestrator_max_lag_ms > 1000

    # A gateway that really stops is still detected: within (fall + 1) x interval after
    # it went silent, with some slack for a loaded machine.
    mark = len(event_log.of_type(GatewayDown))
    fleet.stop("gw-4", goodbye=False)
    stopped = time.monotonic()
    event_log.wait_for(lambda e: isinstance(e, GatewayDown) and e.gateway_id == "gw-4", timeout=5)
    assert time.monotonic() - stopped < 2.0
    assert downs(event_log, mark) == ["gw-4"]


@pytest.mark.slow
def test_short_stalls_neither_hide_a_stopped_gateway_nor_accuse_live_ones(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
) -> None:
    """gatefleet's loop stalls for 0.3 s, with 0.3 s between stalls, 8 times. Heartbeats
    every 0.2 s: each stall is longer than the lag threshold (0.1 s), shorter than the
    shedding one (0.4 s) and than (fall + 1/2) x interval (0.7 s). A gateway that stopped
    just before is declared down during the series, in a window where gatefleet sees: a
    mere lag restarts nobody's detection clock. Those that kept beating, whose heartbeats
    were only delayed, are not declared down."""
    orchestrator = start_orchestrator(make_settings(health={**FAST, "heartbeat_interval_ms": 200}))
    for n in range(5):
        fleet.add(f"gw-{n}", interval_s=0.2)
    wait_until(lambda: fleet.status().gateways_healthy == 5, what="5 healthy")
    bus = orchestrator.bus
    assert bus is not None

    def stall(done: threading.Event) -> None:  # on gatefleet's loop
        time.sleep(0.3)
        done.set()

    fleet.stop("gw-4", goodbye=False)
    series_over = threading.Event()

    def stalls() -> None:
        for _ in range(8):
            done = threading.Event()
            bus.call_soon(stall, done)
            done.wait(5.0)
            time.sleep(0.3)  # a window to see in: the input, nothing to wait on
        series_over.set()

    staller = threading.Thread(target=stalls, name="staller")
    staller.start()
    try:
        event_log.wait_for(
            lambda e: isinstance(e, GatewayDown) and e.gateway_id == "gw-4", timeout=10
        )
        assert not series_over.is_set(), "detected only once the stalls were over"
    finally:
        staller.join()
    status = fleet.status()
    assert status.detection_suspended_s > 1.0
    # Given every chance to accuse: several intervals after the last stall.
    beats = fleet.agents["gw-0"].beats_sent
    wait_until(lambda: fleet.agents["gw-0"].beats_sent > beats + 5, what="beats after the stalls")
    assert downs(event_log) == ["gw-4"]


class Blocker(PooledActor):
    """Holds a worker of its dispatcher until told to let go."""

    def __init__(self, dispatcher: Pool) -> None:
        super().__init__(dispatcher=dispatcher)

    def on_receive(self, message: Any) -> Any:
        holding, release = message
        holding.set()
        release.wait(10.0)


@pytest.mark.slow
def test_a_check_dated_while_seeing_counts_however_late_the_pool_runs_it(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    event_log: EventLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway pool is held while a stopped gateway's down check falls due, gatefleet
    seeing (1 s heartbeats, fall 1: that check is due 1.5 s after its last heartbeat).
    Then gatefleet's loop stalls for 1 s, and the pool is let go 0.7 s into the stall,
    past the lag threshold: the check counts at the date it fell due, and the gateway is
    declared down right then, not parked until gatefleet sees again."""
    orchestrator = start_orchestrator(
        make_settings(health={"heartbeat_interval_ms": 1000, "fall": 1, "rise": 1})
    )
    agent = fleet.add("gw-0", interval_s=1.0)
    wait_until(lambda: fleet.status().gateways_healthy == 1, what="healthy")
    fleet.stop("gw-0", goodbye=False)
    stopped = time.monotonic()
    wait_until(lambda: fleet.gateways()["gw-0"].last_seq == agent.seq, what="its last heartbeat")
    assert orchestrator.runtime is not None
    bus = orchestrator.bus
    assert bus is not None
    release = threading.Event()
    blockers = [Blocker.start(orchestrator.runtime.gateways) for _ in range(GATEWAY_WORKERS)]
    try:
        for blocker in blockers:
            holding = threading.Event()
            blocker.tell((holding, release))
            assert holding.wait(5.0), "a gateway worker not held"
        assert time.monotonic() - stopped < 0.5, "held too late to hold up its check"
        time.sleep(max(0.0, stopped + 1.6 - time.monotonic()))  # the check fell due

        stall_began, stall_ended = threading.Event(), [0.0]

        def stall() -> None:  # on gatefleet's loop
            stall_began.set()
            time.sleep(1.0)
            stall_ended[0] = time.time()

        bus.call_soon(stall)
        assert stall_began.wait(5.0)
        time.sleep(0.7)  # the input: the pool runs the check late in the stall
        release.set()
        event_log.wait_for(lambda e: isinstance(e, GatewayDown), timeout=5)
    finally:
        release.set()
        for blocker in blockers:
            blocker.stop()
    decided = [r for r in caplog.records if r.getMessage().startswith("gateway gw-0: ")]
    assert decided, "no down logged"
    assert "-> down" in decided[-1].getMessage()
    assert decided[-1].created < stall_ended[0], "decided only once gatefleet saw again"


def test_a_restarted_nats_server_loses_no_gateway_and_status_answers(
    tmp_path: Path,
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    prefix: str,
) -> None:
    """External server (`[bus] url`), killed with SIGKILL and started again on the same
    port and store: gatefleet resubscribes, answers status within 5 s of the server being
    back, and no gateway is reported down for gatefleet's own outage. A gateway that stayed
    away is detected within reconnect_grace + (fall + 1) x interval."""
    store = tmp_path / "server"
    server = EmbeddedServer(store, port=0)
    server.start()
    port = int(server.url.rsplit(":", 1)[1])
    settings = make_settings(
        bus={"url": server.url},
        health={**FAST, "reconnect_grace_ms": 1000},
    )
    orchestrator = start_orchestrator(settings)
    gateways = Bus(server.url, name="test-gateways")  # the gateways' own connection
    gateways.start()
    agents = []
    try:
        for n in range(6):
            agent = GatewayAgent(gateways.nc, f"gw-{n}", "us-west", prefix=prefix, interval_s=0.1)
            gateways.run(agent.start())
            agents.append(agent)
        with GatefleetClient(server.url, prefix=prefix) as client:
            wait_until(lambda: client.status().gateways_healthy == 6, what="6 healthy")

        server.kill()
        time.sleep(1.0)  # the outage itself: nothing to wait on, it is the input
        gateways.run(agents[5].stop(goodbye=False))  # one gateway does not come back
        server = EmbeddedServer(store, port=port)
        server.start()
        back = time.monotonic()

        events = EventLog()
        watcher = Bus(server.url, name="test-events")
        watcher.start()
        watcher.subscribe(f"{prefix}.events.>", lambda m: events.add(decode_event(m.data)))
        try:
            with GatefleetClient(server.url, prefix=prefix, timeout=2.0) as client:

                def answers() -> bool:
                    try:
                        return client.status().gateways_managed == 6
                    except Exception:
                        return False

                wait_until(answers, timeout=5, what="status answered after the restart")
                assert time.monotonic() - back < 5.0
                # The one that stayed away is detected, and only it.
                down = events.wait_for(lambda e: isinstance(e, GatewayDown), timeout=6)
                assert isinstance(down, GatewayDown)
                assert down.gateway_id == "gw-5"
                assert time.monotonic() - back < 1.0 + 4 * 0.1 + 3.0  # slack: reconnect time
                wait_until(lambda: client.status().gateways_healthy == 5, what="the others healthy")
                assert [e.gateway_id for e in events.of_type(GatewayDown)] == ["gw-5"]
                assert client.status().detection_suspended_s > 0.5
        finally:
            watcher.stop()
    finally:
        for agent in agents[:5]:
            gateways.run(agent.stop(goodbye=False))
        gateways.stop()
        orchestrator.stop()
        server.stop()


# --- shed, don't drown --------------------------------------------------------------------


def test_requests_past_a_full_lane_get_unavailable_at_once(
    make_settings: SettingsFactory,
    start_orchestrator: Callable[[Settings], Orchestrator],
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
) -> None:
    """An actor with a thread of its own (the distributor) stuck on one request: the
    next 5 wait, the rest are shed at once. (The load balancer runs on the API lane's
    loop, where a stuck handler would stall the lane itself: it must never block.)"""
    monkeypatch.setattr(actors.base, "MAX_PENDING_REQUESTS", 5)
    held, release = threading.Event(), threading.Event()
    real_page = actors.paging.distributions_page

    def slow_page(*args: Any, **kwargs: Any) -> Any:  # a handler stuck for a while
        held.set()
        release.wait(10)
        return real_page(*args, **kwargs)

    monkeypatch.setattr("actors.distributor.distributions_page", slow_page)
    start_orchestrator(make_settings())
    bus = fleet.bus
    replies: list[tuple[float, bytes]] = []
    lock = threading.Lock()

    def on_reply(msg: Inbound) -> None:
        with lock:
            replies.append((time.monotonic(), msg.data))

    inbox = f"{prefix}-replies"
    bus.subscribe(f"{inbox}.*", on_reply)
    subject = f"{prefix}.api.distributions.list"
    sent = time.monotonic()
    bus.call_soon(bus.spawn, bus.nc.publish(subject, b"{}", f"{inbox}.0"))
    assert held.wait(5)
    for n in range(1, 21):  # 5 wait behind the stuck one, the rest are shed
        bus.call_soon(bus.spawn, bus.nc.publish(subject, b"{}", f"{inbox}.{n}"))
    wait_until(lambda: len(replies) >= 15, what="the shed replies")
    with lock:
        shed = [decode(data, ErrorReply) for _, data in replies]
        fast = max(at for at, _ in replies) - sent
    assert len(shed) == 15
    assert {r.error.code for r in shed} == {"unavailable"}
    assert fast < 2.0  # at once, not after the stuck request
    release.set()
    wait_until(lambda: len(replies) == 21, what="the waiting requests answered")
    with lock:
        answered = [msgspec.json.decode(data) for _, data in replies[15:]]
    assert all("error" not in a for a in answered)
    assert decode(replies[-1][1], DistributionListReply).distributions == []
    assert fleet.status().shed == {"requests": 15}


# --- a clean stop under load --------------------------------------------------------------


@pytest.mark.slow
def test_sigint_with_thousands_of_gateways_stops_cleanly_within_10s(tmp_path: Path) -> None:
    config = tmp_path / "gatefleet.toml"
    config.write_text(f'[bus]\nport = 0\ndata_dir = "{tmp_path / "data"}"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "gatefleet", "up", "--config", str(config), "--simulate", "3000"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        url_file = tmp_path / "data" / "nats.url"
        wait_until(url_file.exists, timeout=20, what="gatefleet up")
        admin = ClientAuth(creds=str(tmp_path / "data" / "auth" / "admin.creds"))
        with GatefleetClient(url_file.read_text().strip(), timeout=5, auth=admin) as client:

            def managed() -> int:
                try:
                    return client.status().gateways_managed
                except Unavailable:  # still starting
                    return -1

            wait_until(lambda: managed() == 3000, timeout=40, what="3,000 registered", show=managed)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - started < 10.0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(5)
        if process.stderr is not None:
            process.stderr.close()
    log = "".join(lines)
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert "stopped" in log
