"""Writes of leader state, fenced (issue 16): each a compare-and-set on the revision this
replica last read or wrote of its key, so that a leader that lost its lease without
noticing yet (between its last check and its write) cannot overwrite what a newer leader
has written since. Its write is refused (`Fenced`), and whoever gets that stops leading.

The revisions are those read at the start of the tenure (`read_all`) and those of this
replica's own writes since; a key it knows no revision of is created (its write is
refused if it exists). A write whose outcome is unknown (KvError after the store's
retries: it may have been made) leaves its key uncertain: the next write of it first
reads it, and goes on if the key holds either the revision known before or the value of
that write, else is fenced.

Each `read_all` starts a new tenure of this replica's (it leads again). A write begun in
an earlier one that ends after it teaches the new tenure nothing: the revision it made
is not the one this tenure read, so the next write of that key is fenced (the store is
then read again). A writer that says which tenure it writes for (`tenure`) is refused
once another has begun: a DistributionActor of a tenure that has ended.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import msgspec

from bus.jetstream import KvError, KvStore, WrongRevision
from schemas.codec import encode


class Fenced(Exception):
    """A write of leader state refused: another replica (a newer leader) has written the
    key since this one last read or wrote it. Not a failure to retry: the writer no
    longer leads, and steps down. `str()` says which key, for the log."""

    def __init__(self, bucket: str, key: str, *, by: str = "another replica") -> None:
        self.key = key
        super().__init__(
            f"the {bucket} key {key} was written by {by} since this one last read it "
            "(a newer leader)"
        )


class FencedKv:
    """One bucket's leader state, written by compare-and-set (any thread; one writer per
    key at a time, as the callers' roles make it)."""

    def __init__(self, kv: KvStore) -> None:
        self.kv = kv
        self._lock = threading.Lock()
        self._revisions: dict[str, int] = {}
        # Keys whose last write ended in KvError: the revision before it, and its value.
        self._uncertain: dict[str, tuple[int, bytes | None]] = {}
        self.tenure = 0  # how many times the store has been read whole

    def read_all(self) -> dict[str, bytes]:
        """Every key's value, read now: the revisions from here on (those known before
        are forgotten), for a new tenure."""
        with self._lock:
            self.tenure += 1  # from now on, writes begun before change nothing here
        found = self.kv.entries_at()
        with self._lock:
            self._revisions = {key: revision for key, (_, revision) in found.items()}
            self._uncertain.clear()
        return {key: data for key, (data, _) in found.items()}

    def put(self, key: str, value: msgspec.Struct | None, *, tenure: int | None = None) -> None:
        """Writes (None: deletes) the key if it is where this replica last left it."""
        self.put_many({key: value}, tenure=tenure)

    def put_many(
        self, values: Mapping[str, msgspec.Struct | None], *, tenure: int | None = None
    ) -> None:
        """`put` of each, all at once; `tenure`: only in that tenure. Raises Fenced (the
        first key refused), or KvError."""
        if not values:
            return
        began = self.tenure
        if tenure is not None and tenure != began:
            raise Fenced(self.kv.name, next(iter(values)), by="this replica's next tenure")
        writes = {key: (value, self._last(key)) for key, value in values.items()}
        try:
            revisions = self.kv.update_many(writes)
        except WrongRevision as exc:
            raise Fenced(self.kv.name, exc.key) from None
        except KvError:
            with self._lock:
                if self.tenure == began:
                    for key, (value, last) in writes.items():
                        self._uncertain[key] = (last, None if value is None else encode(value))
            raise
        with self._lock:
            if self.tenure == began:
                self._revisions.update(revisions)

    def purge(self, keys: Iterable[str]) -> None:
        """KvStore.purge, and the keys forgotten (created if written again)."""
        keys = list(keys)
        with self._lock:
            began, revisions = self.tenure, dict(self._revisions)
        known = {key: n for key, n in revisions.items() if any(_matches(key, p) for p in keys)}
        try:
            self.kv.purge(keys)
        except KvError:
            with self._lock:
                if self.tenure == began:
                    for key, revision in known.items():
                        self._uncertain[key] = (revision, None)
            raise
        with self._lock:
            if self.tenure == began:
                for key in known:
                    self._revisions.pop(key, None)

    def _last(self, key: str) -> int:
        """The revision to write `key` at, once an uncertain write of it is resolved."""
        with self._lock:
            uncertain = self._uncertain.pop(key, None)
            if uncertain is None:
                return self._revisions.get(key, 0)
        before, tried = uncertain
        try:
            data, revision = self.kv.get_at(key)
        except KvError:
            with self._lock:
                self._uncertain[key] = uncertain
            raise
        if revision != before and data != tried:
            raise Fenced(self.kv.name, key)
        with self._lock:
            self._revisions[key] = revision
        return revision


def _matches(key: str, pattern: str) -> bool:
    """Whether a purge of `pattern` (a key, or `<prefix>.>`) removes `key`."""
    if pattern.endswith(".>"):
        return key.startswith(pattern[:-1])
    return key == pattern
