"""`gatefleet up` as a user runs it: start on the embedded server, answer, stop cleanly.

Each test runs the real console script in a subprocess and checks that no nats-server
child outlives it, whatever the way it ends (SIGINT, SIGTERM, SIGKILL, failed start).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.server import EmbeddedServer

GATEFLEET = [sys.executable, "-m", "gatefleet"]
READY_RE = re.compile(r"gatefleet ready in ([0-9.]+)s: embedded nats-server at (nats://\S+),")


class Running:
    """A `gatefleet up` subprocess whose stderr is read in the background."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [*GATEFLEET, "up", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        self.startup_s = 0.0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := READY_RE.search(line):
                self.startup_s, self.url = float(match.group(1)), match.group(2)
                self.ready.set()

    def wait_ready(self, timeout: float = 10.0) -> None:
        assert self.ready.wait(timeout), "".join(self.lines)

    def server_pid(self) -> int:
        """The nats-server child (of any of gatefleet's threads: a restarted server is
        the watchdog thread's)."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        pids = [int(p) for task in tasks.iterdir() for p in (task / "children").read_text().split()]
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
        [pid] = [pid for pid, name in names.items() if name == "nats-server"]
        return pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def config(tmp_path: Path, prefix: str) -> Path:
    path = tmp_path / "gatefleet.toml"
    path.write_text(
        f'[bus]\nport = 0\nsubject_prefix = "{prefix}"\ndata_dir = "{tmp_path / "data"}"\n'
    )
    return path


@pytest.fixture
def running(config: Path) -> Iterator[Running]:
    gatefleet = Running(config)
    yield gatefleet
    if gatefleet.process.poll() is None:
        gatefleet.process.kill()
    gatefleet.process.wait()
    gatefleet.reader.join(5)
    assert gatefleet.process.stderr is not None
    gatefleet.process.stderr.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEFLEET, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_up_is_ready_fast_and_answers_status(running: Running, config: Path) -> None:
    running.wait_ready()
    assert running.startup_s < 5.0
    result = run_cli("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["status"] == "ok"
    assert status["gateways_managed"] == 0
    assert status["load_balancing_strategy"] == "RoundRobin"
    human = run_cli("status", "--config", str(config))
    assert "gateways managed" in human.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_everything_within_5s(running: Running, signum: int) -> None:
    running.wait_ready()
    server = running.server_pid()
    started = time.monotonic()
    running.process.send_signal(signum)
    assert running.process.wait(timeout=5) == 0
    assert time.monotonic() - started < 5.0
    assert wait_dead(server), "nats-server outlived gatefleet"
    assert any("stopped" in line for line in running.lines)


def test_sigkill_leaves_no_orphan_server(running: Running) -> None:
    running.wait_ready()
    server = running.server_pid()
    running.process.kill()
    running.process.wait()
    assert wait_dead(server), "nats-server outlived a SIGKILLed gatefleet"


def test_failed_start_stops_the_server(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    # The embedded server cannot bind a port that is taken: start-up fails in one line.
    taken = int(nats_server.url.rsplit(":", 1)[1])
    config = tmp_path / "taken.toml"
    config.write_text(f'[bus]\nport = {taken}\ndata_dir = "{tmp_path / "d"}"\n')
    result = run_cli("up", "--config", str(config))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gatefleet: cannot start: nats-server did not become ready")
    assert "Traceback" not in result.stderr
    survivors = [
        p
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if str(tmp_path / "d") in p.read_bytes().decode(errors="replace")
    ]
    assert survivors == []


def test_unreachable_nats_is_one_line(tmp_path: Path) -> None:
    result = run_cli("up", "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[orchestrator]\nhealth_treshold_percent = 80\n")
    result = run_cli("up", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"gatefleet: {config}: orchestrator.health_treshold_percent: unknown key"
        " (did you mean 'health_threshold_percent'?)"
    )


def test_client_against_no_server_is_one_line(tmp_path: Path) -> None:
    result = run_cli("status", "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_events_survive_a_restart_on_the_embedded_server(tmp_path: Path) -> None:
    from bus.runtime import Bus  # noqa: PLC0415 - only this test needs a raw bus

    data = tmp_path / "persist"
    with EmbeddedServer(data) as server:
        bus = Bus(server.url, use_uvloop=False)
        bus.start()
        bus.run(bus.js.add_stream(name="KEEP", subjects=["keep.>"]))
        bus.run(bus.js.publish("keep.a", b"1"))
        bus.stop()
    with EmbeddedServer(data) as server:
        bus = Bus(server.url, use_uvloop=False)
        bus.start()
        info = bus.run(bus.js.stream_info("KEEP"))
        bus.stop()
    assert info.state.messages == 1


def test_a_dead_embedded_server_is_restarted_and_the_fourth_death_ends_up(
    running: Running, config: Path
) -> None:
    """The embedded nats-server killed under `gatefleet up`: started again on the same
    port and store, status answers again; past 3 restarts in 5 minutes, `up` exits 1 with
    one line saying why."""
    running.wait_ready()
    for death in range(1, 4):
        old = running.server_pid()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:  # a new child, answering status on the same URL
            time.sleep(0.1)
            assert time.monotonic() < deadline, f"no new server after death {death}"
            try:
                if running.server_pid() == old:
                    continue
            except ValueError:  # between the old and the new child
                continue
            result = run_cli("status", "--config", str(config), "--json")
            if result.returncode == 0:
                break
        assert json.loads(result.stdout)["status"] == "ok"
    os.kill(running.server_pid(), signal.SIGKILL)
    assert running.process.wait(timeout=20) == 1
    log = "".join(running.lines)
    assert "died 4 times in 5 minutes" in log
    assert "Traceback" not in log
