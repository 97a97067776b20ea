"""`gatefleet audit`: replay the event stream, explain a selection, rebuild the fleet at a time.

    gatefleet audit [--since 2h] [--until T] [--type gateway.down] [--gateway edge-1]
                    [--distribution dist-...] [--follow] [--json]
    gatefleet audit explain <selection id>
    gatefleet audit state --at <time>

Reading is done by `bus.replay.Replay` (an ordered consumer, filtered by subject on the
server: `--type` and `--distribution` narrow the subjects); `--gateway` and
`--distribution` are then checked here on the decoded events. `--json` writes each stored
event as it is, one per line, without decoding it when no check here needs it.

Times (`--since`, `--until`, `--at`) are RFC 3339 / ISO 8601 (no offset means UTC, like
every time gatefleet prints), `now`, or a duration back from now: `90s`, `15m`, `2h`,
`1h30m`, `7d`. `--since`/`--until` select by the time the stream stored an event; `--at`
compares with each event's own `ts` (when gatefleet decided), which is a few ms earlier.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Final

import click
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bus.connection import BusError
from bus.jetstream import stream_name
from bus.replay import Replay, StoredEvent
from bus.runtime import Bus
from bus.subjects import Subjects
from gatefleet import output
from gatefleet.app import discover_url
from gatefleet.audit_state import (
    FOLDED_TYPES,
    DistributionState,
    FleetFold,
    FleetState,
    LoadBalancingState,
)
from gatefleet.cli_common import client_options, fail, settings_or_exit
from schemas.codec import DecodeError
from schemas.events import (
    Alarm,
    CandidateView,
    DistributionEvent,
    Event,
    Failback,
    Failover,
    GatewayDown,
    GatewayLeft,
    GatewayRecovered,
    GatewayRegistered,
    GatewaySelected,
    GatewayStatusChanged,
    LoadBalancingChanged,
    Reconciliation,
    decode_event,
)
from schemas.settings import Settings
from schemas.types import GATEWAY_ID_RE

# Events are stored a few ms after their `ts`: `state --at T` reads this far past T.
STORE_GRACE = timedelta(seconds=10)
EPOCH = datetime.fromtimestamp(0, UTC)
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# Times ------------------------------------------------------------------------------------


def parse_when(text: str, now: datetime) -> datetime:
    """`now`, a duration back from `now` (`2h`, `1h30m`), or an ISO time (naive = UTC)."""
    text = text.strip()
    if text == "now":
        return now
    if _DURATION_RE.match(text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-28T07:00:00Z) nor a duration (2h, 15m)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class When(click.ParamType[datetime]):
    name = "TIME|DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value), datetime.now(UTC))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


WHEN = When()


# Which events -----------------------------------------------------------------------------

EVENT_TYPES: Final = tuple(str(cls.__struct_config__.tag) for cls in typing.get_args(Event))
FAMILIES: Final = tuple(dict.fromkeys(t.partition(".")[0] for t in EVENT_TYPES))
# Types that can name a gateway, or a distribution: what --gateway / --distribution read.
GATEWAY_TYPES: Final = frozenset(EVENT_TYPES) - {"lb.changed", "ha.alarm", "orchestrator.started"}
DISTRIBUTION_TYPES: Final = frozenset({"distribution.step", "ha.reconcile"})
_DISTRIBUTION_LISTS: Final = (
    *("target_gateways", "unknown_gateways", "gateways"),
    *("successful", "failed", "resent", "retry_scheduled"),
)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What to replay: types (read by subject on the server), then gateway and
    distribution (checked here on each decoded event)."""

    types: frozenset[str]
    gateway: str | None = None
    distribution: str | None = None
    every_type: bool = True  # no --type given: read `P.events.>`, future types included

    @classmethod
    def build(
        cls, names: Iterable[str], *, gateway: str | None = None, distribution: str | None = None
    ) -> EventFilter:
        """ValueError names the unknown type (with the nearest known one)."""
        chosen: set[str] = set()
        for name in names:
            if name in EVENT_TYPES:
                chosen.add(name)
            elif name in FAMILIES:
                chosen.update(t for t in EVENT_TYPES if t.startswith(name + "."))
            else:
                close = difflib.get_close_matches(name, [*EVENT_TYPES, *FAMILIES], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown event type {name!r}{hint}")
        every = not chosen
        types = set(EVENT_TYPES) if every else chosen
        if gateway is not None:
            if not GATEWAY_ID_RE.fullmatch(gateway):
                raise ValueError(f"{gateway!r} is not a gateway id")
            types &= GATEWAY_TYPES
        if distribution is not None:
            types &= DISTRIBUTION_TYPES
        if not types:
            raise ValueError("no event of these types names a gateway or distribution")
        every = every and gateway is None and distribution is None
        return cls(frozenset(types), gateway, distribution, every)

    @property
    def needs_decoding(self) -> bool:
        return self.gateway is not None or self.distribution is not None

    def subjects(self, subjects: Subjects) -> list[str]:
        if self.every_type:
            return [subjects.all_events]
        return [subjects.event(t) for t in sorted(self.types)]

    def may_match(self, data: bytes) -> bool:
        """A cheap test on the stored bytes before decoding: False means it cannot match."""
        return (self.gateway is None or self.gateway.encode() in data) and (
            self.distribution is None or self.distribution.encode() in data
        )

    def matches(self, event: Event) -> bool:
        if event.type not in self.types:
            return False
        if self.gateway is not None and self.gateway not in gateways_named(event):
            return False
        return self.distribution is None or distribution_of(event) == self.distribution


def gateways_named(event: Event) -> set[str]:
    """Every gateway an event is about: its subject, a candidate, an excluded one, ..."""
    match event:
        case GatewaySelected():
            named = {c.gateway_id for c in event.candidates} | set(event.excluded)
            return named | ({event.gateway_id} if event.gateway_id else set())
        case Failover(from_gateway=a, to_gateway=b) | Failback(from_gateway=a, to_gateway=b):
            return {a} | ({b} if b else set())
        case DistributionEvent(gateway_id=gw, details=details):
            named = {gw} if gw else set()
            for key in _DISTRIBUTION_LISTS:
                value = details.get(key)
                if isinstance(value, list):
                    named.update(str(v) for v in value)
            return named
        case (
            GatewayRegistered(gateway_id=gw)
            | GatewayStatusChanged(gateway_id=gw)
            | GatewayDown(gateway_id=gw)
            | GatewayRecovered(gateway_id=gw)
            | GatewayLeft(gateway_id=gw)
            | Reconciliation(gateway_id=gw)
        ):
            return {gw}
        case _:
            return set()


def distribution_of(event: Event) -> str | None:
    match event:
        case DistributionEvent(distribution_id=dist_id):
            return dist_id
        case Reconciliation(distribution_id=dist_id):
            return dist_id
        case _:
            return None


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
        case DistributionEvent():
            head = f"{event.step} {event.distribution_id} {event.config_type} v{event.version}"
            more = _step_details(event.step, event.details)
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
    return "", ""  # pragma: no cover - the match is exhaustive


def _step_details(step: str, d: dict[str, Any]) -> str:
    def names(key: str) -> str:
        value = d.get(key)
        return ", ".join(map(str, value)) if isinstance(value, list) and value else "-"

    match step:
        case "created":
            unknown = f"; unknown: {names('unknown_gateways')}" if d.get("unknown_gateways") else ""
            return f"targets {names('target_gateways')}{unknown}"
        case "batch_sent":
            return f"batch {d.get('batch')}: {names('gateways')}"
        case "gateway_acked" | "gateway_retried":
            return f"attempt {d.get('attempts', d.get('attempt'))}"
        case "gateway_nacked":
            return f"attempt {d.get('attempts')}: {d.get('error')}"
        case "gateway_timed_out":
            final = ", final" if d.get("final") else ", will retry"
            return f"attempt {d.get('attempts')}: {d.get('reason')}{final}"
        case "resumed":
            return f"batch {d.get('batch')}, resent {names('resent')}, retrying {names('retry_scheduled')}"
        case "finished":
            reason = f" ({d['reason']})" if d.get("reason") else ""
            return (
                f"{d.get('status')}{reason}; acked {names('successful')}; failed {names('failed')}"
            )
        case "queued":
            return f"after {d.get('after')}"
    return msgspec.json.encode(d).decode() if d else ""


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


@contextmanager
def connected_bus(settings: Settings) -> Iterator[Bus]:
    logging.basicConfig(level=logging.ERROR)  # reconnect chatter is not for a client
    bus = Bus(discover_url(settings, os.environ), name="gatefleet-audit")
    try:
        bus.start(connect_timeout=5)
    except BusError as exc:
        fail(str(exc))
    try:
        yield bus
    finally:
        bus.stop()


# Reading ----------------------------------------------------------------------------------


def read(
    bus: Bus,
    settings: Settings,
    subjects: list[str],
    sink: Callable[[list[StoredEvent]], bool | None],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    follow: bool = False,
) -> None:
    """Feeds `sink` every batch read (in stream order) until the end, or until it returns
    True; shows progress on stderr on a long read."""
    stream = stream_name(settings.bus.subject_prefix)
    replay = Replay(bus, stream, subjects, since=since, until=until, follow=follow)
    try:
        replay.start()
    except BusError as exc:
        fail(f"{exc} (prefix {settings.bus.subject_prefix!r}; has gatefleet run here?)")
    progress = ReadProgress(replay.total, what=f"reading {stream}")
    try:
        for batch in replay:
            progress.advance(len(batch))
            if sink(batch):
                break
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is how --follow ends: not an error.
    except BusError as exc:
        fail(str(exc))
    finally:
        progress.close()
        replay.close()


class ReadProgress:
    """Progress of a long read, on stderr only (never mixed into stdout): a live bar on a
    terminal once the read has lasted `bar_after_s`; elsewhere a line every
    `note_every_s` once it has lasted that long."""

    def __init__(
        self, total: int, what: str, *, bar_after_s: float = 0.5, note_every_s: float = 5.0
    ) -> None:
        self.total = total
        self.done = 0
        self.what = what
        self._bar_after_s = bar_after_s
        self._note_every_s = note_every_s
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._next_note = self._started + note_every_s
        self._bar: Progress | None = None
        self._closed = total == 0

    def advance(self, count: int) -> None:
        self.done += count
        if self._closed:
            return
        if self.done >= self.total:  # the history is read (a --follow goes on quietly)
            self.close()
            return
        now = time.monotonic()
        if self._tty:
            if self._bar is None and now - self._started >= self._bar_after_s:
                self._bar = Progress(
                    TextColumn(self.what),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._bar.add_task(self.what, total=self.total)
                self._bar.start()
            if self._bar is not None:
                self._bar.update(self._bar.task_ids[0], completed=self.done)
        elif now >= self._next_note:
            click.echo(f"gatefleet: {self.what}: {self.done:,} of {self.total:,} events", err=True)
            self._next_note = now + self._note_every_s

    def close(self) -> None:
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class Decoder:
    """Decodes stored events, counting those that do not decode (newer gatefleet, other
    publishers) so the command can say how many it skipped."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, data: bytes) -> Event | None:
        try:
            return decode_event(data)
        except DecodeError:
            self.skipped += 1
            return None

    def report(self) -> None:
        if self.skipped:
            click.echo(
                f"gatefleet: skipped {self.skipped} stored events that do not decode as events",
                err=True,
            )


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


def event_line(when: str, kind: str, gateway: str, details: str, *, bold: bool = False) -> bytes:
    text = f"{when:<23}  {kind:<22}  {gateway:<16}  {details}"
    return (click.style(text, bold=True) if bold else text).encode() + b"\n"


def compact_json(data: bytes) -> bytes:
    """The same JSON on one line (DecodeError if it is not JSON)."""
    return msgspec.json.encode(msgspec.json.decode(data))


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


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

    SELECTION_ID is the `selection_id` of a select-gateway reply (or the `id` of an
    lb.selected event): shows the request, strategy and threshold, the candidates (the
    pick and the best 50 others by the strategy's measure) with the metrics and score they
    were judged on, the excluded gateways (the first 50) and why, and the pick.
    """
    options = ClientOptions.of(config, nats, as_json)
    settings = settings_or_exit(options.config, options.nats)
    needle = selection_id.encode()
    decoder = Decoder()
    found: list[tuple[GatewaySelected, bytes]] = []

    def sink(batch: list[StoredEvent]) -> bool:
        for _, _, data in batch:
            if needle in data:
                event = decoder(data)
                if isinstance(event, GatewaySelected) and event.id == selection_id:
                    found.append((event, data))
                    return True
        return False

    subjects = [Subjects(settings.bus.subject_prefix).event("lb.selected")]
    with connected_bus(settings) as bus:
        read(bus, settings, subjects, sink, since=since)
    if not found:
        fail(
            f"no selection {selection_id} in the audit log (not a selection id, older than "
            "its retention, or recorded while [audit] record_selections was false)"
        )
    event, data = found[0]
    if options.as_json:
        sys.stdout.buffer.write(_one_line(data) + b"\n")
    else:
        show_selection(event)


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
                ("request", ", ".join(f"{k} {v}" for k, v in request.items() if v) or "any"),
                ("strategy", event.strategy),
                ("health threshold", f"{event.threshold:g}"),
                ("picked", event.gateway_id or "nobody"),
                ("why", event.reason),
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
