"""A real nats-server cluster for tests: three nodes (the bundled binary) routed on
loopback ports, JetStream on temp dirs, each node with its own name (n1, n2, n3).

A node can be SIGKILLed and started again on the same ports and store, as a crashed
machine coming back. The bus is open (no auth). Operator mode would work the same way
(every node gets the same `ServerAuth`: operator JWT, system account, a full resolver
of its own, which the nodes keep in step among themselves), but no test needs it yet.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

from bus.connection import BusError
from bus.runtime import Bus
from bus.server import EmbeddedServer, ServerCluster

CLUSTER_NAME = "gatefleet-test"
READY_TIMEOUT_S = 30.0


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now: all held at once, so that no two are the same."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class NatsCluster:
    """`size` nodes routed to each other; `url` lists them all, as `[bus] url` would."""

    def __init__(self, base: Path, size: int = 3) -> None:
        ports = free_ports(2 * size)
        client_ports, route_ports = ports[:size], ports[size:]
        routes = tuple(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        self.nodes = [
            EmbeddedServer(
                base / f"n{i + 1}",
                port=client_ports[i],
                cluster=ServerCluster(CLUSTER_NAME, f"n{i + 1}", route_ports[i], routes),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_for_jetstream()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, index: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Starts a killed node again on its ports and store; returns once JetStream answers."""
        self.nodes[index].start()
        self.wait_for_jetstream()

    def index_of(self, server_name: str) -> int:
        return next(i for i, node in enumerate(self.nodes) if node.server_name == server_name)

    def wait_for_jetstream(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until JetStream answers through the live nodes: the meta leader is elected (a
        JetStream API call made before gets "temporarily unavailable")."""
        live = ",".join(url for url, node in zip(self.urls, self.nodes, strict=True) if node.pid)
        bus = Bus(live, name="cluster-check", use_uvloop=False)
        bus.start(connect_timeout=timeout)
        deadline, answer = time.monotonic() + timeout, "nothing"
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(BusError):
                    answer = bus.ask("$JS.API.INFO", b"", timeout=1.0).decode()
                    if "error" not in json.loads(answer):
                        return
                time.sleep(0.1)
        finally:
            bus.stop()
        raise AssertionError(f"JetStream did not answer within {timeout}s: {answer}")

    def stream_leader(self, stream: str) -> int:
        """The index of the node leading `stream` (a KV bucket's is `KV_<bucket>`)."""
        bus = Bus(self.url, name="cluster-check", use_uvloop=False)
        bus.start()
        try:
            info = json.loads(bus.ask(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5.0))
        finally:
            bus.stop()
        return self.index_of(info["cluster"]["leader"])
