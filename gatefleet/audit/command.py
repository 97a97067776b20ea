"""`gatefleet audit`: replay the event stream, explain a selection, rebuild the fleet at a time.

    gatefleet audit [--since 2h] [--until T] [--type gateway.down] [--gateway edge-1]
                    [--distribution dist-...] [--follow] [--json]
    gatefleet audit explain <selection id>
    gatefleet audit state --at <time>
    gatefleet audit replay [--since T] [--until T] [--json]
    gatefleet audit whatif --strategy S [--threshold X] [--since T] [--until T] [--json]

Reading is done by `bus.replay.Replay` (an ordered consumer, filtered by
subject on the server: `--type` and `--distribution` narrow the subjects); `--gateway`
and `--distribution` are then checked here on the decoded events. `--json` writes each
stored event as it is, one per line, without decoding it when no check here needs it.

Times (`--since`, `--until`, `--at`) are RFC 3339 / ISO 8601 (no offset means UTC, like
every time gatefleet prints), `now`, or a duration back from now: `90s`, `15m`, `2h`,
`1h30m`, `7d`. `--since`/`--until` select by the time the stream stored an event; `--at`
compares with each event's own `ts` (when gatefleet decided), which is a few ms earlier.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO

import click
import msgspec

from actors.selection_log import selection_event
from actors.strategies import Selection
from bus.replay import StoredEvent, epoch_ns, until_stored
from bus.runtime import Bus
from bus.subjects import Subjects
from gatefleet import output
from gatefleet.audit.filter import EVENT_TYPES, WHEN, EventFilter
from gatefleet.audit.read import Decoder, connected_bus, read
from gatefleet.audit.render import (
    event_line,
    show_replay,
    show_selection,
    show_state,
    show_whatif,
    summary,
    when,
)
from gatefleet.audit.rerun import Lane, Rerun, Tally, WhatIf, request_of, selection_ts
from gatefleet.audit.selections import feed, find_batch, parse_selection_id
from gatefleet.audit.state import FOLDED_TYPES, FleetFold, FleetState, LoadBalancingState
from gatefleet.cli_common import client_options, fail, settings_or_exit
from schemas.codec import DecodeError, encode
from schemas.events import Event, GatewaySelected, SelectionBatch, SelectionRecord
from schemas.settings import Settings
from schemas.types import GATEWAY_ID_RE, STRATEGIES, StrategyName

# Events are stored a few ms after their `ts`: `state --at T` reads this far past T.
STORE_GRACE = timedelta(seconds=10)


# Options and connection ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """--config, --nats and --json as given to a subcommand, each left out taken from the
    `audit` group's, so `audit --config X explain ID` and `audit explain ID --config X`
    both work."""

    config: str | None
    nats: str | None
    as_json: bool

    @classmethod
    def of(cls, config: str | None, nats: str | None, as_json: bool) -> ClientOptions:
        group = click.get_current_context().find_object(ClientOptions)
        if group is None:
            return cls(config, nats, as_json)
        return cls(config or group.config, nats or group.nats, as_json or group.as_json)


# `gatefleet audit` ------------------------------------------------------------------------


REPLAY_OPTIONS = ("since", "until", "gateway", "types", "distribution", "follow")


@click.group(invoke_without_command=True)
@client_options
@click.option("--since", type=WHEN, help="Events stored since TIME (or DURATION ago).")
@click.option("--until", type=WHEN, help="Events stored until TIME (or DURATION ago).")
@click.option("--gateway", help="Only events about this gateway.")
@click.option(
    "--type",
    "types",
    multiple=True,
    metavar="TYPE",
    help=f"Only this event type or family (repeatable): {', '.join(EVENT_TYPES)}, "
    "or gateway, lb, distribution, ha.",
)
@click.option("--distribution", help="Only events of this distribution id.")
@click.option("--follow", "-f", is_flag=True, help="Keep tailing new events.")
@click.pass_context
def audit(
    ctx: click.Context,
    config: str | None,
    nats: str | None,
    as_json: bool,
    since: datetime | None,
    until: datetime | None,
    gateway: str | None,
    types: tuple[str, ...],
    distribution: str | None,
    follow: bool,
) -> None:
    """Replay the audit log (the event stream), oldest first.

    TIME is RFC 3339 (2026-11-28T07:00:00Z; without an offset, UTC) or `now`; DURATION
    counts back from now (90s, 15m, 2h, 1h30m, 7d). --since/--until go by the time an
    event was stored. --json prints each event as stored, one JSON object per line.
    Progress goes to stderr, on a terminal or for a long read.
    """
    if ctx.invoked_subcommand is not None:
        given = [
            name
            for name in REPLAY_OPTIONS
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(f"--{given[0]} goes with `audit`, not with a subcommand")
        ctx.obj = ClientOptions(config, nats, as_json)
        return
    if gateway is not None and not GATEWAY_ID_RE.fullmatch(gateway):
        raise click.BadParameter(f"{gateway!r} is not a gateway id", param_hint="--gateway")
    try:
        flt = EventFilter.build(types, gateway=gateway, distribution=distribution)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--type") from None
    settings = settings_or_exit(config, nats)
    out = sys.stdout.buffer
    decoder = Decoder()
    writer = JsonWriter(out, flt, decoder, follow) if as_json else TableWriter(out, flt, decoder)
    with connected_bus(settings) as bus:
        subjects = flt.subjects(Subjects(settings.bus.subject_prefix))
        try:
            read(bus, settings, subjects, writer, since=since, until=until, follow=follow)
            writer.finish()
        except BrokenPipeError:
            _silence_stdout()  # `gatefleet audit | head`: the reader has what it wanted
    decoder.report()


class JsonWriter:
    """Writes the stored bytes, one event a line; decodes only to filter on content."""

    def __init__(self, out: IO[bytes], flt: EventFilter, decoder: Decoder, follow: bool) -> None:
        self.out, self.flt, self.decoder, self.follow = out, flt, decoder, follow

    def __call__(self, batch: list[StoredEvent]) -> None:
        if self.flt.needs_decoding:
            batch = [item for item in batch if _keep(item[2], self.flt, self.decoder)]
        if not batch:
            return
        lines = [data for _, _, data in batch]
        joined = b"\n".join(lines)
        if joined.count(b"\n") != len(lines) - 1:  # a stored event spans lines: re-encode
            joined = b"\n".join(_one_line(data) for data in lines)
        self.out.write(joined + b"\n")
        if self.follow:
            self.out.flush()

    def finish(self) -> None:
        self.out.flush()


class TableWriter:
    """Aligned columns, one event a line: streamed, with no table held in memory."""

    def __init__(self, out: IO[bytes], flt: EventFilter, decoder: Decoder) -> None:
        self.out, self.flt, self.decoder = out, flt, decoder
        self._header = False

    def __call__(self, batch: list[StoredEvent]) -> None:
        lines = [] if self._header else [self._header_line()]
        for _, _, data in batch:
            event = _keep(data, self.flt, self.decoder)
            if event is not None:
                gateway, details = summary(event)
                lines.append(event_line(when(event.ts), event.type, gateway, details))
        self.out.write(b"".join(lines))
        self.out.flush()

    def finish(self) -> None:
        if not self._header:
            self.out.write(self._header_line())
        self.out.flush()

    def _header_line(self) -> bytes:
        self._header = True
        bold = self.out.isatty()
        return event_line("TIME (UTC)", "TYPE", "GATEWAY", "DETAILS", bold=bold)


def _keep(data: bytes, flt: EventFilter, decoder: Decoder) -> Event | None:
    """The decoded event if it passes the content filters, else None."""
    if not flt.may_match(data):
        return None
    event = decoder(data)
    return event if event is not None and flt.matches(event) else None


def compact_json(data: bytes) -> bytes:
    """The same JSON on one line (DecodeError if it is not JSON)."""
    return msgspec.json.encode(msgspec.json.decode(data))


def _one_line(data: bytes) -> bytes:
    try:
        return compact_json(data)
    except DecodeError:
        return data.replace(b"\n", b" ")


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# `gatefleet audit explain` ----------------------------------------------------------------


@audit.command()
@client_options
@click.argument("selection_id")
@click.option("--since", type=WHEN, help="Search only selections stored since then (faster).")
def explain(
    config: str | None, nats: str | None, as_json: bool, selection_id: str, since: datetime | None
) -> None:
    """Why one selection went the way it did.

    SELECTION_ID is the `selection_id` of a select-gateway reply: shows the request,
    strategy and threshold, the candidates (the pick and the best 50 others by the
    strategy's measure) with the metrics and score they were judged on, the excluded
    gateways (the first 50) and why, and the pick. The pool is rebuilt from the stream
    (the snapshot before the selection and the changes since), and the selection re-run.
    """
    options = ClientOptions.of(config, nats, as_json)
    settings = settings_or_exit(options.config, options.nats)
    with connected_bus(settings) as bus:
        found = _explained(bus, settings, selection_id, since)
    if found is None:
        fail(
            f"no selection {selection_id} in the audit log (not a selection id, older than "
            "its retention, or recorded while [audit] record_selections was false)"
        )
    event, recorded = found
    if options.as_json:
        sys.stdout.buffer.write(_one_line(encode(event)) + b"\n")
        return
    show_selection(event)
    if recorded != event.gateway_id:
        click.echo(
            f"gatefleet: replayed, this selection picks {event.gateway_id or 'nobody'}, but "
            f"{recorded or 'nobody'} was recorded: `gatefleet audit replay` shows the inputs",
            err=True,
        )


def _explained(
    bus: Bus, settings: Settings, selection_id: str, since: datetime | None
) -> tuple[GatewaySelected, str | None] | None:
    """The selection explained, and the pick recorded; None if it is not in the stream."""
    parsed = parse_selection_id(selection_id)
    if parsed is None:
        return _recorded_event(bus, settings, selection_id, since)
    located = find_batch(bus, settings, since, parsed)
    if located is None:
        return None
    head, stored_ns = located
    explained: list[tuple[GatewaySelected, str | None]] = []

    def found(
        lane: Lane, record: SelectionRecord, batch: SelectionBatch, chosen: Selection
    ) -> None:
        event = selection_event(selection_id, request_of(record), chosen, lane.pool, lane.recorded)
        event = msgspec.structs.replace(
            event, ts=selection_ts(batch, record), replica_id=batch.replica_id
        )
        explained.append((event, record.gateway_id))

    rerun = Rerun(find=parsed, found=found)
    feed(bus, settings, rerun, since=head.snapshot_ts, until=until_stored(stored_ns))
    if not explained:
        fail(f"the pool selection {selection_id} was made from is no longer in the audit log")
    return explained[0]


def _recorded_event(
    bus: Bus, settings: Settings, event_id: str, since: datetime | None
) -> tuple[GatewaySelected, str | None] | None:
    """An `lb.selected` event (recorded one per selection before batches)."""
    needle = event_id.encode()
    decoder = Decoder()
    found: list[GatewaySelected] = []

    def sink(batch: list[StoredEvent]) -> bool:
        for _, _, data in batch:
            if needle in data:
                event = decoder(data)
                if isinstance(event, GatewaySelected) and event.id == event_id:
                    found.append(event)
                    return True
        return False

    subjects = [Subjects(settings.bus.subject_prefix).event("lb.selected")]
    read(bus, settings, subjects, sink, since=since)
    return (found[0], found[0].gateway_id) if found else None


# `gatefleet audit replay` and `gatefleet audit whatif` ------------------------------------


@audit.command()
@client_options
@click.option("--since", type=WHEN, help="Selections stored since TIME (or DURATION ago).")
@click.option("--until", type=WHEN, help="Selections stored until TIME (or DURATION ago).")
def replay(
    config: str | None,
    nats: str | None,
    as_json: bool,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """Re-run every recorded selection against the pool recorded at that moment.

    Each selection is re-run with its strategy, threshold, rotation cursor, random draws,
    sticky gateway and slow start ramps as recorded; it must pick what it picked then.
    Differences (a bug) are shown with both picks and the inputs, and the exit status is
    then 1. Selections the stream cannot vouch for (in an audit gap, or after a lost
    batch until the next pool snapshot) are counted apart. --json prints
    {"selections": N, "reproduced": N, "differed": [...], "in_gap": N, "replicas":
    {replica_id: {"selections": N, "reproduced": N}}} (each replica records its own).
    """
    options = ClientOptions.of(config, nats, as_json)
    tally = _rerun(options, None, since, until)
    reproduced = tally.selections - len(tally.differed)
    if options.as_json:
        output.print_json(
            {
                "selections": tally.selections,
                "reproduced": reproduced,
                "differed": tally.differed,
                "in_gap": tally.in_gap,
                "replicas": {
                    replica: {"selections": n, "reproduced": ok}
                    for replica, (n, ok) in sorted(tally.per_replica.items())
                },
            }
        )
    else:
        show_replay(tally)
    if tally.differed:
        sys.exit(1)


@audit.command()
@client_options
@click.option(
    "--strategy", type=click.Choice(STRATEGIES), required=True, help="The strategy to try."
)
@click.option(
    "--threshold", type=click.FloatRange(0, 100), help="The health threshold to try (0-100)."
)
@click.option("--since", type=WHEN, help="Selections stored since TIME (or DURATION ago).")
@click.option("--until", type=WHEN, help="Selections stored until TIME (or DURATION ago).")
def whatif(
    config: str | None,
    nats: str | None,
    as_json: bool,
    strategy: StrategyName,
    threshold: float | None,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """Re-run the recorded requests under another strategy or threshold.

    Shows, per gateway, the picks recorded and the picks it would have had, how many
    selections changed, the busiest gateway's share, and the selections that would have
    found no gateway. --threshold left out keeps the recorded one. With the recorded
    strategy and threshold nothing changes. --json prints {"selections": N, "changed": N,
    "no_gateway": N, "per_gateway": {id: {"recorded": n, "whatif": n}}}.
    """
    options = ClientOptions.of(config, nats, as_json)
    tally = _rerun(options, WhatIf(strategy=strategy, threshold=threshold), since, until)
    if options.as_json:
        output.print_json(
            {
                "selections": tally.selections,
                "changed": tally.changed,
                "no_gateway": tally.no_gateway,
                "per_gateway": {
                    gw: {"recorded": recorded, "whatif": whatif}
                    for gw, (recorded, whatif) in sorted(tally.per_gateway.items())
                },
                "in_gap": tally.in_gap,
            }
        )
    else:
        show_whatif(tally, strategy, threshold)


def _rerun(
    options: ClientOptions, what_if: WhatIf | None, since: datetime | None, until: datetime | None
) -> Tally:
    settings = settings_or_exit(options.config, options.nats)

    def ns(moment: datetime | None) -> int | None:
        return None if moment is None else epoch_ns(moment)

    rerun = Rerun(what_if, since_ns=ns(since), until_ns=ns(until))
    with connected_bus(settings) as bus:
        feed(bus, settings, rerun, since=since, until=until)
    return rerun.finish()


# `gatefleet audit state` ------------------------------------------------------------------


@audit.command()
@client_options
@click.option("--at", "at", type=WHEN, default="now", show_default=True, help="The moment.")
def state(config: str | None, nats: str | None, as_json: bool, at: datetime) -> None:
    """The fleet as it was at a moment, rebuilt from the audit log alone.

    Each gateway's status and score (as of its last status event), the load-balancing
    settings, the distributions and their per-gateway states, failovers and alarms.
    Settings never changed in the log are the configured ones (from --config).
    """
    options = ClientOptions.of(config, nats, as_json)
    snapshot = fleet_at(settings_or_exit(options.config, options.nats), at)
    if options.as_json:
        output.print_json(snapshot)
    else:
        show_state(snapshot)


def fleet_at(settings: Settings, at: datetime) -> FleetState:
    """Folds every event up to `at` (by its `ts`), from the oldest kept."""
    orchestrator = settings.orchestrator
    fold = FleetFold(
        LoadBalancingState(
            strategy=orchestrator.load_balancing_strategy,
            health_threshold=orchestrator.health_threshold_percent,
        )
    )
    decoder = Decoder()

    def sink(batch: list[StoredEvent]) -> None:
        for _, _, data in batch:
            event = decoder(data)
            if event is not None and event.ts <= at:
                fold.apply(event)

    subjects = Subjects(settings.bus.subject_prefix)
    with connected_bus(settings) as bus:
        read(bus, settings, [subjects.event(t) for t in FOLDED_TYPES], sink, until=at + STORE_GRACE)
    decoder.report()
    return fold.state(at)
