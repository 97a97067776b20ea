"""Every NATS subject gatefleet uses, built in one place from the configured prefix.

Gateway ids are validated before they go into a subject, so an id can never smuggle a
`.`, `*` or `>` into one. Wildcards appear only in the subscription patterns here.
"""

from __future__ import annotations

from schemas.types import GATEWAY_ID_RE


class InvalidGatewayId(ValueError):
    """A gateway id that is not 1-64 chars of [A-Za-z0-9_-]."""


def check_gateway_id(gateway_id: str) -> str:
    if not GATEWAY_ID_RE.fullmatch(gateway_id):
        raise InvalidGatewayId(f"invalid gateway id {gateway_id!r}: need 1-64 of [A-Za-z0-9_-]")
    return gateway_id


class Subjects:
    """Subjects under one prefix (default `gatefleet`)."""

    def __init__(self, prefix: str = "gatefleet") -> None:
        self.prefix = prefix

    # Gateway side (PROTOCOL.md section 1).
    def heartbeat(self, gateway_id: str) -> str:
        return f"{self.prefix}.gw.{check_gateway_id(gateway_id)}.heartbeat"

    def config(self, gateway_id: str) -> str:
        return f"{self.prefix}.gw.{check_gateway_id(gateway_id)}.config"

    def ping(self, gateway_id: str) -> str:
        return f"{self.prefix}.gw.{check_gateway_id(gateway_id)}.ping"

    def goodbye(self, gateway_id: str) -> str:
        return f"{self.prefix}.gw.{check_gateway_id(gateway_id)}.goodbye"

    def redirect(self, gateway_id: str) -> str:
        return f"{self.prefix}.redirect.{check_gateway_id(gateway_id)}"

    @property
    def all_heartbeats(self) -> str:
        return f"{self.prefix}.gw.*.heartbeat"

    @property
    def all_goodbyes(self) -> str:
        return f"{self.prefix}.gw.*.goodbye"

    @property
    def malformed_gateway(self) -> str:
        """Subjects with more tokens than `P.gw.<id>.<verb>`: an id with a dot in it."""
        return f"{self.prefix}.gw.*.*.>"

    # Client side (PROTOCOL.md section 2).
    def api(self, name: str) -> str:
        """`P.api.<name>`, e.g. api("select-gateway")."""
        return f"{self.prefix}.api.{name}"

    def replica_api(self, replica_id: str, name: str) -> str:
        """`P.replica.<replica_id>.api.<name>`: one replica's own endpoint, where the
        other replicas forward what only the leader may do."""
        return f"{self.prefix}.replica.{replica_id}.api.{name}"

    @property
    def replica_probes(self) -> str:
        """`P.replica.probes`: the leader's probe results, for the other replicas."""
        return f"{self.prefix}.replica.probes"

    @staticmethod
    def service_discovery(verb: str, name: str, service_id: str) -> list[str]:
        """The NATS micro `$SRV.<verb>` subjects a service answers: for every service, for
        every one of that name, and for this one (`verb` is PING, INFO or STATS)."""
        return [f"$SRV.{verb}", f"$SRV.{verb}.{name}", f"$SRV.{verb}.{name}.{service_id}"]

    # Events and audit (section 3).
    def event(self, event_type: str) -> str:
        return f"{self.prefix}.events.{event_type}"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"
