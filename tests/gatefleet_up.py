"""`gatefleet up --config <file>` in a subprocess, as an operator runs it: tests that
SIGKILL it (a crash) and start it again. Its stderr is kept beside the config
(`gatefleet.log`), to read after a failure (pytest keeps the last runs' temp dirs)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

READY_TIMEOUT_S = 15.0


class GatefleetUp:
    """`gatefleet up --config <file>` in a subprocess, its stderr drained in the background
    into `lines` and the log file beside the config."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gatefleet", "up", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.log_path = config.with_name("gatefleet.log")
        self.ready = threading.Event()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("a") as log:
            for line in self.process.stderr:
                self.lines.append(line)
                log.write(line)
                log.flush()
                if "gatefleet ready" in line:
                    self.ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        assert self.ready.wait(timeout), "".join(self.lines)

    def kill(self, signum: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.wait(10)
        self._drainer.join(5)
        assert self.process.stderr is not None
        self.process.stderr.close()
