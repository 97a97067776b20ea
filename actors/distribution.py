"""DistributionActor: carries one configuration distribution from start to end.

Owns: a `DistributionMachine` (actors/distribution_machine.py: the batches, retries and
the final status are decided there) and the pushes in flight. A step that sends, schedules
a retry or finishes first stores its progress and the chunks of the gateways changed
since the last store (it is the one writer of those keys once it runs,
schemas/stored.py), then carries out the machine's commands (store, then act), so a
crash at any point resumes from a record that is never behind what gateways have been
sent. Acks and nacks in between are not stored one by one (each store is an fsync):
after a crash those gateways are sent the same push again, which they acknowledge
without applying it twice (pushes are idempotent on distribution id and version). Every
step is told to the parent, which answers status queries from memory.
Receives: PushAnswered (from the bus loop), RetryDue, GateDue, WakeDue (its own timers,
on the runtime's TimerWheel for gates and windows), GatewayHealth (the distributor's
view of its targets' health, for a rollout's health gates), Control (pause, resume,
abort: it answers the request with its record, stored first) and VersionMoved (the
distributor's answer to CounterBehind, which it tells the distributor when a gateway
answers `stale_version`: see "A version move" in actors/distribution_machine.py; answers
and retries of the version before a move are ignored).
Emits: `distribution.step` events (every step of the machine's); sends ConfigPush
requests on `P.gw.<id>.config`; tells the parent DistributionChanged after every step,
and stops itself once its part is over (the distribution has ended, or is rolling
back: the distributor carries its rollback). A step that changes its status or health
gate is stored before anything else happens, so a rollout's pause, gate or window
survives a crash.

Only the leader distributes (issue 16): before each step (before it stores or sends
anything) the actor checks that this replica still holds the leader lease. Once it does
not, it stops acting: nothing more is sent, stored or failed, the distribution stays as
stored (its steps since the last store are redone from there), and the actor tells the
distributor NotLeading and stops; the leader resumes it. Every push carries the lease's
epoch; a gateway that answers `stale_epoch` has seen a higher one (another replica has
led since): this replica steps down at once, and that gateway is no failure. So it does
when a write of its record is refused as fenced (actors/distribution_store.py: another
replica has written its keys since), and that record stays as the other replica wrote it.

A step whose record cannot be stored (after the store's retries) is not carried out:
the distribution ends failed ("cannot store its progress: <why>") as it was told last,
and the actor stops, so its type's queue moves on. If the replica lost the lease while
the write was tried (a store gets no answer while its stream elects a leader), it stops
acting instead, as above; if the write was made, or may have been (its outcome is not
known, or its gateways' states were stored and its progress refused), the step's events
are recorded (the next leader resumes after that step), nothing else of it is done.

Each actor acts in one tenure of the lease (the epoch it was started in): once this
replica has stepped down, even if it leads again at once, the actor stops at its next
step, and its writes are refused (DistributionStore.tenure: the next tenure read the
store again). A write still in flight from the tenure before may land; the next tenure's
write of that key is then fenced, and the store read again.

Its parent, the distributor, writes its desired state (schemas/stored.py) before
starting it, and starts a new one from the stored record if it dies (SafeActor tells it
ChildDied). An ack that does not decode or does not match the push (distribution,
version, gateway) is dropped, counted and taken as no answer: the attempt fails and is
retried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pykka
from msgspec.structs import replace

from actors.base import SafeActor, safe_tell
from actors.context import Context
from actors.distribution_machine import (
    AskVersion,
    Command,
    DistributionMachine,
    Emit,
    Finished,
    NotAllowed,
    ScheduleGate,
    ScheduleRetry,
    ScheduleWake,
    Send,
    abandoned,
    finished_step,
)
from actors.distribution_store import DistributionStore, states_stored
from actors.messages import (
    Control,
    CounterBehind,
    DistributionChanged,
    GateDue,
    GatewayHealth,
    NotLeading,
    PushAnswered,
    RetryDue,
    VersionMoved,
    WakeDue,
)
from actors.paging import distribution_page
from actors.rollout import phase
from bus.edge import Drops, reply_error
from bus.fenced_kv import Fenced
from bus.jetstream import KvError
from bus.runtime import Reply, RequestFailed
from schemas.api import Distribution
from schemas.codec import DecodeError, decode, encode, error_cause
from schemas.events import DistributionEvent, utc_now
from schemas.wire import STALE_EPOCH, STALE_VERSION, ConfigAck, ConfigPush

log = logging.getLogger(__name__)

NOT_LEADING = "this replica no longer leads; retry"


def read_answer(
    result: Reply | RequestFailed, push: ConfigPush, gateway_id: str, drops: Drops, subject: str
) -> PushAnswered:
    """Runs on the bus loop: what the answer to `push` (sent to `gateway_id`) amounts to."""

    def no_answer(reason: str) -> PushAnswered:
        return PushAnswered(
            gateway_id=gateway_id,
            attempt=push.attempt,
            version=push.version,
            outcome="no_answer",
            detail=reason,
        )

    if isinstance(result, RequestFailed):
        return no_answer(result.reason)
    try:
        ack = decode(result.data, ConfigAck)
    except DecodeError as exc:
        drops.drop(error_cause(exc), subject, f"config ack: {exc}")
        return no_answer("malformed ack")
    expected = (push.distribution_id, push.version, gateway_id)
    if (ack.distribution_id, ack.version, ack.gateway_id) != expected:
        got = f"{ack.distribution_id} v{ack.version} from {ack.gateway_id}"
        drops.drop("ack_mismatch", subject, f"ack for {got}")
        return no_answer("mismatched ack")
    answered = PushAnswered(
        gateway_id=gateway_id, attempt=push.attempt, version=push.version, outcome="ack"
    )
    if ack.ok:
        return answered
    if ack.error == STALE_VERSION and ack.held_version is not None:
        return replace(answered, outcome="stale", held_version=ack.held_version)
    if ack.error == STALE_EPOCH and push.epoch is not None and (ack.held_epoch or 0) > push.epoch:
        return replace(answered, outcome="stale_epoch", held_epoch=ack.held_epoch)
    return replace(answered, outcome="nack", detail=ack.error or "rejected")


def step_event(record: Distribution, emit: Emit) -> DistributionEvent:
    """The event for one of the machine's Emit commands."""
    return DistributionEvent.of(
        record.id, record.config_type, record.version, emit.detail, emit.gateway_id
    )


class DistributionActor(SafeActor):
    dispatch = "workers"  # a pool shared by every distribution (they block on KV writes)

    def __init__(
        self,
        context: Context,
        record: Distribution,
        config_data: dict[str, Any],
        *,
        parent: pykka.ActorRef[Any],
        store: DistributionStore,
        epoch: int,
        unhealthy: Mapping[str, str] | None = None,
        unstored: bool = False,
    ) -> None:
        """`epoch`: the lease's tenure it acts in, and only in (this replica may lead
        again, in a newer one, while this actor is still stopping). `unhealthy`: its
        targets not healthy now (GatewayHealth keeps it current). `unstored`: `record`
        may be ahead of the store (see DistributionMachine.unsaved)."""
        super().__init__(context.runtime.dispatcher(self.dispatch, "distribution"))
        self._replies = context.runtime.api_bus  # answers to Control
        self.ctx = context
        self.bus = context.bus
        self.config_data = config_data
        self.store = store  # its progress and chunks are this actor's alone to write
        self._epoch = epoch
        self._tenure = store.tenure  # its writes are refused once the store is read again
        self.distributor = parent
        self.parent = parent  # told ChildDied if this actor dies (SafeActor)
        self.supervision_key = record.id
        settings = context.settings.orchestrator
        self.machine = DistributionMachine(
            record,
            batch_size=settings.distribution_batch_size,
            retry_count=settings.distribution_retry_count,
            retry_delay_s=settings.distribution_retry_delay_ms / 1000,
            unhealthy=unhealthy,
        )
        if unstored:
            self.machine.unsaved()
        self.ack_timeout_s = settings.distribution_ack_timeout_ms / 1000
        # Each target's position, which says in which chunk its state is stored.
        self._positions = {gw: n for n, gw in enumerate(record.target_gateways)}
        self._told = record
        self._pushes: dict[int, tuple[ConfigPush, bytes]] = {}  # per attempt number
        self._not_leading = False  # it has stopped acting, and is stopping

    def on_start(self) -> None:
        self._step(self.machine.resume(utc_now()))

    def handle(self, message: Any) -> Any:
        machine, now = self.machine, utc_now()
        match message:
            case Control(reply=reply) if self._not_leading:
                reply_error(self.replies, reply, "unavailable", NOT_LEADING)
            case _ if self._not_leading:
                pass  # what was on its way before it stopped acting
            case PushAnswered(gateway_id=gw, outcome="stale_epoch", held_epoch=int(held)):
                self._fenced(gw, held)
            case PushAnswered(version=version) | RetryDue(version=version) if (
                version != machine.record.version
            ):
                pass  # of the version before it moved: that gateway is pushed again
            case PushAnswered(gateway_id=gw, attempt=attempt, outcome="ack"):
                self._step(machine.on_ack(gw, now_wall=now, attempt=attempt))
            case PushAnswered(gateway_id=gw, attempt=attempt, outcome="nack", detail=error):
                self._step(machine.on_nack(gw, error or "rejected", now_wall=now, attempt=attempt))
            case PushAnswered(
                gateway_id=gw, attempt=attempt, outcome="stale", held_version=int(held)
            ):
                self._step(machine.on_stale(gw, held, now_wall=now, attempt=attempt))
            case PushAnswered(gateway_id=gw, attempt=attempt, detail=reason):
                self._step(
                    machine.on_timeout(gw, reason or "no ack", now_wall=now, attempt=attempt)
                )
            case RetryDue(gateway_id=gw):
                self._step(machine.on_retry_due(gw))
            case VersionMoved(version=int(version)):
                self._step(machine.move_version(version, now))
            case VersionMoved(reason=reason):
                self._step(machine.version_refused(reason or "not moved", now))
            case GatewayHealth(gateway_id=gw, healthy=healthy, reason=reason):
                self._step(machine.on_health(gw, healthy, reason, now_wall=now))
            case GateDue(batch=batch):
                self._step(machine.on_gate_due(batch, now_wall=now))
            case WakeDue():
                self._step(machine.on_wake(now))
            case Control(action=action, reply=reply):
                self._control(action, reply)
            case _:
                return super().handle(message)
        return None

    def _control(self, action: str, reply: str) -> None:
        """Pause, resume or abort; the answer is the record as stored after it."""
        machine, now = self.machine, utc_now()
        try:
            if action == "pause":
                commands = machine.pause()
            elif action == "resume":
                commands = machine.resume_paused(now)
            else:
                commands = machine.abort(now)
        except NotAllowed as exc:
            reply_error(self.replies, reply, "bad_request", str(exc))
            return
        if not self._step(commands):
            why = NOT_LEADING if self._not_leading else self._told.reason or "not stored"
            reply_error(self.replies, reply, "unavailable", why)
            return
        record = self.machine.record
        self.replies.publish(reply, distribution_page(record, phase=phase(record, now)))

    def _step(self, commands: list[Command]) -> bool:
        """Store a new record before anything goes out, tell the parent of it, then act.
        A record that cannot be stored ends the distribution failed, as it was told last:
        nothing of the step that needed the write is done (False). Nothing of it is done
        either once this replica no longer leads (False), also when it lost the lease
        while the write was being tried (a store gets no answer for seconds while its
        stream elects a leader): the next leader resumes from the store."""
        epoch = self._leading_epoch()
        if epoch is None:
            self._stop_acting()
            return False
        record = self.machine.record
        if record is not self._told:
            if _must_store(self._told, record, commands):
                try:
                    self._store(record)
                except Fenced as exc:
                    if states_stored(exc, record):
                        self._tell_stored(record, commands)
                    self._store_fenced(exc)
                    return False
                except KvError as exc:
                    if self._leading_epoch() != epoch:
                        self._tell_stored(record, commands)  # it may have been stored
                        self._stop_acting()
                    else:
                        self._give_up(f"cannot store its progress: {exc}")
                    return False
                if self._leading_epoch() != epoch:
                    self._tell_stored(record, commands)
                    self._stop_acting()
                    return False
            self._told = record
            changed = DistributionChanged(record=record, gateways=self.machine.told())
            safe_tell(self.distributor, changed)
        self._act(record, commands, epoch)
        return True

    def _tell_stored(self, record: Distribution, commands: list[Command]) -> None:
        """The events of a step stored (or maybe stored: a write whose outcome is not
        known) as the lease was lost: the next leader resumes after that step and will
        not tell them (nothing else of the step is done). A step recorded so that was
        not stored after all is done again, and recorded twice: never a gap."""
        for command in commands:
            if isinstance(command, Emit):
                self.ctx.emit_stored(step_event(record, command))

    def _leading_epoch(self) -> int | None:
        """Its epoch while this replica leads in it, else None."""
        lease = self.ctx.lease
        view = lease.view
        if view.role != "leader" or view.epoch != self._epoch or not lease.still_leader():
            return None
        return view.epoch

    def _fenced(self, gateway_id: str, held_epoch: int) -> None:
        """A gateway has seen a push of a higher epoch than this replica's: another
        replica has led since. Stepping down stops every step of the leader at once."""
        log.warning(
            "distribution %s: gateway %s has seen epoch %d, above this replica's: another "
            "replica has led since; stepping down",
            self.machine.record.id,
            gateway_id,
            held_epoch,
        )
        why = f"gateway {gateway_id} has seen epoch {held_epoch}"
        self.ctx.lease.step_down(held_epoch, why, epoch=self._epoch)
        self._stop_acting()

    def _store_fenced(self, fenced: Fenced) -> None:
        """A write of its record was refused: another replica has written its keys since,
        so leads now. This replica steps down, as for a stale epoch (unless it leads in a
        newer tenure already: the write was of this actor's, which has ended)."""
        self.ctx.lease.step_down(why=str(fenced), epoch=self._epoch)
        self._stop_acting()

    def _stop_acting(self) -> None:
        """This replica no longer leads: nothing more is sent, stored or failed. The
        record stays as stored (the steps since are redone from it), for the leader."""
        self._not_leading = True
        told = self._told  # as stored, but for acks (a send is stored first)
        log.warning(
            "distribution %s paused: this replica no longer leads; it stays as stored "
            "(%s, batch %d), for the leader to resume",
            told.id,
            told.status,
            told.batch,
        )
        safe_tell(self.distributor, NotLeading(distribution_id=told.id, urn=self.actor_urn))
        self.stop()

    def _store(self, record: Distribution) -> None:
        """Its progress and the states changed since the last store (the machine's)."""
        changed = [self._positions[gw] for gw in self.machine.changed]
        self.store.put_progress(record, changed, tenure=self._tenure)
        self.machine.saved()

    def _give_up(self, reason: str) -> None:
        """Ends failed, from the last record told (what has really been sent)."""
        failed = abandoned(self._told, reason, utc_now())
        try:
            # Every state the step changed, as it was told (its changes are not done).
            changed = [self._positions[gw] for gw in self.machine.changed]
            self.store.put_progress(failed, changed, tenure=self._tenure)
        except Fenced as fenced:
            self._store_fenced(fenced)
            return
        except KvError as exc:
            log.error(  # noqa: TRY400 - a known failure: one line, no traceback
                "distribution %s failed and that cannot be stored either (%s): after a "
                "restart it resumes from its last stored record",
                failed.id,
                exc,
            )
        self._told = failed
        log.error("distribution %s failed: %s", failed.id, reason)
        self.ctx.emit(step_event(failed, Emit(finished_step(failed))))
        safe_tell(self.distributor, DistributionChanged(record=failed))
        self.stop()

    def _act(self, record: Distribution, commands: list[Command], epoch: int) -> None:
        for command in commands:
            match command:
                case Send(gateway_id=gw, attempt=attempt):
                    self._send(gw, attempt, epoch)
                case ScheduleRetry(gateway_id=gw, delay_s=delay_s):
                    due = RetryDue(gateway_id=gw, version=record.version)
                    self.bus.call_later(delay_s, safe_tell, self.actor_ref, due)
                case AskVersion(above=held):
                    behind = CounterBehind(
                        distribution_id=record.id, held_version=held, content=self.config_data
                    )
                    safe_tell(self.distributor, behind)
                case ScheduleGate(batch=batch, delay_s=delay_s):
                    self._timer(delay_s, GateDue(batch=batch))
                case ScheduleWake(delay_s=delay_s):
                    self._timer(delay_s, WakeDue())
                case Emit():
                    self.ctx.emit(step_event(record, command))
                case Finished(status=status):
                    log.info("distribution %s finished: %s", record.id, status)
                    self.stop()

    def _timer(self, delay_s: float, message: GateDue | WakeDue) -> None:
        self.ctx.runtime.timers.schedule(delay_s, safe_tell, self.actor_ref, message)

    def _send(self, gateway_id: str, attempt: int, epoch: int) -> None:
        push, body = self._push(attempt, epoch)
        subject = self.ctx.subjects.config(gateway_id)
        ref, drops = self.actor_ref, self.ctx.drops

        def on_result(result: Reply | RequestFailed) -> None:
            safe_tell(ref, read_answer(result, push, gateway_id, drops, subject))

        self.bus.request(subject, body, self.ack_timeout_s, on_result)

    def _push(self, attempt: int, epoch: int) -> tuple[ConfigPush, bytes]:
        """The push for `attempt`, encoded once per version and epoch: it is the same for
        every gateway."""
        record = self.machine.record
        found = self._pushes.get(attempt)
        if found is None or (found[0].version, found[0].epoch) != (record.version, epoch):
            push = ConfigPush(
                distribution_id=record.id,
                config_type=record.config_type,
                version=record.version,
                config_data=self.config_data,
                attempt=attempt,
                epoch=epoch,
            )
            found = self._pushes[attempt] = (push, encode(push))
        return found


def _must_store(told: Distribution, record: Distribution, commands: list[Command]) -> bool:
    """Whether a step's record is stored before it is carried out: it sends, waits (a
    retry, a gate, a window), ends, or changes the status, the gate or a gateway's
    health verdict (acks and nacks alone are not: a resend after a crash recovers them)."""
    if any(
        isinstance(c, Send | ScheduleRetry | ScheduleGate | ScheduleWake | Finished)
        for c in commands
    ):
        return True
    if (told.status, told.gate_until, told.gated_batch) != (
        record.status,
        record.gate_until,
        record.gated_batch,
    ):
        return True
    return any(
        isinstance(c, Emit) and c.step in ("gateway_unhealthy", "version_moved") for c in commands
    )
