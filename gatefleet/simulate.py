"""A simulated gateway fleet, light enough to run 10,000 gateways beside the orchestrator.

Gateways are named `sim-<region>-<n>` (n counts from 1 within each region) and dealt
round-robin over the regions. Within a region every `backup_every`-th gateway (n = 5,
10, ... by default; 0 turns this off) is a `backup` for the one just before it; the
rest are `primary`. Metrics are a random walk seeded per gateway from `seed`, so a run
is reproducible: cpu 5-95 % (drawn towards the connection load), memory 20-90 %,
connections 0..max_connections (500, 750 or 1000), latency 1-80 ms.

The whole fleet is one engine on ONE NATS connection (it speaks PROTOCOL.md section 1
for every simulated gateway; it does not use `gatefleet.gateway.agent.GatewayAgent`):

- two wildcard subscriptions, `P.gw.*.ping` and `P.gw.*.config`, dispatch on the id
  token; an id that is not simulated, or whose gateway is crashed, gets no answer, so a
  requester sees "no responders" or a timeout as it would for a real dead gateway
  (with `gateway_auth`, for a small fleet on a bus with auth, each gateway has a
  connection of its own instead, with its own gateway credential, subscribed to its
  own subjects: it can speak for no other gateway);
- one task sends every heartbeat: the interval is cut into slots of about 10 ms and each
  gateway owns one slot (a seeded, even deal), so beats are spread evenly. A slot that
  comes due more than a slot late is skipped, not burst (those gateways miss one beat);
- what never changes in a gateway's heartbeat (id, region, role, backup_for,
  max_connections, labels) is encoded once; seq, ts, metrics and config_versions are
  spliced in per beat. Publishes go through `nc.publish` and nats-py batches the
  writes; nothing awaits a flush per message. Publish errors (a lost connection, while
  nats-py reconnects) are counted and logged once per outage, and the fleet keeps going.

Config pushes are acked per protocol and are idempotent on (distribution_id, version):
a repeat is acked again without being applied again. As `GatewayAgent` does, a push of a
version lower than the one a gateway holds for its type is not applied: it is nacked
with `stale_version` and the version held; and a push whose epoch is lower than the
highest a gateway has seen (of any type) is nacked with `stale_epoch` and that epoch.
Applied versions show in the gateway's next heartbeats. With `record`, every push answered is reported as a
`PushRecord` (applied or not, acked or nacked, the answer sent or not), e.g. to a file
(`gatefleet simulate --record FILE`) for a chaos run to check what each gateway applied.

Faults (`Faults`) pick an exact, seeded share of the gateways for each kind:
`stop_beating` (heartbeats stop after `after_s`, still connected and answering),
`crash` (gone after `after_s`: no beats, no answers, no goodbye), `flap` (heartbeats
paused and resumed every `flap_period_s`), `slow_acks` (config acks after
`slow_ack_s`), `fail_acks` (every push NACKed, nothing applied) and `silent` (pushes
never answered). With `recover_after_s`, stopped gateways beat again and crashed ones
restart (seq from 1, applied config kept, as on disk) that long after the fault.
On a normal stop every gateway that is not crashed publishes a goodbye.

This module prints nothing; it logs one INFO line when the fleet is up and one when it
stops. `run_simulation` is the asyncio entry; `run_simulation_blocking` runs its own
loop (uvloop when available) in the calling thread until a `threading.Event` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus.connection import CONNECT_ERRORS, ClientAuth, close_connection
from bus.subjects import check_gateway_id
from gatefleet.gateway import Metrics, connect
from schemas.codec import DecodeError, decoder
from schemas.types import Role
from schemas.wire import STALE_EPOCH, STALE_VERSION, ConfigAck, ConfigPush

log = logging.getLogger(__name__)

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_STOP_POLL_S = 0.1
_SLOT_S = 0.01  # heartbeat schedule granularity
_LABELS = {"simulated": "true"}
_FAIL_ERROR = "injected failure (fail_acks)"
_BEAT_TAIL = (
    b'%d,"ts":"%s","cpu_percent":%.1f,"memory_percent":%.1f,'
    b'"active_connections":%d,"latency_ms":%.2f,"config_versions":%s}'
)


@dataclass(frozen=True)
class Faults:
    """Shares (0-1) of the fleet given each fault; all zero means a healthy fleet."""

    stop_beating: float = 0.0
    crash: float = 0.0
    flap: float = 0.0
    slow_acks: float = 0.0
    fail_acks: float = 0.0
    silent: float = 0.0
    after_s: float = 10.0  # when stop_beating and crash strike, from the start
    recover_after_s: float | None = None  # stopped/crashed gateways come back this much later
    flap_period_s: float = 5.0
    slow_ack_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("stop_beating", "crash", "flap", "slow_acks", "fail_acks", "silent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"fault share {name} must be within 0-1")
        if self.after_s < 0 or self.flap_period_s <= 0 or self.slow_ack_s < 0:
            raise ValueError("need after_s >= 0, flap_period_s > 0, slow_ack_s >= 0")

    def describe(self) -> str:
        shares = {
            "stop": self.stop_beating,
            "crash": self.crash,
            "flap": self.flap,
            "slow": self.slow_acks,
            "fail": self.fail_acks,
            "silent": self.silent,
        }
        active = [f"{name} {share:.0%}" for name, share in shares.items() if share > 0]
        return ", ".join(active) or "none"


@dataclass(frozen=True)
class GatewayPlan:
    gateway_id: str
    region: str
    role: Role
    backup_for: str | None
    max_connections: int


@dataclass(frozen=True, slots=True)
class PushRecord:
    """A config push a simulated gateway answered."""

    gateway_id: str
    distribution_id: str
    config_type: str
    version: int
    applied: bool  # the first push of its (distribution_id, version) to this gateway
    ok: bool  # acked (False: nacked)
    sent: bool  # the answer went out (False: the connection was down, or it crashed)


Recorder = Callable[[PushRecord], None]
# A gateway id -> the credentials and CA of its own connection.
GatewayAuth = Callable[[str], ClientAuth]


@dataclass
class SimulationSummary:
    gateways: int
    regions: list[str]
    backups: int
    faulty: dict[str, list[str]] = field(default_factory=dict)  # fault kind -> gateway ids
    heartbeats_sent: int = 0
    config_pushes: int = 0
    duration_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the thread running the simulation's event loop
    heartbeats_skipped: int = 0  # beats dropped because the loop fell behind
    pings_answered: int = 0
    publish_errors: int = 0


def region_token(region: str) -> str:
    """`region` made safe for a gateway id (`eu west` -> `eu-west`)."""
    return _ID_UNSAFE.sub("-", region).strip("-")[:40] or "region"


def plan_gateways(
    count: int, regions: Sequence[str], *, seed: int = 0, backup_every: int = 5
) -> list[GatewayPlan]:
    """Names, regions, roles and capacities of a simulated fleet (deterministic)."""
    if count < 0 or not regions:
        raise ValueError("need count >= 0 and at least one region")
    rng = random.Random(seed)
    per_region: dict[str, int] = {}
    plans: list[GatewayPlan] = []
    for i in range(count):
        region = regions[i % len(regions)]
        n = per_region[region] = per_region.get(region, 0) + 1
        name = f"sim-{region_token(region)}-{n}"
        is_backup = backup_every > 0 and n % backup_every == 0
        backup_for = f"sim-{region_token(region)}-{n - 1}" if is_backup else None
        capacity = rng.choice((500, 750, 1000))
        role: Role = "backup" if is_backup else "primary"
        plans.append(GatewayPlan(name, region, role, backup_for, capacity))
    return plans


def assign_faults(gateway_ids: Sequence[str], faults: Faults, seed: int) -> dict[str, list[str]]:
    """For each fault kind with a share > 0, exactly round(share * count) gateways."""
    rng = random.Random(f"faults:{seed}")
    chosen: dict[str, list[str]] = {}
    for kind in ("stop_beating", "crash", "flap", "slow_acks", "fail_acks", "silent"):
        share: float = getattr(faults, kind)
        if share > 0:
            chosen[kind] = sorted(rng.sample(list(gateway_ids), round(share * len(gateway_ids))))
    return chosen


# Standard normal draws, made once (seeded) and indexed by a per-gateway generator: a
# walk step costs a few integer operations instead of four `random.gauss` calls, and a
# gateway's generator is one int instead of a 2.5 KB `random.Random`.
_normals_rng = random.Random("gatefleet-normals")
_raw_normals = [_normals_rng.gauss(0.0, 1.0) for _ in range(4096)]
_mean, _sd = statistics.fmean(_raw_normals), statistics.pstdev(_raw_normals)
_NORMALS: Final = tuple((z - _mean) / _sd for z in _raw_normals)  # exactly mean 0, sd 1: no drift
_LCG_MUL: Final = 6364136223846793005  # Knuth's MMIX linear congruential generator
_LCG_ADD: Final = 1442695040888963407
_MASK64: Final = (1 << 64) - 1


class MetricsWalk:
    """A gateway's load as a bounded random walk; `step()` (or a call) is one step.

    Seeded per gateway: the same seed and gateway id give the same walk, whatever else runs.
    """

    __slots__ = ("_state", "connections", "cpu", "latency", "max_connections", "memory")

    def __init__(self, seed: int, gateway_id: str, max_connections: int) -> None:
        key = f"metrics:{seed}:{gateway_id}".encode()
        self._state = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        self.max_connections = max_connections
        self.connections = int(self._uniform() * (max_connections // 2 + 1))
        self.cpu = 10.0 + 50.0 * self._uniform()
        self.memory = 30.0 + 40.0 * self._uniform()
        self.latency = 2.0 + 28.0 * self._uniform()

    def _uniform(self) -> float:
        self._state = (self._state * _LCG_MUL + _LCG_ADD) & _MASK64
        return (self._state >> 11) / 9007199254740992.0  # [0, 1) from the top 53 bits

    def step(self) -> None:
        # One generator step gives four 12-bit indexes (bits 16-63: the well-mixed ones).
        state = self._state = (self._state * _LCG_MUL + _LCG_ADD) & _MASK64
        normals, cap = _NORMALS, self.max_connections
        connections = self.connections + round(normals[state >> 52] * cap * 0.03)
        connections = self.connections = cap if connections > cap else max(connections, 0)
        cpu = self.cpu + 0.2 * (5.0 + 90.0 * connections / cap - self.cpu)
        cpu += normals[(state >> 40) & 4095] * 3.0
        self.cpu = 95.0 if cpu > 95.0 else max(cpu, 5.0)
        memory = self.memory + normals[(state >> 28) & 4095] * 1.5
        self.memory = 90.0 if memory > 90.0 else max(memory, 20.0)
        latency = self.latency + normals[(state >> 16) & 4095] * 2.0
        self.latency = 80.0 if latency > 80.0 else max(latency, 1.0)

    def __call__(self) -> Metrics:
        self.step()
        return Metrics(
            cpu_percent=round(self.cpu, 1),
            memory_percent=round(self.memory, 1),
            active_connections=self.connections,
            latency_ms=round(self.latency, 2),
            max_connections=self.max_connections,
        )


class _Gateway:
    """One simulated gateway's state: pre-encoded bytes, seq, metrics, faults, config."""

    __slots__ = (
        "beat_head",
        "beat_subject",
        "config_versions",
        "crashed",
        "fail_acks",
        "flapped_off",
        "gateway_id",
        "generation",
        "highest_epoch",
        "id_body",
        "nc",
        "results",
        "seq",
        "silent",
        "slow",
        "stopped",
        "versions_json",
        "walk",
    )

    def __init__(self, plan: GatewayPlan, prefix: str, seed: int, nc: Client) -> None:
        gid = check_gateway_id(plan.gateway_id)
        if plan.backup_for is not None:
            check_gateway_id(plan.backup_for)
        if not 1 <= len(plan.region) <= 64:
            raise ValueError(f"region must be 1-64 characters: {plan.region!r}")
        self.gateway_id = gid
        self.nc = nc  # the connection it speaks on (shared by the fleet, or its own)
        self.beat_subject = f"{prefix}.gw.{gid}.heartbeat"
        static = msgspec.json.encode(
            {
                "gateway_id": gid,
                "region": plan.region,
                "role": plan.role,
                "backup_for": plan.backup_for,
                "max_connections": plan.max_connections,
                "labels": _LABELS,
            }
        )
        self.beat_head = static[:-1] + b',"seq":'
        self.id_body = msgspec.json.encode({"gateway_id": gid})  # a Pong and a Goodbye
        self.walk = MetricsWalk(seed, gid, plan.max_connections)
        self.seq = 0
        self.generation = 0  # a restart makes a new process: its old slow acks are lost
        self.stopped = self.crashed = self.flapped_off = False
        self.slow = self.fail_acks = self.silent = False
        self.config_versions: dict[str, int] = {}
        self.highest_epoch = 0  # of the pushes seen; 0: none carried one
        self.versions_json = b"{}"
        self.results: dict[tuple[str, int], bool] | None = None  # pushes applied (True)

    def heartbeat(self, ts: bytes) -> bytes:
        """The next heartbeat's JSON (takes a seq); `ts` is RFC 3339 text."""
        walk = self.walk
        walk.step()
        self.seq += 1
        return self.beat_head + _BEAT_TAIL % (
            self.seq,
            ts,
            walk.cpu,
            walk.memory,
            walk.connections,
            walk.latency,
            self.versions_json,
        )


def _rfc3339(epoch_s: float) -> bytes:
    ms = int(epoch_s * 1000)
    whole, frac = divmod(ms, 1000)
    return b"%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode(), frac)


class _Fleet:
    """Every simulated gateway, each on its connection: the dispatch, the beats, the timeline."""

    def __init__(
        self,
        connections: Mapping[str, Client],
        plans: Sequence[GatewayPlan],
        *,
        prefix: str,
        interval_s: float,
        seed: int,
        faults: Faults,
        chosen: dict[str, list[str]],
        record: Recorder | None = None,
    ) -> None:
        self.record = record
        self.prefix = prefix
        self.interval_s = interval_s
        self.faults = faults
        self.chosen = chosen
        self.gateways = {
            p.gateway_id: _Gateway(p, prefix, seed, connections[p.gateway_id]) for p in plans
        }
        for gid in chosen.get("slow_acks", ()):
            self.gateways[gid].slow = True
        for gid in chosen.get("fail_acks", ()):
            self.gateways[gid].fail_acks = True
        for gid in chosen.get("silent", ()):
            self.gateways[gid].silent = True
        # An even, seeded deal of the gateways over the interval's slots.
        order = list(self.gateways.values())
        random.Random(f"stagger:{seed}").shuffle(order)
        n_slots = max(1, min(len(order), round(interval_s / _SLOT_S)))
        self.slots: list[list[_Gateway]] = [order[i::n_slots] for i in range(n_slots)]
        self._id_start = len(prefix) + len(".gw.")
        self._pending: set[asyncio.Task[None]] = set()
        self.heartbeats_sent = 0
        self.heartbeats_skipped = 0
        self.config_pushes = 0
        self.pings_answered = 0
        self.publish_errors = 0
        self.malformed_pushes = 0
        self._failing_since: int | None = None
        self.struck = False

    # Publishing ---------------------------------------------------------------------------

    async def _publish(self, gw: _Gateway, subject: str, body: bytes) -> bool:
        try:
            await gw.nc.publish(subject, body)
        except CONNECT_ERRORS as exc:
            self._failed(subject, exc)
            return False
        if self._failing_since is not None and gw.nc.is_connected:
            self._recovered()
        return True

    def _failed(self, subject: str, exc: BaseException) -> None:
        self.publish_errors += 1
        if self._failing_since is None:
            self._failing_since = self.publish_errors - 1
            log.warning("simulator: publish to %s failed: %r", subject, exc)

    def _recovered(self) -> None:
        """Publishes go through again on a live connection (not just into nats-py's buffer)."""
        assert self._failing_since is not None
        lost = self.publish_errors - self._failing_since
        log.info("simulator: publishing again after %d failed publishes", lost)
        self._failing_since = None

    # Heartbeats ---------------------------------------------------------------------------

    async def beat_forever(self) -> None:
        loop = asyncio.get_running_loop()
        slots = self.slots
        n_slots = len(slots)
        slot_s = self.interval_s / n_slots
        start = loop.time()
        tick = 0
        while True:
            due = start + tick * slot_s
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > slot_s:  # fell behind (a stalled loop): skip, don't burst
                late = int((now - start) / slot_s)
                rounds, rest = divmod(late - tick, n_slots)
                skipped = sum(len(slots[(tick + i) % n_slots]) for i in range(rest))
                self.heartbeats_skipped += rounds * len(self.gateways) + skipped
                tick = late
            await self._beat_slot(slots[tick % n_slots])
            tick += 1

    async def _beat_slot(self, slot: list[_Gateway]) -> None:
        ts = _rfc3339(time.time())
        sent = 0
        last: Client | None = None  # the connection of the last beat sent
        for gw in slot:
            if gw.stopped or gw.crashed or gw.flapped_off:
                continue
            try:
                await gw.nc.publish(gw.beat_subject, gw.heartbeat(ts))
            except CONNECT_ERRORS as exc:
                self._failed(gw.beat_subject, exc)
                continue
            sent += 1
            last = gw.nc
        if last is not None and self._failing_since is not None and last.is_connected:
            self._recovered()
        self.heartbeats_sent += sent

    # Requests -----------------------------------------------------------------------------

    def _live(self, subject: str, verb_len: int) -> _Gateway | None:
        gw = self.gateways.get(subject[self._id_start : -verb_len])
        return None if gw is None or gw.crashed else gw

    async def on_ping(self, msg: Msg) -> None:
        gw = self._live(msg.subject, len(".ping"))
        if gw is not None and msg.reply and await self._publish(gw, msg.reply, gw.id_body):
            self.pings_answered += 1

    async def on_config(self, msg: Msg) -> None:
        gw = self._live(msg.subject, len(".config"))
        if gw is None:
            return
        try:
            push = decoder(ConfigPush).decode(msg.data)
        except DecodeError as exc:
            self.malformed_pushes += 1
            log.warning("%s: malformed config push dropped: %s", gw.gateway_id, exc)
            return
        self.config_pushes += 1
        if gw.silent or not msg.reply:
            return
        answer = _answer(gw, push)
        ack = msgspec.json.encode(answer.ack)
        if gw.slow and self.faults.slow_ack_s > 0:
            task = asyncio.get_running_loop().create_task(
                self._ack_later(gw, gw.generation, msg.reply, ack, (push, answer))
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            self._recorded(gw, push, answer, await self._publish(gw, msg.reply, ack))

    async def _ack_later(
        self,
        gw: _Gateway,
        generation: int,
        reply: str,
        ack: bytes,
        pushed: tuple[ConfigPush, Answer],
    ) -> None:
        sent = False
        try:
            await asyncio.sleep(self.faults.slow_ack_s)
            if not gw.crashed and gw.generation == generation:
                sent = await self._publish(gw, reply, ack)
        finally:
            self._recorded(gw, *pushed, sent)

    def _recorded(self, gw: _Gateway, push: ConfigPush, answer: Answer, sent: bool) -> None:
        if self.record is not None:
            self.record(
                PushRecord(
                    gateway_id=gw.gateway_id,
                    distribution_id=push.distribution_id,
                    config_type=push.config_type,
                    version=push.version,
                    applied=answer.applied,
                    ok=answer.ack.ok,
                    sent=sent,
                )
            )

    # Faults -------------------------------------------------------------------------------

    async def run_faults(self) -> None:
        """The fault timeline: flapping throughout, stop/crash at after_s, then recovery."""
        flappers = [self.gateways[g] for g in self.chosen.get("flap", ())]
        timeline = [asyncio.create_task(self._flap(flappers))] if flappers else []
        timeline.append(asyncio.create_task(self._strike()))
        try:
            await asyncio.gather(*timeline)
        finally:
            for task in timeline:
                task.cancel()
            await asyncio.gather(*timeline, return_exceptions=True)

    async def _flap(self, flappers: list[_Gateway]) -> None:
        while True:
            await asyncio.sleep(self.faults.flap_period_s)
            for gw in flappers:
                gw.flapped_off = not gw.flapped_off

    async def _strike(self) -> None:
        if not self.chosen.get("stop_beating") and not self.chosen.get("crash"):
            return
        if not self.struck:
            await asyncio.sleep(self.faults.after_s)
            self.strike()
        if self.faults.recover_after_s is not None:
            await asyncio.sleep(self.faults.recover_after_s)
            self.recover()

    def strike(self) -> None:
        """stop_beating and crash take effect (run_simulation calls it early when after_s is 0)."""
        self.struck = True
        stoppers = self.chosen.get("stop_beating", ())
        crashers = self.chosen.get("crash", ())
        for gid in stoppers:
            self.gateways[gid].stopped = True
        for gid in crashers:
            self.gateways[gid].crashed = True
        if stoppers or crashers:
            log.info(
                "faults: %d gateways stopped beating, %d crashed", len(stoppers), len(crashers)
            )

    def recover(self) -> None:
        stoppers = self.chosen.get("stop_beating", ())
        crashers = self.chosen.get("crash", ())
        for gid in stoppers:
            self.gateways[gid].stopped = False
        for gid in crashers:  # a new process: seq from 1, applied config kept (on disk)
            gw = self.gateways[gid]
            gw.seq = 0
            gw.generation += 1
            gw.flapped_off = False
            gw.crashed = False
        log.info("faults: %d gateways recovered", len(stoppers) + len(crashers))

    # Stopping -----------------------------------------------------------------------------

    async def goodbyes(self) -> None:
        """Drops pending slow acks, then every gateway that is not crashed says goodbye."""
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        prefix = self.prefix
        for gid, gw in self.gateways.items():
            if not gw.crashed:
                await self._publish(gw, f"{prefix}.gw.{gid}.goodbye", gw.id_body)


@dataclass(frozen=True, slots=True)
class Answer:
    """A simulated gateway's answer to a push, and whether this push applied it."""

    ack: ConfigAck
    applied: bool


def _answer(gw: _Gateway, push: ConfigPush) -> Answer:
    """Applies `push` (once per distribution and version, never below the version held,
    never from an epoch below the highest seen)."""
    ack = ConfigAck(
        distribution_id=push.distribution_id,
        gateway_id=gw.gateway_id,
        ok=True,
        version=push.version,
    )
    if gw.fail_acks:  # injected, so not remembered: clearing the fault heals a retry
        return Answer(msgspec.structs.replace(ack, ok=False, error=_FAIL_ERROR), False)
    if push.epoch is not None:
        if push.epoch < gw.highest_epoch:  # from a replaced leader: nothing of it
            fenced = msgspec.structs.replace(
                ack, ok=False, error=STALE_EPOCH, held_epoch=gw.highest_epoch
            )
            return Answer(fenced, False)
        gw.highest_epoch = push.epoch
    key = (push.distribution_id, push.version)
    if gw.results is None:
        gw.results = {}
    if key in gw.results:
        return Answer(ack, False)
    held = gw.config_versions.get(push.config_type, 0)
    if push.version < held:  # not remembered: what is held only grows
        stale = msgspec.structs.replace(ack, ok=False, error=STALE_VERSION, held_version=held)
        return Answer(stale, False)
    gw.results[key] = True
    if push.version > held:
        gw.config_versions[push.config_type] = push.version
        gw.versions_json = msgspec.json.encode(gw.config_versions)
    return Answer(ack, True)


async def run_simulation(
    url: str,
    count: int,
    regions: Sequence[str],
    *,
    prefix: str = "gatefleet",
    interval_s: float = 1.0,
    seed: int = 0,
    faults: Faults | None = None,
    duration_s: float | None = None,
    stop_event: asyncio.Event | None = None,
    backup_every: int = 5,
    ready: asyncio.Event | None = None,
    auth: ClientAuth | None = None,
    gateway_auth: GatewayAuth | None = None,
    record: Recorder | None = None,
) -> SimulationSummary:
    """Runs the fleet until `stop_event` is set or `duration_s` passes, then says goodbye.

    `auth`: the credentials (a simulator credential: every gateway's permissions) and CA.
    `gateway_auth` instead: one connection per gateway, with the credentials and CA it
    gives for that gateway's id (a gateway credential each; for small fleets).

    `ready` is set once the fleet answers pings and config pushes, just before the first beat.

    `cpu_s` in the summary is the CPU time of the thread running this loop, so it
    includes anything else on the same loop.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    faults = faults or Faults()
    plans = plan_gateways(count, regions, seed=seed, backup_every=backup_every)
    chosen = assign_faults([p.gateway_id for p in plans], faults, seed)
    cpu_started = time.thread_time()
    started = time.monotonic()
    gateway_ids = [p.gateway_id for p in plans]
    connections = await _connect(url, gateway_ids, auth, gateway_auth)
    try:
        fleet = _Fleet(
            connections.of(gateway_ids),
            plans,
            prefix=prefix,
            interval_s=interval_s,
            seed=seed,
            faults=faults,
            chosen=chosen,
            record=record,
        )
        await connections.subscribe(fleet)
        summary = SimulationSummary(
            gateways=len(plans),
            regions=list(regions),
            backups=sum(p.role == "backup" for p in plans),
            faulty=chosen,
        )
        log.info(
            "simulating %d gateways in %d regions (%d backups) on %s, prefix %s, faults: %s",
            summary.gateways,
            len(regions),
            summary.backups,
            url,
            prefix,
            faults.describe(),
        )
        if faults.after_s == 0:
            fleet.strike()  # before the first beat
        if ready is not None:
            ready.set()
        tasks = [asyncio.create_task(fleet.run_faults())]
        if fleet.gateways:
            tasks.append(asyncio.create_task(fleet.beat_forever(), name="simulator-heartbeats"))
        try:
            await _wait_until_stopped(stop_event, duration_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await fleet.goodbyes()
    finally:
        await connections.close()
    summary.heartbeats_sent = fleet.heartbeats_sent
    summary.heartbeats_skipped = fleet.heartbeats_skipped
    summary.config_pushes = fleet.config_pushes
    summary.pings_answered = fleet.pings_answered
    summary.publish_errors = fleet.publish_errors
    summary.duration_s = time.monotonic() - started
    summary.cpu_s = time.thread_time() - cpu_started
    log.info(
        "simulation stopped after %.1fs: %d heartbeats, %d config pushes, %.1fs CPU",
        summary.duration_s,
        summary.heartbeats_sent,
        summary.config_pushes,
        summary.cpu_s,
    )
    return summary


@dataclass
class _Connections:
    """The fleet's connections: one `shared` by every gateway, or each gateway's `own`."""

    shared: Client | None = None
    own: dict[str, Client] = field(default_factory=dict)

    def of(self, gateway_ids: Sequence[str]) -> dict[str, Client]:
        """Each gateway id -> the connection it speaks on."""
        return self.own if self.shared is None else dict.fromkeys(gateway_ids, self.shared)

    async def subscribe(self, fleet: _Fleet) -> None:
        """Ping and config: on the shared connection for every id (wildcards), or on each
        gateway's own connection for its id alone."""
        prefix = fleet.prefix
        if self.shared is not None:
            await self.shared.subscribe(f"{prefix}.gw.*.ping", cb=fleet.on_ping)
            await self.shared.subscribe(f"{prefix}.gw.*.config", cb=fleet.on_config)
            await self.shared.flush()
            return
        for gid, nc in self.own.items():
            await nc.subscribe(f"{prefix}.gw.{gid}.ping", cb=fleet.on_ping)
            await nc.subscribe(f"{prefix}.gw.{gid}.config", cb=fleet.on_config)
        await asyncio.gather(*(nc.flush() for nc in self.own.values()))

    async def close(self) -> None:
        """Flushes each (goodbyes out before the connection goes), then closes it."""
        for nc in [*([self.shared] if self.shared else []), *self.own.values()]:
            with contextlib.suppress(*CONNECT_ERRORS):
                await nc.flush()
            await close_connection(nc)


async def _connect(
    url: str, gateway_ids: Sequence[str], auth: ClientAuth | None, gateway_auth: GatewayAuth | None
) -> _Connections:
    """One shared connection, or with `gateway_auth` one per gateway: all or none (if one
    fails, those opened are closed)."""
    # Subjects are built from checked ids only, so nats-py need not re-check each publish.
    if gateway_auth is None:
        options = (auth or ClientAuth()).options()
        nc = await connect(url, name="gatefleet-simulator", skip_subject_validation=True, **options)
        return _Connections(shared=nc)
    opening = [
        connect(
            url,
            name=f"gatefleet-simulator-{gid}",
            skip_subject_validation=True,
            **gateway_auth(gid).options(),
        )
        for gid in gateway_ids
    ]
    opened = await asyncio.gather(*opening, return_exceptions=True)
    own = {gid: nc for gid, nc in zip(gateway_ids, opened, strict=True) if isinstance(nc, Client)}
    failure = next((e for e in opened if isinstance(e, BaseException)), None)
    if failure is not None:
        await _Connections(own=own).close()
        raise failure
    return _Connections(own=own)


async def _wait_until_stopped(stop_event: asyncio.Event | None, duration_s: float | None) -> None:
    event = stop_event or asyncio.Event()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), duration_s)


def run_simulation_blocking(
    url: str,
    count: int,
    regions: Sequence[str],
    *,
    stop: threading.Event,
    prefix: str = "gatefleet",
    interval_s: float = 1.0,
    seed: int = 0,
    faults: Faults | None = None,
    duration_s: float | None = None,
    backup_every: int = 5,
    use_uvloop: bool = True,
    auth: ClientAuth | None = None,
    gateway_auth: GatewayAuth | None = None,
    record: Recorder | None = None,
) -> SimulationSummary:
    """`run_simulation` on a fresh event loop in this thread, until `stop` is set.

    On the main thread SIGINT and SIGTERM also stop it (cleanly, with goodbyes).
    """

    async def main() -> SimulationSummary:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop_event.set)
        watcher = asyncio.create_task(_watch(stop, stop_event))
        try:
            return await run_simulation(
                url,
                count,
                regions,
                prefix=prefix,
                interval_s=interval_s,
                seed=seed,
                faults=faults,
                duration_s=duration_s,
                stop_event=stop_event,
                backup_every=backup_every,
                auth=auth,
                gateway_auth=gateway_auth,
                record=record,
            )
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if on_main:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
        return runner.run(main())


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415 - optional speed-up
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


async def _watch(stop: threading.Event, stop_event: asyncio.Event) -> None:
    while not stop.is_set():  # noqa: ASYNC110 - a threading.Event cannot be awaited: poll it
        await asyncio.sleep(_STOP_POLL_S)
    stop_event.set()
