"""Selection latency and throughput, next to a bare nats-py echo on the same event loop
and one in a separate process.

    python -m bench select [--gateways 100 1000] [--audit both|on|off] [--background HZ]
                           [--clients N]

Each case (fleet size x `audit.record_selections` x probes) runs in a fresh process with
its own embedded nats-server and Orchestrator (RoundRobin, heartbeats never stale), with
latency probes as a user gets them (every 2 s; the client process answers every
gateway's pings) unless `--probes off` (a second row, never the headline).
Four subjects are measured:

- `echo`: a bare nats-py responder on the orchestrator's *own* bus loop and connection
  (`orchestrator.bus.nc`) that publishes a fixed, SelectReply-sized answer: the baseline
  "on the same loop" (it shares the loop with the heartbeats);
- `echo-proc`: the same bare responder in a process of its own (its own connection and
  uvloop, nothing else to do): the baseline "in a separate process";
- `path`: the load balancer's request path without the selection: an actor on the API
  lane's loop, served by the product's own edge (`SafeActor.serve`: the lane's connection,
  decode, timing, the inbox run at once), that publishes the same fixed answer. Its ratio
  to the echoes is the most any selection served that way could reach;
- `select`: `P.api.select-gateway` itself.

A client *process* registers N gateways (one heartbeat each), then measures the four with
the same connection: latency from sequential requests (p50/p99), throughput from
`--inflight` requests kept in flight, each in ABCD-DCBA order to cancel drift. The
orchestrator process's CPU time over each throughput window gives CPU per request (for
`echo-proc` that is the orchestrator's idle cost: the echo runs elsewhere).
`--clients N` gives every request a `client_id`, one of N in turn (sticky clients): with
N above the requests made, each is a new client, so each selection writes the `sticky`
bucket; with a few, none does after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import pykka

from actors.base import SafeActor
from actors.context import Context
from actors.load_balancer import LoadBalancerActor
from actors.messages import Request
from bench.common import (
    HeartbeatTemplate,
    accepted_heartbeats,
    bench_settings,
    cpu_seconds,
    embedded_server,
    fmt_ratio,
    heartbeat_templates,
    machine_line,
    percentile,
    print_table,
    run_case,
    running_orchestrator,
    safe_div,
    spawn,
    table_stats,
    wait_for,
)
from bus.subjects import Subjects
from gatefleet.app import Orchestrator
from gatefleet.gateway import connect
from schemas import endpoints as api
from schemas.api import SelectReply, SelectRequest
from schemas.codec import decode, encode

ECHO_REPLY = encode(
    SelectReply(
        gateway_id="gw-00000",
        strategy="RoundRobin",
        reason="RoundRobin over 1000 eligible gateways",
        selection_id="0193b6f0-2a4c-7d41-9a52-3f1e5b2c7d90",
    )
)
REQUEST = encode(SelectRequest())
TARGETS = ("echo", "echo-proc", "path", "select")
ORDER = (*TARGETS, *reversed(TARGETS))  # ABCD DCBA: cancels a linear drift
REQUEST_TIMEOUT_S = 5.0
PROBE_INTERVAL_MS = 2000  # the default


@dataclass(frozen=True)
class Plan:
    """What the client does once the gateways are registered."""

    latency_n: int  # sequential requests per subject
    window_s: float  # seconds per throughput window (two per subject)
    inflight: int
    background_hz: float = 0.0  # heartbeats per gateway per second while measuring
    clients: int = 0  # sticky client ids the requests take in turn; 0: no client_id
    probes: bool = True  # the orchestrator probes every gateway (the default), answered


class Bodies:
    """The requests' bodies: REQUEST, or one with the next of `clients` client ids."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.sent = 0

    def next(self) -> bytes:
        if not self.clients:
            return REQUEST
        self.sent += 1
        return b'{"client_id":"client-%d"}' % (self.sent % self.clients)


def select_case(count: int, record_selections: bool, plan: Plan) -> dict[str, Any]:
    """One case, in its own process: orchestrator + echo here, the client in a child."""
    prefix = f"sel{count}{'a' if record_selections else 'n'}"
    with embedded_server() as (server, tmp):
        probing = {"probe_interval_ms": PROBE_INTERVAL_MS if plan.probes else 0}
        settings = bench_settings(
            server.url,
            prefix,
            tmp,
            audit={"record_selections": record_selections},
            health=probing,
        )
        with running_orchestrator(settings) as orchestrator:
            path_subjects = Subjects(f"{prefix}.bench")
            path = _PathEcho.start(_context(), path_subjects)
            ctx = spawn()
            echo_proc = _EchoProcess(ctx, server.url, f"{prefix}.bench.echo-proc")
            subjects = {
                "echo": _bare_echo(orchestrator, f"{prefix}.bench.echo"),
                "echo-proc": echo_proc.subject,
                "path": path_subjects.api(api.SELECT_GATEWAY.name),
                "select": f"{prefix}.api.select-gateway",
            }
            here, there = ctx.Pipe()
            client = ctx.Process(
                target=client_main,
                args=(server.url, prefix, count, subjects, plan, there),
                name="bench-client",
            )
            client.start()
            try:
                if not here.poll(60) or here.recv() != ("registered",):
                    raise TimeoutError("the client did not register its gateways")
                register_s = wait_for(
                    lambda: _healthy(orchestrator) >= count, 120, f"{count} gateways healthy"
                )
                here.send(("go",))
                result = _follow_client(here)
                client.join(30)
            finally:
                path.stop(timeout=5)
                echo_proc.stop()
                if client.is_alive():
                    client.terminate()
                    client.join(5)
            _, accepted = accepted_heartbeats(orchestrator)
    result.update(
        gateways=count,
        audit=record_selections,
        background_hz=plan.background_hz,
        clients=plan.clients,
        probes=plan.probes,
        register_s=register_s,
        heartbeats_accepted=accepted,
    )
    return result


def _bare_echo(orchestrator: Orchestrator, subject: str) -> str:
    """A bare nats-py responder on the orchestrator's own loop and connection."""
    bus = orchestrator.bus
    assert bus is not None
    nc = bus.nc

    async def echo(msg: Any) -> None:
        await nc.publish(msg.reply, ECHO_REPLY)

    async def subscribe() -> None:
        await nc.subscribe(subject, cb=echo)
        await nc.flush()

    bus.run(subscribe())
    return subject


class _EchoProcess:
    """A bare nats-py echo in a process of its own (uvloop, its own connection)."""

    def __init__(self, ctx: Any, url: str, subject: str) -> None:
        self.subject = subject
        self._stop = ctx.Event()
        ready = ctx.Event()
        self._process = ctx.Process(
            target=echo_main, args=(url, subject, ready, self._stop), name="bench-echo"
        )
        self._process.start()
        if not ready.wait(30):
            self.stop()
            raise TimeoutError("the echo process did not subscribe")

    def stop(self) -> None:
        self._stop.set()
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


def echo_main(url: str, subject: str, ready: Any, stop: Any) -> None:
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        nc = await nats.connect(url, name="bench-echo")

        async def echo(msg: Any) -> None:
            await nc.publish(msg.reply, ECHO_REPLY)

        await nc.subscribe(subject, cb=echo)
        await nc.flush()
        ready.set()
        await asyncio.to_thread(stop.wait)
        await nc.close()

    asyncio.run(serve())


class _PathEcho(SafeActor):
    """Served as the load balancer is (on the API lane's loop, through the product's
    edge), for `select-gateway` under another prefix; it answers a fixed reply."""

    dispatch = "api"

    def __init__(self, context: Context, subjects: Subjects) -> None:
        super().__init__(context.runtime.dispatcher(self.dispatch, "bench-path"))
        self.bus = context.bus
        served = dataclasses.replace(context, subjects=subjects)
        self._subscriptions = self.serve("load_balancer", served, endpoints=[api.SELECT_GATEWAY])

    def on_stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()

    def handle(self, message: Any) -> None:
        if type(message) is Request:
            self.replies.publish(message.reply, ECHO_REPLY)


def _context() -> Context:
    """The running orchestrator's actor context (the load balancer's)."""
    [balancer] = pykka.ActorRegistry.get_by_class(LoadBalancerActor)
    context: Context = balancer.proxy().ctx.get()
    return context


def _follow_client(conn: Any) -> dict[str, Any]:
    """Reads the client's reports until its result; adds this process's CPU per request,
    measured over the client's throughput windows."""
    cpu: dict[str, list[tuple[float, int]]] = {name: [] for name in TARGETS}
    started = 0.0
    while True:
        if not conn.poll(300):
            raise TimeoutError("the client stopped reporting")
        message = conn.recv()
        if message[0] == "window-start":
            started = cpu_seconds()
        elif message[0] == "window-end":
            _, name, done = message
            cpu[name].append((cpu_seconds() - started, done))
        elif message[0] == "result":
            result: dict[str, Any] = message[1]
            break
        elif message[0] == "error":
            raise RuntimeError(f"client: {message[1]}")
    for name, windows in cpu.items():
        spent = sum(c for c, _ in windows)
        done = sum(d for _, d in windows)
        result[name]["cpu_us_per_req"] = 1e6 * safe_div(spent, done)
    return result


def _healthy(orchestrator: Any) -> int:
    return table_stats(orchestrator)[2]


# The client process ----------------------------------------------------------------------


def client_main(
    url: str, prefix: str, count: int, subjects: dict[str, str], plan: Plan, conn: Any
) -> None:
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_client(url, prefix, count, subjects, plan, conn))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


async def _client(
    url: str, prefix: str, count: int, subjects: dict[str, str], plan: Plan, conn: Any
) -> None:
    nc = await connect(url, name="bench-client")
    templates = heartbeat_templates(prefix, count)
    if plan.probes:
        await nc.subscribe(f"{prefix}.gw.*.ping", cb=_pong)
    background: asyncio.Task[None] | None = None
    try:
        for template in templates:
            await nc.publish(template.subject, template.body(1))
        await nc.flush()
        conn.send(("registered",))
        await asyncio.to_thread(conn.recv)  # go

        bodies = Bodies(plan.clients)
        first = decode((await nc.request(subjects["select"], REQUEST, 5)).data, SelectReply)
        if first.gateway_id is None:
            raise RuntimeError(f"select-gateway chose nobody: {first.reason}")
        if plan.background_hz > 0:
            background = asyncio.create_task(_heartbeats(nc, templates, plan.background_hz))
        for subject in subjects.values():  # warm up every path
            await _sequential(nc, subject, 200, bodies)

        latencies: dict[str, list[float]] = {name: [] for name in subjects}
        for name in ORDER:
            latencies[name] += await _sequential(nc, subjects[name], plan.latency_n // 2, bodies)
        rates: dict[str, list[float]] = {name: [] for name in subjects}
        errors: dict[str, int] = dict.fromkeys(subjects, 0)
        for name in ORDER:
            rate, failed = await _flood(nc, subjects[name], plan, conn, name, bodies)
            rates[name].append(rate)
            errors[name] += failed
        result = {
            name: {
                "p50_us": 1e6 * percentile(latencies[name], 50),
                "p99_us": 1e6 * percentile(latencies[name], 99),
                "rate": sum(rates[name]) / len(rates[name]),
                "errors": errors[name],
                "samples": len(latencies[name]),
            }
            for name in subjects
        }
        conn.send(("result", result))
    finally:
        if background is not None:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        await nc.close()


async def _pong(msg: Any) -> None:
    """Every gateway's answer to a latency probe (`P.gw.<id>.ping`)."""
    gateway_id = msg.subject.split(".")[-2]
    await msg.respond(b'{"gateway_id":"%s"}' % gateway_id.encode())


async def _heartbeats(nc: Any, templates: Sequence[HeartbeatTemplate], hz: float) -> None:
    """Every gateway beats `hz` times a second (seq from 2), spread in 10 ms ticks."""
    tick_s = 0.01
    per_tick = len(templates) * hz * tick_s
    owed, index, seq = 0.0, 0, 2
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        owed += per_tick
        while owed >= 1:
            template = templates[index]
            await nc.publish(template.subject, template.body(seq))
            owed -= 1
            index += 1
            if index == len(templates):
                index, seq = 0, seq + 1
        due += tick_s
        await asyncio.sleep(max(0.0, due - loop.time()))


async def _sequential(nc: Any, subject: str, n: int, bodies: Bodies) -> list[float]:
    samples = []
    for _ in range(n):
        body = bodies.next()
        started = time.perf_counter()
        await nc.request(subject, body, timeout=REQUEST_TIMEOUT_S)
        samples.append(time.perf_counter() - started)
    return samples


async def _flood(
    nc: Any, subject: str, plan: Plan, conn: Any, name: str, bodies: Bodies
) -> tuple[float, int]:
    """Keeps `plan.inflight` requests outstanding: (completions/s over the window, failures).
    The first 0.3 s warm up and are not counted."""
    done = failed = 0
    stopping = False

    async def worker() -> None:
        nonlocal done, failed
        while not stopping:
            try:
                await nc.request(subject, bodies.next(), timeout=REQUEST_TIMEOUT_S)
            except (nats.errors.Error, TimeoutError):
                failed += 1
            else:
                done += 1

    workers = [asyncio.create_task(worker()) for _ in range(plan.inflight)]
    await asyncio.sleep(0.3)
    conn.send(("window-start", name))
    d0, t0 = done, time.perf_counter()
    await asyncio.sleep(plan.window_s)
    d1, t1 = done, time.perf_counter()
    conn.send(("window-end", name, d1 - d0))
    stopping = True
    await asyncio.gather(*workers)
    return (d1 - d0) / (t1 - t0), failed


# Reporting -----------------------------------------------------------------------------------


P50_AIM = 1.25
RATE_AIM = 0.8


def _case(r: dict[str, Any]) -> str:
    hz = r["background_hz"]
    beats = f", {hz:g} hb/s/gw" if hz else ""
    clients = f", {r['clients']:,} clients" if r["clients"] else ""
    probes = "" if r["probes"] else ", probes off"
    audit = f"audit {'on' if r['audit'] else 'off'}"
    return f"{r['gateways']:,} gw, {audit}{beats}{clients}{probes}"


def report(results: Sequence[dict[str, Any]], inflight: int) -> None:
    latency_rows, rate_rows = [], []
    for r in results:
        echo, proc, path, sel = r["echo"], r["echo-proc"], r["path"], r["select"]
        p50_ratios = [safe_div(sel["p50_us"], base["p50_us"]) for base in (echo, proc)]
        rate_ratios = [safe_div(sel["rate"], base["rate"]) for base in (echo, proc)]
        latency_rows.append(
            [
                _case(r),
                *(f"{x['p50_us']:.0f}" for x in (echo, proc, path, sel)),
                *(fmt_ratio(x) for x in p50_ratios),
                *(f"{x['p99_us']:.0f}" for x in (echo, proc, sel)),
                "yes" if max(p50_ratios) <= P50_AIM else "no",
            ]
        )
        rate_rows.append(
            [
                _case(r),
                *(f"{x['rate']:,.0f}" for x in (echo, proc, path, sel)),
                *(fmt_ratio(x) for x in rate_ratios),
                fmt_ratio(safe_div(path["rate"], echo["rate"])),
                *(f"{x['cpu_us_per_req']:.0f}" for x in (echo, path, sel)),
                str(sum(r[name]["errors"] for name in TARGETS)),
                "yes" if min(rate_ratios) >= RATE_AIM else "no",
            ]
        )
    print_table(
        f"Selection latency, sequential requests, in microseconds ({machine_line()})",
        [
            "case",
            *("echo p50", "echo-proc p50", "path p50", "select p50"),
            *("select/echo", "select/echo-proc"),
            *("echo p99", "echo-proc p99", "select p99"),
            f"aim <={P50_AIM}x (both)",
        ],
        latency_rows,
    )
    print_table(
        f"Selection throughput, {inflight} requests in flight",
        [
            "case",
            *("echo req/s", "echo-proc req/s", "path req/s", "select req/s"),
            *("select/echo", "select/echo-proc", "path/echo"),
            *("echo CPU us/req", "path CPU", "select CPU"),
            "errors",
            f"aim >={RATE_AIM}x (both)",
        ],
        rate_rows,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench select", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--gateways", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--audit", choices=("both", "on", "off"), default="both")
    parser.add_argument(
        "--probes",
        choices=("both", "on", "off"),
        default="on",
        help="latency probes every 2 s, as a user gets them (default: on)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="sequential, per subject")
    parser.add_argument("--window", type=float, default=1.5, help="seconds per flood, x2")
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument(
        "--clients",
        type=int,
        default=0,
        metavar="N",
        help="requests carry one of N sticky client ids in turn (default: none)",
    )
    parser.add_argument(
        "--background",
        type=float,
        default=0.0,
        metavar="HZ",
        help="heartbeats per gateway per second while measuring (default: none)",
    )
    args = parser.parse_args(argv)
    choices = {"both": (True, False), "on": (True,), "off": (False,)}
    audits = choices[args.audit]
    results = []
    for count, record, probes in itertools.product(args.gateways, audits, choices[args.probes]):
        started = time.perf_counter()
        plan = Plan(
            args.requests, args.window, args.inflight, args.background, args.clients, probes
        )
        result = run_case(select_case, count, record, plan, timeout=300)
        print(
            f"  {count:,} gateways, audit {'on' if record else 'off'}, "
            f"probes {'on' if probes else 'off'}: "
            f"select p50 {result['select']['p50_us']:.0f} us, "
            f"{result['select']['rate']:,.0f} req/s ({time.perf_counter() - started:.1f}s)",
            flush=True,
        )
        results.append(result)
    report(results, args.inflight)


if __name__ == "__main__":
    main()
