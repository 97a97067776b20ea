"""The leader lease on JetStream: its bucket, and the task that makes the calls the
rules (bus/leadership.py) ask for.

One task per replica, on its bus loop: it asks `Lease.next_step()`, reads the key or
writes it by compare-and-set with the step's timeout, reports the outcome, and sleeps
`poll_s` when there is nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus.connection import BusError
from bus.jetstream import bucket_name, ensure_bucket, failure_reason
from bus.leadership import Lease, Read, Write
from bus.runtime import Bus
from schemas.codec import DecodeError, decode, encode
from schemas.lease import LEASE_BUCKET, LEASE_KEY, LeaseRecord

log = logging.getLogger(__name__)

CALL_ERRORS = (nats.errors.Error, BusError, TimeoutError)
RELEASE_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 5.0  # for the keeper's task to end and the release to be written


def lease_bucket(bus: Bus, prefix: str, replicas: int) -> KeyValue:
    """The bucket of the lease (blocks: call at start, off the loop)."""
    return bus.run(ensure_bucket(bus, bucket_name(prefix, LEASE_BUCKET), replicas))


class LeaseKeeper:
    """Keeps `lease` going on `kv` until stopped."""

    def __init__(self, bus: Bus, kv: KeyValue, lease: Lease) -> None:
        self._bus = bus
        self._kv = kv
        self.lease = lease
        self._task: asyncio.Task[None] | None = None
        self._failing = ""  # why the last call failed, while calls fail

    def start(self) -> None:
        async def create() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(self._run())

        self._task = self._bus.run(create())

    def stop(self, *, release: bool = True) -> None:
        """Stops reading and renewing; a call under way is abandoned, its outcome never
        reported. A leader releases the lease (`release`), so that another replica or
        the next start takes it at once; else it is left to expire, as a crash leaves it."""
        task, self._task = self._task, None

        async def cancel() -> None:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            write = self.lease.release() if release else None
            if write is not None:
                try:
                    update = self._kv.update(LEASE_KEY, encode(write.record), last=write.revision)
                    await asyncio.wait_for(update, RELEASE_TIMEOUT_S)
                except (*CALL_ERRORS, KeyWrongLastSequenceError) as exc:
                    log.info("lease: not released (%s); it expires instead", failure_reason(exc))

        try:
            self._bus.run(cancel(), STOP_TIMEOUT_S)
        except BusError:
            pass  # the bus has stopped: so has the task
        except TimeoutError:  # a stop must go on: the lease then expires, as after a crash
            log.warning("lease: its keeper did not stop within %g s; not released", STOP_TIMEOUT_S)

    async def _run(self) -> None:
        lease = self.lease
        while True:
            step = lease.next_step()
            if step is None:
                await asyncio.sleep(lease.terms.poll_s)
            elif isinstance(step, Read):
                await self._read(step)
            else:
                await self._write(step)

    async def _read(self, step: Read) -> None:
        try:
            revision, record = await asyncio.wait_for(self._get(), step.timeout_s)
        except CALL_ERRORS as exc:
            self._failed("read", exc)
            await asyncio.sleep(self.lease.terms.poll_s)  # do not spin on a failing read
        else:
            self._answered()
            self.lease.observed(revision, record)

    async def _get(self) -> tuple[int, LeaseRecord | None]:
        """The key's revision (0: never written) and record (None: deleted, or absent)."""
        try:
            entry = await self._kv.get(LEASE_KEY)
        except KeyNotFoundError as exc:  # a deleted key's marker still has a revision
            return (exc.entry.revision or 0) if exc.entry else 0, None
        try:
            return entry.revision or 0, decode(entry.value or b"", LeaseRecord)
        except DecodeError:
            log.warning("lease: the stored lease does not decode; taking it as absent")
            return entry.revision or 0, None

    async def _write(self, step: Write) -> None:
        data = encode(step.record)
        try:
            update = self._kv.update(LEASE_KEY, data, last=step.revision)
            revision = await asyncio.wait_for(update, max(step.timeout_s, 0.001))
        except KeyWrongLastSequenceError:
            self._answered()
            self.lease.refused(step)
        except CALL_ERRORS as exc:
            self._failed("renewal" if not step.takeover else "take-over", exc)
            self.lease.failed(step)
        else:
            self._answered()
            self.lease.written(step, revision)

    def _failed(self, what: str, exc: BaseException) -> None:
        reason = failure_reason(exc)
        if not self._failing:
            log.warning("lease: %s of %s failed: %s", what, self.lease.replica_id, reason)
        self._failing = reason

    def _answered(self) -> None:
        if self._failing:
            log.info("lease: JetStream answers %s again", self.lease.replica_id)
        self._failing = ""
