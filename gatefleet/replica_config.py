"""Replicas must decide alike: the settings that change decisions, written by the leader
(`leader.config` in the `settings` bucket) and compared by every replica that starts as a
standby, which logs each key that differs (issue 16)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from bus.jetstream import KvStore
from schemas.codec import DecodeError
from schemas.settings import Settings
from schemas.stored import LeaderConfig

log = logging.getLogger(__name__)

LEADER_CONFIG_KEY = "leader.config"
# The sections whose values change what gatefleet decides (the subject prefix is shared
# by definition: replicas of another prefix are another fleet).
DECIDING = ("orchestrator", "health", "load_balancing", "ha", "regions", "gateways")


def deciding_settings(settings: Settings) -> dict[str, str]:
    """Every deciding setting as a dotted key and its JSON text."""
    flat: dict[str, str] = {}
    for section in DECIDING:
        _flatten(section, msgspec.to_builtins(getattr(settings, section)), flat)
    return flat


def _flatten(path: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{path}.{key}", inner, into)
    else:
        into[path] = msgspec.json.encode(value).decode()


def differences(mine: dict[str, str], leaders: dict[str, str]) -> list[str]:
    """`key: mine vs the leader's` for each deciding setting that differs."""
    return [
        f"{key}: {mine.get(key, '(unset)')} here, {leaders.get(key, '(unset)')} at the leader"
        for key in sorted(mine.keys() | leaders.keys())
        if mine.get(key) != leaders.get(key)
    ]


def publish(bucket: KvStore, replica_id: str, settings: Settings) -> None:
    """The leader's deciding settings, for replicas that start later (without waiting)."""
    bucket.put_soon(
        LEADER_CONFIG_KEY, LeaderConfig(replica_id=replica_id, settings=deciding_settings(settings))
    )


def compare_with_leader(bucket: KvStore, leader: str, settings: Settings) -> list[str]:
    """Logs (and returns) how this replica's deciding settings differ from the leader's."""
    try:
        stored = bucket.get(LEADER_CONFIG_KEY, LeaderConfig)
    except DecodeError:
        return []  # the leader rewrites it when it next takes the lease
    if stored is None or stored.replica_id != leader:
        return []
    found = differences(deciding_settings(settings), stored.settings)
    if found:
        log.warning(
            "this replica's settings differ from the leader %s's in %d keys (decisions may "
            "differ after a take-over): %s",
            leader,
            len(found),
            "; ".join(found),
        )
    return found
