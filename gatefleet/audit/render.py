"""How `gatefleet audit` shows things: one line per event, a selection explained, the
fleet at a moment. Presentation only: it reads no bus."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Final

import click
import msgspec
from rich.table import Table

from bus.replay import EPOCH
from gatefleet import output
from gatefleet.audit.rerun import Tally, busiest_share
from gatefleet.audit.state import DistributionState, FleetState
from schemas.events import (
    Alarm,
    AuditGap,
    BatchSentStep,
    CandidateView,
    CreatedStep,
    DistributionEvent,
    Event,
    Failback,
    Failover,
    FinishedStep,
    GatewayAckedStep,
    GatewayDown,
    GatewayLeft,
    GatewayNackedStep,
    GatewayRecovered,
    GatewayRegistered,
    GatewayRetriedStep,
    GatewaySelected,
    GatewayStatusChanged,
    GatewayTimedOutStep,
    LoadBalancingChanged,
    OrchestratorStopped,
    PoolSnapshot,
    QueuedStep,
    Reconciliation,
    ResumedStep,
    SecurityViolation,
    SelectionBatch,
    SelectionRecord,
    VersionMovedStep,
)
from schemas.types import StrategyName


def summary(event: Event) -> tuple[str, str]:
    """(the gateway it is about, or "", one line saying what happened)."""
    match event:
        case GatewayRegistered(gateway_id=gw):
            return gw, f"registered from {event.source}, region {event.region}"
        case GatewayStatusChanged(gateway_id=gw):
            change = f"{event.old_status} -> {event.new_status}"
            return gw, f"{change}, score {event.score:.1f}: {event.reason}"
        case GatewayDown(gateway_id=gw):
            return gw, f"down after {event.missed_heartbeats} missed heartbeats: {event.reason}"
        case GatewayRecovered(gateway_id=gw):
            return gw, f"recovered, score {event.score:.1f}"
        case GatewayLeft(gateway_id=gw):
            return gw, f"left: {event.reason}"
        case LoadBalancingChanged():
            changes = [f"strategy {event.old_strategy} -> {event.new_strategy}"]
            changes *= event.old_strategy != event.new_strategy
            if event.old_threshold != event.new_threshold:
                changes.append(f"threshold {event.old_threshold:g} -> {event.new_threshold:g}")
            by = f" (by {event.requested_by})" if event.requested_by else ""
            return "", f"{', '.join(changes) or 'unchanged'}{by}"
        case GatewaySelected():
            request = ", ".join(
                f"{k} {v}" for k, v in (("region", event.region), ("client", event.client_id)) if v
            )
            picked = event.gateway_id or "nobody"
            counts = f"{candidate_count(event)} candidates, {excluded_count(event)} excluded"
            return event.gateway_id or "", (
                f"picked {picked} ({event.strategy}, {counts}{'; ' + request if request else ''})"
                f": {event.reason} [explain {event.id}]"
            )
        case SelectionBatch():
            return "", _batch_summary(event)
        case PoolSnapshot():
            part = f" (part {event.part + 1} of {event.parts})" if event.parts > 1 else ""
            return "", (
                f"pool of run {event.run} at generation {event.generation}{part}: "
                f"{len(event.rows)} gateways; {event.strategy}, threshold {event.threshold:g}"
            )
        case DistributionEvent():
            head = f"{event.step} {event.distribution_id} {event.config_type} v{event.version}"
            more = _step_details(event)
            return event.gateway_id or "", f"{head}{': ' + more if more else ''}"
        case Failover(from_gateway=gw):
            return gw, f"failover to {event.to_gateway or 'nobody'}: {event.reason}"
        case Failback(from_gateway=gw):
            return gw, f"failback to {event.to_gateway}: {event.reason}"
        case Alarm():
            state = "raised" if event.active else "cleared"
            return "", f"alarm {event.kind} {state}: {event.message}"
        case Reconciliation(gateway_id=gw):
            versions = f"reports v{event.reported_version}, desired v{event.desired_version}"
            dist = event.distribution_id or "no distribution"
            return gw, f"{event.config_type} {versions} -> {dist}: {event.reason}"
        case AuditGap(cause="unclean_stop"):
            return (
                "",
                f"may miss events from {when(event.since)} to {when(event.until)}: {event.reason}",
            )
        case AuditGap():
            return "", (
                f"{event.events_lost} events not stored, emitted from {when(event.since)}"
                f" to {when(event.until)}: {event.reason}"
            )
        case OrchestratorStopped():
            lost = f", {event.events_lost} events lost in this run" if event.events_lost else ""
            return "", f"stopped cleanly{lost}"
        case SecurityViolation():
            times = f" ({event.count} since the last report)" if event.count > 1 else ""
            return event.gateway_id or "", (
                f"{event.user} may not {event.operation} {event.subject}{times}"
            )
    return "", ""  # pragma: no cover - the match is exhaustive


def _batch_summary(event: SelectionBatch) -> str:
    picks: Counter[str] = Counter()
    rows = 0
    for step in event.steps:
        if isinstance(step, SelectionRecord):
            picks[step.gateway_id or "nobody"] += 1
        else:
            rows += len(step.rows) + len(step.removed)
    count = event.last - event.first + 1
    if count <= 0:
        return f"pool changes: {rows} gateways"
    top = ", ".join(f"{gw} x{n}" for gw, n in picks.most_common(3))
    more = f", +{len(picks) - 3} more" if len(picks) > 3 else ""
    ids = f"sel-{event.run}-{event.first}" + (f" .. {event.last}" if count > 1 else "")
    plural = "s" if count != 1 else ""
    return f"{count} selection{plural}: {top}{more}; {rows} gateways changed [explain {ids}]"


def _step_details(event: DistributionEvent) -> str:
    def names(value: list[str]) -> str:
        return ", ".join(value) or "-"

    match event.detail:
        case CreatedStep(target_gateways=targets, unknown_gateways=unknown):
            return f"targets {names(targets)}" + (f"; unknown: {names(unknown)}" if unknown else "")
        case BatchSentStep(batch=batch, gateways=sent):
            return f"batch {batch}: {names(sent)}"
        case GatewayAckedStep(attempts=attempt) | GatewayRetriedStep(attempt=attempt):
            return f"attempt {attempt}"
        case GatewayNackedStep(attempts=attempts, error=error):
            return f"attempt {attempts}: {error}"
        case GatewayTimedOutStep(attempts=attempts, reason=reason, final=final):
            return f"attempt {attempts}: {reason}{', final' if final else ', will retry'}"
        case ResumedStep(batch=batch, resent=resent, retry_scheduled=retrying):
            return f"batch {batch}, resent {names(resent)}, retrying {names(retrying)}"
        case FinishedStep(status=status, successful=successful, failed=failed, reason=reason):
            why = f" ({reason})" if reason else ""
            return f"{status}{why}; acked {names(successful)}; failed {names(failed)}"
        case QueuedStep(after=after):
            return f"after {after}"
        case VersionMovedStep(from_version=old, to_version=new, held_version=held, gateways=gws):
            return f"version {old} -> {new}: {names(gws)} held version {held}"
    return msgspec.json.encode(event.details).decode() if event.details else ""


def event_line(when: str, kind: str, gateway: str, details: str, *, bold: bool = False) -> bytes:
    text = f"{when:<23}  {kind:<22}  {gateway:<16}  {details}"
    return (click.style(text, bold=True) if bold else text).encode() + b"\n"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


STATUS_STYLE: Final = {"healthy": "green", "degraded": "yellow", "down": "red", "unknown": "dim"}


def status_text(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else status


def candidate_count(event: GatewaySelected) -> int:
    """How many gateways the strategy chose among (events list only the best of them)."""
    return len(event.candidates) if event.candidate_count is None else event.candidate_count


def excluded_count(event: GatewaySelected) -> int:
    return len(event.excluded) if event.excluded_count is None else event.excluded_count


def strategy_input(event: GatewaySelected, candidate: CandidateView) -> str:
    """The number the selection's strategy looked at for this candidate: the measure the
    event recorded, or (events recorded before measures were) one worked out here."""
    measure = candidate.measure
    match event.strategy:
        case "LeastConnections":
            if measure is not None:
                return f"load {measure:.3f}"
            if candidate.active_connections is None:
                return "no count"
            if candidate.max_connections:
                load = candidate.active_connections / candidate.max_connections
                return f"load {load:.3f}"
            return f"{candidate.active_connections} conns"
        case "WeightedRandom":
            if measure is None:
                total = sum(c.score for c in event.candidates)
                measure = candidate.score / total if total else 1 / len(event.candidates)
            return f"{measure:.0%} chance"
        case "LatencyBased":
            latency = candidate.latency_ms if measure is None else measure
            return "no latency" if latency is None else f"{latency:.1f} ms"
        case "RegionAware":
            return f"region {candidate.region}"
    return "in turn"


def show_selection(event: GatewaySelected) -> None:
    console = output.console
    request = {"region": event.region, "client": event.client_id}
    console.print(
        output.key_value_table(
            f"Selection {event.id}",
            [
                ("at", f"{when(event.ts)} UTC"),
                ("replica", event.replica_id or "-"),
                ("request", ", ".join(f"{k} {v}" for k, v in request.items() if v) or "any"),
                ("strategy", event.strategy),
                ("health threshold", f"{event.threshold:g}"),
                ("picked", event.gateway_id or "nobody"),
                ("why", event.reason),
                *(
                    (f"slow start: {gw}", f"ramp {share:.0%} of its full share")
                    for gw, share in sorted(event.slow_start.items())
                ),
            ],
        )
    )
    candidates = Table(
        title="Candidates (eligible; the strategy chose among these)", title_justify="left"
    )
    for column in (
        *("gateway", "region", "role", "score", "cpu %", "mem %"),
        *("connections", "latency ms", event.strategy, "picked"),
    ):
        candidates.add_column(column)
    for c in sorted(event.candidates, key=lambda c: c.gateway_id):
        connections = f"{c.active_connections}/{c.max_connections or '-'}"
        candidates.add_row(
            c.gateway_id,
            c.region,
            c.role,
            f"{c.score:.1f}",
            _num(c.cpu_percent),
            _num(c.memory_percent),
            connections,
            _num(c.latency_ms),
            strategy_input(event, c),
            "[bold]yes[/]" if c.gateway_id == event.gateway_id else "",
        )
    console.print(candidates)
    total, shown = candidate_count(event), len(event.candidates)
    if shown < total:
        console.print(f"Recorded: the pick and the best {shown - 1} of {total} candidates.")
    if event.excluded:
        excluded = Table(title="Excluded", title_justify="left")
        excluded.add_column("gateway")
        excluded.add_column("why")
        for gateway_id, why in sorted(event.excluded.items()):
            excluded.add_row(gateway_id, why)
        console.print(excluded)
        total, shown = excluded_count(event), len(event.excluded)
        if shown < total:
            console.print(f"Recorded: the first {shown} of {total} excluded gateways, by id.")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def show_state(fleet: FleetState) -> None:
    console = output.console
    lb = fleet.load_balancing
    origin = f"since {when(lb.since)}" if lb.since else "as configured (no change logged)"
    console.print(
        output.key_value_table(
            f"Fleet at {when(fleet.at)} UTC (from {fleet.events} events)",
            [
                ("strategy", lb.strategy),
                ("health threshold", f"{lb.health_threshold:g}%"),
                ("settings", origin),
                ("failovers", ", ".join(f"{p} -> {b}" for p, b in fleet.failovers.items()) or "-"),
                ("alarms", "; ".join(f"{k}: {m}" for k, m in fleet.alarms.items()) or "-"),
            ],
        )
    )
    gateways = Table(title="Gateways (times UTC)", title_justify="left")
    for column in ("gateway", "region", "status", "score", "since", "last reason"):
        gateways.add_column(column, justify="right" if column == "score" else "left")
    for g in fleet.gateways.values():
        gateways.add_row(
            g.gateway_id,
            g.region or "?",
            status_text(g.status),
            f"{g.score:.1f}",
            when(g.since),
            g.reason or "",
        )
    console.print(gateways)
    if fleet.distributions:
        console.print(distributions_table(fleet.distributions.values()))


def distributions_table(distributions: Iterable[DistributionState]) -> Table:
    table = Table(title="Distributions (times UTC)", title_justify="left")
    table.add_column("id", overflow="fold")  # whole: it is what --distribution takes
    table.add_column("config")
    table.add_column("status", no_wrap=True)
    for column in ("batch", "targets", "acked"):
        table.add_column(column, justify="right")
    table.add_column("failed")
    table.add_column("reason")
    table.add_column("created", no_wrap=True)
    table.add_column("completed", no_wrap=True)
    for d in sorted(distributions, key=lambda d: (d.created_at or EPOCH, d.id)):
        failed = d.failed_gateways
        table.add_row(
            d.id,
            f"{d.config_type} v{d.version}",
            d.status,
            str(d.batch),
            str(len(d.target_gateways)),
            str(len(d.successful_gateways)),
            ", ".join(failed[:3]) + (f" +{len(failed) - 3}" if len(failed) > 3 else "") or "-",
            d.reason or "",
            when(d.created_at),
            when(d.completed_at),
        )
    return table


def show_replay(tally: Tally) -> None:
    console = output.console
    reproduced = tally.selections - len(tally.differed)
    gaps = f", {tally.in_gap:,} not vouched for (audit gaps)" if tally.in_gap else ""
    console.print(
        f"Replayed {tally.selections:,} selections: {reproduced:,} reproduced exactly, "
        f"{len(tally.differed):,} differed{gaps}."
    )
    if len(tally.per_replica) > 1:
        for replica, (n, ok) in sorted(tally.per_replica.items()):
            console.print(f"  replica {replica}: {n:,} selections, {ok:,} reproduced")
    for d in tally.differed[:20]:
        console.print(
            output.key_value_table(
                f"Differs: {d.selection_id}",
                [
                    ("at", f"{when(d.ts)} UTC"),
                    ("replica", d.replica_id or "-"),
                    ("recorded pick", d.recorded or "nobody"),
                    ("replayed pick", d.replayed or "nobody"),
                    ("why (replayed)", d.why),
                    ("strategy, threshold", f"{d.strategy}, {d.threshold:g}"),
                    ("generation", d.generation),
                    ("request", f"region {d.region or '-'}, client {d.client_id or '-'}"),
                    ("sticky, cursor", f"{d.sticky or '-'}, {d.cursor or '-'}"),
                    ("draws", ", ".join(f"{x:.6f}" for x in d.draws) or "-"),
                    (
                        "slow start",
                        ", ".join(f"{g} {f:.0%}" for g, f in d.slow_start.items()) or "-",
                    ),
                    ("candidates", d.candidates),
                ],
            )
        )
    if len(tally.differed) > 20:
        console.print(f"... and {len(tally.differed) - 20} more (--json lists them all)")


def show_whatif(tally: Tally, strategy: StrategyName, threshold: float | None) -> None:
    console = output.console
    under = strategy + ("" if threshold is None else f", threshold {threshold:g}")
    gaps = f" ({tally.in_gap:,} not vouched for: skipped)" if tally.in_gap else ""
    share = tally.changed / tally.selections if tally.selections else 0.0
    console.print(
        f"{tally.selections:,} selections re-run under {under}{gaps}: {tally.changed:,} "
        f"changed ({share:.1%}), {tally.no_gateway:,} would have found no gateway."
    )
    for column, label in ((0, "recorded"), (1, "what-if")):
        gateway_id, part = busiest_share(tally.per_gateway, column)
        console.print(f"Busiest gateway, {label}: {gateway_id or '-'} ({part:.1%})")
    table = Table(title="Picks per gateway", title_justify="left")
    table.add_column("gateway")
    for heading in ("recorded", "what-if", "change"):
        table.add_column(heading, justify="right")
    rows = sorted(tally.per_gateway.items(), key=lambda item: (-item[1][0], item[0]))
    for gateway_id, (recorded, whatif) in rows:
        table.add_row(gateway_id, f"{recorded:,}", f"{whatif:,}", f"{whatif - recorded:+,}")
    console.print(table)
