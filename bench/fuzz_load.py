"""The fuzz load: a process of its own that sends the fuzzed messages and answers
gatefleet's pings and config pushes with fuzzed bodies, keeping the books.

It has two connections. The *load* connection publishes the gateway messages, sends the
API requests (at most `concurrency` in flight; each must be answered within
`request_timeout_s`), keeps the `hb` and `bye` gateways alive with good heartbeats, and
answers `P.gw.*.ping` and `P.gw.*.config` for every id. The *observer* connection
subscribes to the same gateway patterns as gatefleet's edge (actors/routes.py) and
judges each message delivered there as the edge does (`gateway_outcome`): the drops
gatefleet must have counted, cause by cause, are those.

Every message sent is judged twice: by `expect` (what docs/PROTOCOL.md says, from the
generator) and by the oracle functions below (what the edge must do, from the product's
own decoders and subject rules). Disagreements are reported, not fatal: they show where
the schema and the documented protocol differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import nats
import nats.errors
from nats.aio.msg import Msg

from bench.fuzz_bodies import (
    BYE_POOL,
    HB_POOL,
    Assembler,
    Banks,
    Family,
    Shot,
    render,
)
from schemas.api import MaybeError
from schemas.codec import DecodeError, decode, error_cause
from schemas.endpoints import ENDPOINTS
from schemas.types import GATEWAY_ID_RE
from schemas.wire import ConfigAck, ConfigPush, Goodbye, Heartbeat, Pong

log = logging.getLogger("bench.fuzz")

SENTINEL = "_fuzz.sentinel"
EXAMPLES = 5  # kept per kind of finding
_REQUESTS = {endpoint.name: endpoint.request for endpoint in ENDPOINTS}


# The oracle: what gatefleet's edge must do with each message ------------------------------


def gateway_outcome(prefix: str, subject: str, data: bytes) -> str:
    """`accepted` or the drop cause of a message on `P.gw.*.heartbeat|goodbye` or
    `P.gw.*.*.>`, as actors/routes.py and bus/edge.py decide it (shedding aside)."""
    gateway_id, _, verb = subject[len(prefix) + 4 :].partition(".")
    if not GATEWAY_ID_RE.fullmatch(gateway_id) or verb not in ("heartbeat", "goodbye"):
        return "bad_subject"
    kind: type[Heartbeat] | type[Goodbye] = Heartbeat if verb == "heartbeat" else Goodbye
    try:
        body = decode(data, kind)
    except DecodeError as exc:
        return error_cause(exc)
    return "accepted" if body.gateway_id == gateway_id else "id_mismatch"


def request_outcome(name: str, data: bytes) -> str:
    """`decoded`, or `bad_request` when the edge answers it itself."""
    try:
        decode(data or b"{}", _REQUESTS[name])
    except DecodeError:
        return "bad_request"
    return "decoded"


def pong_outcome(data: bytes, gateway_id: str) -> str:
    """`answered` or `bad` (bus/probes.py's counters)."""
    try:
        pong = decode(data, Pong)
    except DecodeError:
        return "bad"
    return "answered" if pong.gateway_id == gateway_id else "bad"


def ack_outcome(data: bytes, push: ConfigPush, gateway_id: str) -> str:
    """`ack`, `nack`, or the drop cause (actors/distribution.py's read_answer)."""
    try:
        ack = decode(data, ConfigAck)
    except DecodeError as exc:
        return error_cause(exc)
    if (ack.distribution_id, ack.version, ack.gateway_id) != (
        push.distribution_id,
        push.version,
        gateway_id,
    ):
        return "ack_mismatch"
    return "ack" if ack.ok else "nack"


_ACCEPTED = {"accepted", "decoded", "answered", "ack", "nack"}


# The books ------------------------------------------------------------------------------


class LoadResult(msgspec.Struct, kw_only=True):
    """What the load process sent and what the edge must have done with it."""

    seed: int
    fuzz_messages: int = 0  # generated messages and fuzzed answers, sent
    sent: dict[str, int] = msgspec.field(default_factory=dict)  # per family
    oversize: int = 0  # drawn but over the server's max_payload: not sent
    keepalives: int = 0
    # Gateway messages as delivered to the edge's patterns (the observer's verdicts).
    delivered: dict[str, int] = msgspec.field(default_factory=dict)  # outcome -> count
    delivered_total: int = 0
    # Good heartbeats delivered per gateway (keepalives included).
    valid_heartbeats: dict[str, int] = msgspec.field(default_factory=dict)
    pongs: dict[str, int] = msgspec.field(default_factory=dict)  # outcome -> count
    acks: dict[str, int] = msgspec.field(default_factory=dict)  # outcome -> count
    undecodable_pushes: int = 0
    # API: per endpoint, reply code ("ok" or the error code), "timeout" or "no_responders".
    api: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    api_edge_bad: int = 0  # requests the edge must answer bad_request itself
    api_no_reply: int = 0  # published without a reply subject
    api_subject: dict[str, int] = msgspec.field(default_factory=dict)  # unserved subjects
    # Expectation (protocol) vs oracle (edge), per family: "agree", "accepted but the
    # protocol says reject", "rejected but the protocol says accept".
    judged: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    examples: dict[str, list[str]] = msgspec.field(default_factory=dict)
    elapsed_s: float = 0.0

    def example(self, kind: str, text: str) -> None:
        found = self.examples.setdefault(kind, [])
        if len(found) < EXAMPLES:
            found.append(text)

    def expected_drops(self) -> Counter[str]:
        """Every drop gatefleet must count, by cause (replays aside: see valid_heartbeats)."""
        drops: Counter[str] = Counter(
            {k: v for k, v in self.delivered.items() if k not in _ACCEPTED}
        )
        drops.update({k: v for k, v in self.acks.items() if k not in _ACCEPTED})
        drops["bad_request"] += self.api_edge_bad
        drops["no_reply_subject"] += self.api_no_reply
        return +drops


def _count(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


@dataclass
class LoadOptions:
    url: str
    prefix: str
    seed: int
    messages: int
    bank_size: int
    concurrency: int = 32
    request_timeout_s: float = 30.0
    keepalive_s: float = 0.25
    max_payload: int = 1024 * 1024
    # The hb and bye gateways' good heartbeats start from here (fuzzed seqs may be higher:
    # then they are replays until a run of two restarts them, see actors/health.py).
    keepalive_seq: int = 1


class Load:
    """One run of the load, on the process's event loop."""

    def __init__(self, options: LoadOptions, banks: Banks) -> None:
        self.options = options
        self.prefix = options.prefix
        self.assembler = Assembler(banks, options.prefix, options.seed)
        self.result = LoadResult(seed=options.seed)
        self._sentinel = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(options.concurrency)
        self._answering = True
        self._seq = dict.fromkeys((*HB_POOL, *BYE_POOL), options.keepalive_seq)
        self._nc: Any = None  # the load connection, once open

    # Running ------------------------------------------------------------------------------

    async def run(self) -> LoadResult:
        started = time.monotonic()
        options = self.options
        observer = await nats.connect(options.url, name="fuzz-observer")
        nc = self._nc = await nats.connect(options.url, name="fuzz-load", max_reconnect_attempts=0)
        try:
            for pattern in ("gw.*.heartbeat", "gw.*.goodbye", "gw.*.*.>"):
                await observer.subscribe(
                    f"{self.prefix}.{pattern}", cb=self._observe, pending_msgs_limit=-1
                )
            await observer.subscribe(SENTINEL, cb=self._on_sentinel)
            await observer.flush()
            answering = [
                await nc.subscribe(f"{self.prefix}.gw.*.ping", cb=self._on_ping),
                await nc.subscribe(f"{self.prefix}.gw.*.config", cb=self._on_config),
            ]
            await nc.flush()
            keepalive = asyncio.create_task(self._keepalive(nc))
            try:
                await self._send_all(nc)
                await asyncio.gather(*list(self._in_flight))
            finally:
                self._answering = False
                keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keepalive
                for subscription in answering:
                    await subscription.unsubscribe()
            await nc.publish(SENTINEL, b"")  # after every message of ours, to the observer
            await nc.flush()
            await asyncio.wait_for(self._sentinel.wait(), 60)
        finally:
            await nc.close()
            await observer.close()
        self.result.elapsed_s = time.monotonic() - started
        return self.result

    async def _send_all(self, nc: Any) -> None:
        result, assembler = self.result, self.assembler
        since_flush = 0
        while result.fuzz_messages < self.options.messages:
            shot = assembler.shot()
            data = render(shot.body, {"gateway_id": _token(shot.subject, self.prefix)})
            if len(data) > self.options.max_payload - 512:  # headroom for the subject
                result.oversize += 1
                continue
            if shot.family in ("api", "api_subject"):
                await self._slots.acquire()
                task = asyncio.create_task(self._request(nc, shot, data))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            else:
                await nc.publish(shot.subject, data)
                self._judge_published(shot, data)
            self._sent(shot.family)
            since_flush += 1
            if since_flush >= 100:  # bounds what waits in our buffer, and yields
                since_flush = 0
                await nc.flush()

    def _sent(self, family: Family) -> None:
        self.result.fuzz_messages += 1
        _count(self.result.sent, family)

    async def _keepalive(self, nc: Any) -> None:
        """Good heartbeats for the hb and bye gateways, so that they stay up (and probed)."""
        while True:
            for gateway_id, seq in self._seq.items():
                beat = {
                    "gateway_id": gateway_id,
                    "region": "fuzz",
                    "seq": seq,
                    "ts": "2026-01-01T00:00:00Z",
                    "cpu_percent": 10.0,
                    "memory_percent": 10.0,
                    "active_connections": 1,
                }
                await nc.publish(
                    f"{self.prefix}.gw.{gateway_id}.heartbeat", msgspec.json.encode(beat)
                )
                self._seq[gateway_id] = seq + 1
                self.result.keepalives += 1
            await asyncio.sleep(self.options.keepalive_s)

    # Judging ------------------------------------------------------------------------------

    def _judge(self, shot: Shot, data: bytes, accepted: bool) -> None:
        """Compares the edge's verdict with what the protocol expects."""
        counts = self.result.judged.setdefault(shot.family, {})
        if shot.expect == "either" or (shot.expect == "accept") == accepted:
            _count(counts, "agree" if shot.expect != "either" else "either")
            return
        kind = "accepted, protocol says reject" if accepted else "rejected, protocol says accept"
        _count(counts, kind)
        self.result.example(f"{shot.family}: {kind}", f"{shot.note} | {data[:160]!r}")

    def _judge_published(self, shot: Shot, data: bytes) -> None:
        if shot.family == "api_no_reply":
            self.result.api_no_reply += 1
            return
        if shot.family == "gateway_subject":
            return  # judged by delivery (the observer): not every odd subject reaches the edge
        self._judge(shot, data, gateway_outcome(self.prefix, shot.subject, data) == "accepted")

    async def _observe(self, msg: Msg) -> None:
        outcome = gateway_outcome(self.prefix, msg.subject, msg.data)
        result = self.result
        _count(result.delivered, outcome)
        result.delivered_total += 1
        if outcome == "accepted" and msg.subject.endswith(".heartbeat"):
            _count(result.valid_heartbeats, _token(msg.subject, self.prefix))

    async def _on_sentinel(self, _msg: Msg) -> None:
        self._sentinel.set()

    # Requests -----------------------------------------------------------------------------

    async def _request(self, nc: Any, shot: Shot, data: bytes) -> None:
        result = self.result
        try:
            if shot.family == "api_subject":
                outcome = await self._ask(nc, shot.subject, data)
                _count(result.api_subject, outcome)
                return
            name = shot.subject[len(self.prefix) + 5 :]
            expected = request_outcome(name, data)
            if expected == "bad_request":
                result.api_edge_bad += 1
            self._judge(shot, data, expected == "decoded")
            outcome = await self._ask(nc, shot.subject, data)
            _count(result.api.setdefault(name, {}), outcome)
            if outcome in ("timeout", "no_responders", "internal", "undecodable reply"):
                result.example(f"api {outcome}", f"{name}: {shot.note} | {data[:160]!r}")
            elif expected == "bad_request" and outcome != "bad_request":
                result.example("api: edge let through", f"{name} -> {outcome} | {data[:160]!r}")
        finally:
            self._slots.release()

    async def _ask(self, nc: Any, subject: str, data: bytes) -> str:
        """ "ok", the error code of the reply, "timeout" or "no_responders"."""
        try:
            reply = await nc.request(subject, data, timeout=self.options.request_timeout_s)
        except nats.errors.NoRespondersError:
            return "no_responders"
        except (nats.errors.TimeoutError, TimeoutError):
            return "timeout"
        try:
            maybe = decode(reply.data, MaybeError)
        except DecodeError:
            return "undecodable reply"
        return "ok" if maybe.error is None else maybe.error.code

    # Answers ------------------------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        if not self._answering or not msg.reply:
            return
        gateway_id = _token(msg.subject, self.prefix)
        shot, data = self._template("pong", {"gateway_id": gateway_id})
        outcome = pong_outcome(data, gateway_id)
        await self._answer(msg.reply, shot, data)
        _count(self.result.pongs, outcome)
        self._judge(shot, data, outcome == "answered")

    async def _on_config(self, msg: Msg) -> None:
        if not self._answering or not msg.reply:
            return
        try:
            push = decode(msg.data, ConfigPush)
        except DecodeError as exc:
            self.result.undecodable_pushes += 1
            self.result.example("undecodable push", f"{exc} | {msg.data[:160]!r}")
            return
        gateway_id = _token(msg.subject, self.prefix)
        correct = {
            "gateway_id": gateway_id,
            "distribution_id": push.distribution_id,
            "version": push.version,
        }
        shot, data = self._template("ack", correct)
        outcome = ack_outcome(data, push, gateway_id)
        await self._answer(msg.reply, shot, data)
        _count(self.result.acks, outcome)
        self._judge(shot, data, outcome in ("ack", "nack"))

    def _template(
        self, family: Literal["pong", "ack"], correct: dict[str, Any]
    ) -> tuple[Shot, bytes]:
        """An answer's template and its bytes (drawn again while over max_payload)."""
        while True:
            shot = self.assembler.answer(family)
            data = render(shot.body, correct)
            if len(data) <= self.options.max_payload - 512:
                return shot, data
            self.result.oversize += 1

    async def _answer(self, reply: str, shot: Shot, data: bytes) -> None:
        assert self._nc is not None
        await self._nc.publish(reply, data)
        self._sent(shot.family)


def _token(subject: str, prefix: str) -> str:
    """The gateway id token of `P.gw.<id>...` (or "" for other subjects)."""
    head = f"{prefix}.gw."
    return subject[len(head) :].split(".", 1)[0] if subject.startswith(head) else ""


# The process ----------------------------------------------------------------------------


def load_main(options: LoadOptions, out: Any) -> None:
    """Entry point of the spawned load process: puts ("ok", LoadResult as JSON) or
    ("error", text) on `out`."""
    logging.basicConfig(level=logging.WARNING, format="fuzz-load %(name)s: %(message)s")
    try:
        banks = Banks.fill(options.seed, options.bank_size)
        load = Load(options, banks)
        result = asyncio.run(_run(load))
        out.put(("ok", msgspec.json.encode(result)))
    except BaseException as exc:
        log.exception("the fuzz load failed")
        out.put(("error", f"{type(exc).__name__}: {exc}"))


async def _run(load: Load) -> LoadResult:
    return await load.run()
