"""Progressive delivery's pure rules, besides the state machine: no threads, no I/O.

How a `rollout` splits targets into batches (a canary first, alone), what a dry run
answers, which gateways an automatic rollback pushes, and the phase a distribution is in,
as `gatefleet distributions` shows it. The DistributionMachine (actors/distribution_machine.py)
and the DistributorActor use them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from schemas.api import Distribution, GatewayDelivery, Rollout

# A gateway sent the new version may run it, unless it rejected it (it keeps its last
# good configuration then).
REJECTED = "nacked"


def canary_count(rollout: Rollout | None, targets: int) -> int:
    """How many of `targets` gateways the canary takes: its count, or its share rounded
    up (a share of a non-empty fleet is at least one gateway); never more than all."""
    if rollout is None:
        return 0
    canary = rollout.canary
    if isinstance(canary, str):
        count = math.ceil(targets * float(canary.removesuffix("%")) / 100 - 1e-9)
    else:
        count = canary
    return max(0, min(count, targets))


def has_canary(rollout: Rollout | None) -> bool:
    """Whether its first batch is a canary (for a fleet of at least one gateway)."""
    return canary_count(rollout, 1) > 0


def split_batches(targets: Sequence[str], batch_size: int, canary: int) -> list[list[str]]:
    """`targets` in batch order: the first `canary` alone, then batches of `batch_size`."""
    batches = [list(targets[:canary])] if canary else []
    rest = targets[canary:]
    batches += [list(rest[n : n + batch_size]) for n in range(0, len(rest), batch_size)]
    return batches


def batches_left(pending: int, batch_size: int, canary: int) -> int:
    """Batches still to send for `pending` gateways (`canary`: the canary's, not yet sent)."""
    rest = max(0, pending - canary)
    return (1 if canary else 0) + math.ceil(rest / batch_size)


def rollback_targets(record: Distribution) -> list[str]:
    """The gateways an automatic rollback pushes: every one that may run the new version
    (it acked, or was sent it without rejecting it), in target order."""
    states = record.gateways
    return [
        gw
        for gw in record.target_gateways
        if states[gw].attempts > 0 and states[gw].state != REJECTED
    ]


def split_by_previous(
    gateways: Iterable[str], previous: Mapping[str, int | None]
) -> tuple[int | None, list[str], dict[str, str]]:
    """The version a rollback restores (the newest previous version among `gateways`),
    the gateways it pushes (those whose previous version is that one), and those it only
    lists, with why (none, or another previous version)."""
    known = [v for gw in gateways if (v := previous.get(gw)) is not None]
    restores = max(known) if known else None
    pushed: list[str] = []
    listed: dict[str, str] = {}
    for gw in gateways:
        version = previous.get(gw)
        if version is None:
            listed[gw] = "no previous version: not rolled back"
        elif version != restores:
            listed[gw] = f"its previous version is {version}, not {restores}: not rolled back"
        else:
            pushed.append(gw)
    return restores, pushed, listed


def phase(record: Distribution, now: datetime, blocked_by: Distribution | None = None) -> str:
    """Where a distribution stands, for people (`gatefleet distributions`)."""
    status, batch = record.status, record.batch
    if blocked_by is not None:
        return f"waits behind {blocked_by.id} ({blocked_by.status})"
    if status == "scheduled" and record.rollout and record.rollout.not_before:
        return f"scheduled: not before {record.rollout.not_before.isoformat()}"
    if status == "rolling_back":
        return f"rolling back ({', '.join(record.rollbacks) or 'starting'})"
    if status not in ("in_progress", "paused"):
        return status.replace("_", " ")
    canary = batch == 1 and has_canary(record.rollout)
    where = "canary" if canary else f"batch {batch} of {record.batch_count or '?'}"
    if batch == 0:
        where = "starting"
    if record.gate_until is not None:
        left = max(0.0, (record.gate_until - now).total_seconds())
        where = f"health gate of {where}: {left:.1f}s left"
    if status == "paused":
        after = batch and record.gated_batch == batch  # batch 0: none sent yet (or since a move)
        return f"paused after the {where}" if after else f"paused ({where})"
    return where


def delivery_counts(gateways: Mapping[str, GatewayDelivery]) -> tuple[int, int]:
    """(targets that count, targets acked): skipped ones count neither way."""
    counted = acked = 0
    for d in gateways.values():
        if d.state != "skipped":
            counted += 1
            acked += d.state == "acked"
    return counted, acked
