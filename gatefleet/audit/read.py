"""Reading the event stream for the audit commands: connection, replay with progress on
stderr, and decoding that counts what it skips."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bus.connection import AccessRefused, BusError
from bus.jetstream import stream_name
from bus.replay import Replay, StoredEvent
from bus.runtime import Bus
from gatefleet.cli_common import EXIT_CONFIG, client_auth, fail
from gatefleet.config import discover_url
from schemas.codec import DecodeError
from schemas.events import Event, decode_event
from schemas.settings import Settings


@contextmanager
def connected_bus(settings: Settings) -> Iterator[Bus]:
    logging.basicConfig(level=logging.ERROR)  # reconnect chatter is not for a client
    auth = client_auth(settings)
    bus = Bus(discover_url(settings, os.environ), name="gatefleet-audit", auth=auth)
    try:
        bus.start(connect_timeout=5)
    except AccessRefused as exc:
        fail(str(exc), EXIT_CONFIG)
    except BusError as exc:
        fail(str(exc))
    try:
        yield bus
    finally:
        bus.stop()


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
