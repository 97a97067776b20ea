"""Fleet scale: gatefleet with its default health settings against a simulated fleet.

    python -m bench fleet [--steps 1000,2500,5000,10000,20000] [--duration 20] [--json FILE]

Each step N runs in fresh processes, with its own embedded nats-server:

- the orchestrator, alone in its process (default settings: probes on, audit on, 1 s
  heartbeats), so its CPU, RSS and threads, read from /proc, are its own;
- an observer process: asks `P.api.status` 4 times a second on a fixed schedule (a slow
  reply does not slow the schedule) and counts `gateway.down` events and
  `gateway.status_changed` events to `down`;
- the simulator process (`gatefleet.simulate.run_simulation`, N gateways, 1 Hz, no faults).

Phases: registration (the simulator starts and all N gateways beat within its first second,
as after an orchestrator restart; it ends when a status reply counts N `gateways_managed`,
or at `--registration-timeout`), a short settle, then the steady window (`--duration`).
The observer stops, then the orchestrator; the simulator keeps beating while a bare nats-py
subscriber (decode each Heartbeat with msgspec, count it) is measured on the same load for
`--baseline` seconds: the CPU per heartbeat it needs is the baseline.

Every wait is bounded and every child is killed at the end of its step, so an orchestrator
that stops answering, or dies, is recorded and the run goes on. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    SEED,
    default_settings,
    embedded_server,
    fmt_ratio,
    machine_line,
    percentile,
    print_table,
    proc_sample,
    safe_div,
    spawn,
    table_stats,
)

log = logging.getLogger("bench.fleet")

REGIONS = ("us-west", "us-east", "eu-west")
PROBE_HZ = 4  # status requests per second (the figure)
REQUEST_TIMEOUT_S = 5.0  # a status request unanswered this long counts as failed
SNAPSHOT_EVERY_S = 1.0  # the orchestrator process reports on itself this often
START_TIMEOUT_S = 60.0
# The aims, at 10,000 gateways; a step "holds" when it meets them at its own size.
AIM_STEADY_P99_S = 0.250
AIM_REGISTRATION_P99_S = 1.0
AIM_REGISTERED_S = 15.0
# Pending limits of the bare subscriber: gatefleet's own (bus.runtime) when this was written.
BARE_PENDING_MSGS = 512 * 1024
BARE_PENDING_BYTES = 256 * 1024 * 1024
# Log lines that mean the orchestrator's connection to the bus is in trouble.
BUS_TROUBLE = ("disconnect", "slow consumer", "nats error", "connection closed", "reconnect")


@dataclass
class Controls:
    """Events and shared values between the driver and a step's child processes."""

    orch_ready: Any
    orch_stop: Any
    obs_ready: Any
    obs_stop: Any
    sim_ready: Any
    sim_stop: Any
    bare_ready: Any
    bare_stop: Any
    managed: Any  # RawValue("q"): gateways_managed in the latest status reply
    all_managed_at: Any  # RawValue("d"): monotonic time of the first reply counting all N
    sim_started_at: Any  # RawValue("d"): monotonic time just before the first beat
    bare_count: Any  # RawValue("q"): heartbeats the bare subscriber decoded

    @classmethod
    def create(cls, ctx: Any) -> Controls:
        names = ("orch", "obs", "sim", "bare")
        return cls(
            **{f"{name}_{what}": ctx.Event() for name in names for what in ("ready", "stop")},
            managed=ctx.RawValue("q", 0),
            all_managed_at=ctx.RawValue("d", 0.0),
            sim_started_at=ctx.RawValue("d", 0.0),
            bare_count=ctx.RawValue("q", 0),
        )


# The orchestrator process -----------------------------------------------------------------


class _LogTally(logging.Handler):
    """Counts WARNING+ log records (bus trouble apart) and keeps the first few distinct ones."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings = 0
        self.bus_trouble = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"[:200]
        self.warnings += 1
        if any(word in text.lower() for word in BUS_TROUBLE):
            self.bus_trouble += 1
        if len(self.samples) < 8 and text not in self.samples:
            self.samples.append(text)


def orchestrator_main(url: str, prefix: str, data_dir: str, ctl: Controls, out: Any) -> None:
    """The Orchestrator with default settings, reporting on itself every second until told
    to stop. Product internals are read defensively: a hook that is gone reads as None."""
    from gatefleet.app import Orchestrator  # noqa: PLC0415 - only this process needs it

    tally = _LogTally()
    logging.getLogger().addHandler(tally)
    orchestrator = Orchestrator(default_settings(url, prefix, Path(data_dir)))
    try:
        orchestrator.start()
    except Exception as exc:
        out.put(("orch-failed", f"{type(exc).__name__}: {exc}"))
        return
    ctl.orch_ready.set()
    counting = [True]  # False once the heartbeat hook is found missing

    def snapshot() -> dict[str, Any]:
        total = None
        if counting[0]:
            try:
                total = table_stats(orchestrator)[1]
            except (ImportError, AttributeError, TypeError):  # the hook is gone: stop asking
                counting[0] = False
            except Exception:  # noqa: S110 - not answering within 10 s: no count this time
                pass
        connected = reconnects = None
        with contextlib.suppress(Exception):
            nc = orchestrator.bus.nc  # type: ignore[union-attr]
            connected, reconnects = bool(nc.is_connected), int(nc.stats["reconnects"])
        drops: dict[str, int] = {}
        with contextlib.suppress(Exception):
            drops = {k: int(v) for k, v in orchestrator.drops.counts().items() if v}
        return {
            "at": time.monotonic(),
            "heartbeats": total,
            "connected": connected,
            "reconnects": reconnects,
            "drops": drops,
            "warnings": tally.warnings,
            "bus_trouble": tally.bus_trouble,
            "log": list(tally.samples),
        }

    try:
        while not ctl.orch_stop.wait(SNAPSHOT_EVERY_S):
            out.put(("orch", snapshot()))
        out.put(("orch", snapshot()))
    finally:
        started = time.monotonic()
        try:
            orchestrator.stop()
        except Exception as exc:  # e.g. an actor that did not stop in time: a finding
            out.put(("orch-stop-failed", f"{type(exc).__name__}: {exc}"))
        out.put(("orch-stopped", time.monotonic() - started))


# The simulator process --------------------------------------------------------------------


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415 - optional, as in gatefleet
    except ImportError:
        return None
    return uvloop.new_event_loop


def simulator_main(url: str, prefix: str, count: int, ctl: Controls, out: Any) -> None:
    """N healthy gateways beating at 1 Hz until `sim_stop`; sends back the summary."""
    from gatefleet.simulate import run_simulation  # noqa: PLC0415

    async def main() -> Any:
        stop_event, ready = asyncio.Event(), asyncio.Event()
        run = asyncio.create_task(
            run_simulation(
                url,
                count,
                REGIONS,
                prefix=prefix,
                interval_s=1.0,
                seed=SEED,
                stop_event=stop_event,
                ready=ready,
            )
        )
        readied = asyncio.create_task(ready.wait())
        await asyncio.wait({run, readied}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            ctl.sim_started_at.value = time.monotonic()
            ctl.sim_ready.set()
        while not run.done() and not ctl.sim_stop.is_set():  # noqa: ASYNC110 - an mp Event
            await asyncio.sleep(0.1)
        stop_event.set()
        readied.cancel()
        return await run

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            summary = runner.run(main())
    except Exception as exc:
        out.put(("sim-failed", f"{type(exc).__name__}: {exc}"))
        return
    fields = ("heartbeats_sent", "heartbeats_skipped", "duration_s", "cpu_s", "publish_errors")
    out.put(("sim", {name: getattr(summary, name) for name in fields}))


# The observer process: status prober and event counter ---------------------------------


class _StatusView(msgspec.Struct):
    """What the observer reads of a status reply, or of an error reply."""

    gateways_managed: int = 0
    error: dict[str, Any] | None = None


class _DownView(msgspec.Struct):
    gateway_id: str = ""
    new_status: str = "down"  # a gateway.down event has no new_status: it is a down


def observer_main(url: str, prefix: str, count: int, ctl: Controls, out: Any) -> None:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        out.put(("obs", runner.run(_observe(url, prefix, count, ctl))))


class _Prober:
    """Asks `P.api.status` and records (sent, latency or None, outcome) for each request."""

    def __init__(self, nc: Any, prefix: str, count: int, ctl: Controls) -> None:
        self.nc, self.subject, self.count, self.ctl = nc, f"{prefix}.api.status", count, ctl
        self.requests: list[tuple[float, float | None, str]] = []
        self.last: dict[str, Any] = {}  # the latest good reply, whole
        self._decoder = msgspec.json.Decoder(_StatusView)

    async def ask(self) -> None:
        from nats.errors import NoRespondersError  # noqa: PLC0415
        from nats.errors import TimeoutError as NatsTimeout  # noqa: PLC0415

        sent = time.monotonic()
        latency, outcome = None, "ok"
        try:
            msg = await self.nc.request(self.subject, b"{}", timeout=REQUEST_TIMEOUT_S)
        except NoRespondersError:
            outcome = "no responders"
        except NatsTimeout:
            outcome = "timeout"
        except Exception as exc:
            outcome = type(exc).__name__
        else:
            answered = time.monotonic()
            reply = self._decoder.decode(msg.data)
            if reply.error is not None:
                outcome = f"error {reply.error.get('code')}"
            else:
                latency = answered - sent
                self.ctl.managed.value = reply.gateways_managed
                if reply.gateways_managed >= self.count and not self.ctl.all_managed_at.value:
                    self.ctl.all_managed_at.value = answered
                self.last = msgspec.json.decode(msg.data)
        self.requests.append((sent, latency, outcome))


async def _observe(url: str, prefix: str, count: int, ctl: Controls) -> dict[str, Any]:
    import nats  # noqa: PLC0415

    disconnects, closing = [0], [False]

    async def on_disconnect() -> None:
        disconnects[0] += not closing[0]  # nats-py calls this on close() too

    nc = await nats.connect(
        url, name="bench-observer", max_reconnect_attempts=-1, disconnected_cb=on_disconnect
    )
    downs: list[tuple[float, str, str]] = []  # (when, event type, gateway)
    down_decoder = msgspec.json.Decoder(_DownView)

    async def on_event(msg: Any) -> None:
        if msg.subject.endswith("status_changed") and b'"new_status":"down"' not in msg.data:
            return  # a cheap test first: most status changes are not to down
        event = down_decoder.decode(msg.data)
        if event.new_status == "down":
            downs.append((time.monotonic(), msg.subject.rsplit(".", 1)[-1], event.gateway_id))

    await nc.subscribe(f"{prefix}.events.gateway.down", cb=on_event)
    await nc.subscribe(f"{prefix}.events.gateway.status_changed", cb=on_event)
    await nc.flush()
    prober = _Prober(nc, prefix, count, ctl)
    ctl.obs_ready.set()
    # A fixed schedule, each request its own task: a slow reply does not delay the next ask.
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    start, tick = loop.time(), 0
    while not ctl.obs_stop.is_set():
        task = loop.create_task(prober.ask())
        pending.add(task)
        task.add_done_callback(pending.discard)
        tick += 1
        await asyncio.sleep(max(0.0, start + tick / PROBE_HZ - loop.time()))
    if pending:
        await asyncio.wait(pending, timeout=REQUEST_TIMEOUT_S + 1)
    closing[0] = True
    await nc.close()
    return {
        "requests": prober.requests,
        "downs": downs,
        "disconnects": disconnects[0],
        "last": prober.last,
    }


# The bare baseline process ----------------------------------------------------------------


def bare_main(url: str, prefix: str, ctl: Controls) -> None:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_bare(url, prefix, ctl))


async def _bare(url: str, prefix: str, ctl: Controls) -> None:
    """One nats-py subscription whose callback decodes a Heartbeat and counts it."""
    import nats  # noqa: PLC0415

    from schemas.wire import Heartbeat  # noqa: PLC0415

    decoder = msgspec.json.Decoder(Heartbeat)
    seen = [0]

    async def on_heartbeat(msg: Any) -> None:
        decoder.decode(msg.data)
        seen[0] += 1

    nc = await nats.connect(url, name="bench-bare")
    await nc.subscribe(
        f"{prefix}.gw.*.heartbeat",
        cb=on_heartbeat,
        pending_msgs_limit=BARE_PENDING_MSGS,
        pending_bytes_limit=BARE_PENDING_BYTES,
    )
    await nc.flush()
    ctl.bare_ready.set()
    while not ctl.bare_stop.is_set():
        ctl.bare_count.value = seen[0]  # shared memory, written 10 times a second
        await asyncio.sleep(0.1)
    ctl.bare_count.value = seen[0]
    await nc.close()


# The driver: one step --------------------------------------------------------------------


class _Inbox:
    """Drains a step's result queue all along (a child blocks at exit on an unread queue)."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.items: list[tuple[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="bench-inbox", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty):
                self.items.append(self.q.get(timeout=0.1))

    def wait_for(self, tag: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [value for t, value in self.items if t == tag]
            if found:
                return found[-1]
            time.sleep(0.05)
        return None

    def all(self, tag: str) -> list[Any]:
        return [value for t, value in self.items if t == tag]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class _Peaks:
    """Samples a process every 0.5 s in the background: its peak RSS and thread count."""

    def __init__(self, pid: int) -> None:
        self.rss = self.threads = 0
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-peaks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            sample = proc_sample(self._pid)
            if sample is not None:
                self.rss, self.threads = (
                    max(self.rss, sample.rss),
                    max(self.threads, sample.threads),
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _wait(condition: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    """Polls `condition` until true (True), the timeout, or `alive()` turning false."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or not alive():
            return False
        time.sleep(0.05)
    return True


def _stop_process(process: Any, grace: float) -> int | None:
    """Joins `process`, terminating then killing it past the grace; its exit code."""
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)
    return int(process.exitcode) if process.exitcode is not None else None


def run_step(count: int, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """One step in fresh processes; whatever happens, the figures gathered so far, judged."""
    raw: dict[str, Any] = {"notes": []}
    try:
        _drive_step(count, args, say, raw)
    except Exception as exc:  # a broken step is a result too
        log.exception("step %d failed", count)
        raw["notes"].append(f"the step failed: {type(exc).__name__}: {exc}")
    result = {"gateways": count, "notes": raw["notes"]}
    result.update({k: raw[k] for k in _COPIED if k in raw})
    result.update(_figures(count, raw))
    _phase_latencies(result, raw)
    _judge(result)
    return result


_COPIED = (
    "registered_s",
    "managed_at_timeout",
    "orchestrator_alive",
    "orchestrator_exit",
    "orchestrator_stop_s",
)


def _drive_step(
    count: int, args: argparse.Namespace, say: Callable[[str], None], raw: dict[str, Any]
) -> None:
    """Runs the phases, leaving in `raw` what each one measured, as soon as it has it."""
    ctx = spawn()
    ctl = Controls.create(ctx)
    inbox = _Inbox(ctx.Queue())
    prefix = f"fleet{count}"
    note: Callable[[str], None] = raw["notes"].append
    procs: dict[str, Any] = {}

    def start(name: str, target: Callable[..., None], *targs: Any) -> Any:
        procs[name] = ctx.Process(target=target, args=targs, name=f"bench-{name}", daemon=True)
        procs[name].start()
        return procs[name]

    with embedded_server() as (server, tmp):
        url = server.url
        try:
            orch = start(
                "orchestrator", orchestrator_main, url, prefix, str(tmp / "orch"), ctl, inbox.q
            )
            start("observer", observer_main, url, prefix, count, ctl, inbox.q)
            if not _wait(ctl.orch_ready.is_set, START_TIMEOUT_S, orch.is_alive):
                note(f"orchestrator did not start: {inbox.wait_for('orch-failed', 1)}")
                return
            if not _wait(ctl.obs_ready.is_set, START_TIMEOUT_S, lambda: True):
                note("observer did not start")
                return
            time.sleep(1.0)  # let start-up settle before the "before" sample
            raw["before"] = proc_sample(orch.pid)
            peaks = raw["peaks"] = _Peaks(orch.pid)
            sim = start("simulator", simulator_main, url, prefix, count, ctl, inbox.q)
            if not _wait(ctl.sim_ready.is_set, START_TIMEOUT_S, sim.is_alive):
                note(f"simulator did not start: {inbox.wait_for('sim-failed', 1)}")
                return

            _registration(ctl, args.registration_timeout, orch.is_alive, raw)
            say(_registration_line(count, raw))

            _steady(orch, {"orch": orch.pid, "sim": sim.pid, "server": server.pid}, args, raw)
            peaks.stop()
            # Events and requests are counted until now: before anything is stopped.
            ctl.obs_stop.set()
            raw["observed"] = inbox.wait_for("obs", REQUEST_TIMEOUT_S + 10)
            ctl.orch_stop.set()
            raw["orchestrator_exit"] = _stop_process(orch, args.stop_timeout)
            raw["orchestrator_stop_s"] = inbox.wait_for("orch-stopped", 0.5)
            if failed := inbox.wait_for("orch-stop-failed", 0):
                note(f"the orchestrator's stop() failed: {failed}")
            # The baseline: a bare subscriber on the same simulator, which still runs.
            raw["bare"] = _bare_baseline(start("bare", bare_main, url, prefix, ctl), ctl, args)
            ctl.sim_stop.set()
            raw["sim"] = inbox.wait_for("sim", 30)
        finally:
            for event in (ctl.obs_stop, ctl.orch_stop, ctl.sim_stop, ctl.bare_stop):
                event.set()
            for process in procs.values():
                _stop_process(process, 10)
            if "peaks" in raw:
                raw["peaks"].stop()
            inbox.close()
            raw["snapshots"] = inbox.all("orch")


def _registration(
    ctl: Controls, timeout: float, alive: Callable[[], bool], raw: dict[str, Any]
) -> None:
    """From the simulator's first beat until a status reply counts all N, or the timeout."""
    reg_start = float(ctl.sim_started_at.value)
    _wait(
        lambda: bool(ctl.all_managed_at.value),
        max(0.0, reg_start + timeout - time.monotonic()),
        alive,
    )
    reg_end = float(ctl.all_managed_at.value) or time.monotonic()
    raw["registered_s"] = reg_end - reg_start if ctl.all_managed_at.value else None
    raw["managed_at_timeout"] = int(ctl.managed.value)
    raw["registration"] = (reg_start, reg_end)


def _steady(
    orch: Any, pids: dict[str, int | None], args: argparse.Namespace, raw: dict[str, Any]
) -> None:
    """The steady window, after a short settle: CPU, RSS and threads at both ends."""
    time.sleep(args.settle)
    raw["s0"] = {k: proc_sample(pid) for k, pid in pids.items() if pid}
    _wait(lambda: False, args.duration, orch.is_alive)
    raw["s1"] = {k: proc_sample(pid) for k, pid in pids.items() if pid}
    raw["orchestrator_alive"] = orch.is_alive()
    if not orch.is_alive():
        raw["notes"].append(f"the orchestrator process died (exit code {orch.exitcode})")


def _registration_line(count: int, raw: dict[str, Any]) -> str:
    if raw["registered_s"] is not None:
        return f"  {count:,}: all registered in {raw['registered_s']:.1f}s"
    return f"  {count:,}: registration not reached ({raw['managed_at_timeout']:,} managed)"


def _bare_baseline(process: Any, ctl: Controls, args: argparse.Namespace) -> dict[str, Any] | None:
    """CPU per heartbeat of the bare subscriber `process`, over `--baseline` seconds."""
    if not _wait(ctl.bare_ready.is_set, START_TIMEOUT_S, process.is_alive):
        return None
    time.sleep(1.0)  # warm-up
    b0, n0 = proc_sample(process.pid), int(ctl.bare_count.value)
    time.sleep(args.baseline)
    b1, n1 = proc_sample(process.pid), int(ctl.bare_count.value)
    ctl.bare_stop.set()
    if b0 is None or b1 is None or n1 <= n0:
        return None
    return {
        "rate": (n1 - n0) / (b1.at - b0.at),
        "cpu_us_per_hb": 1e6 * (b1.cpu_s - b0.cpu_s) / (n1 - n0),
    }


def _cores(raw: dict[str, Any], key: str) -> float:
    a, b = raw.get("s0", {}).get(key), raw.get("s1", {}).get(key)
    return safe_div(b.cpu_s - a.cpu_s, b.at - a.at) if a and b else math.nan


def _figures(count: int, raw: dict[str, Any]) -> dict[str, Any]:
    """The steady window's figures from what the step's processes left behind."""
    sim, peaks, observed = raw.get("sim"), raw.get("peaks"), raw.get("observed")
    sent_rate = safe_div(sim["heartbeats_sent"], sim["duration_s"]) if sim else math.nan
    figures: dict[str, Any] = {
        "sent_rate": sent_rate,
        "sim_cores": _cores(raw, "sim"),
        "server_cores": _cores(raw, "server"),
        "threads_peak": peaks.threads if peaks else 0,
        "rss_peak": peaks.rss if peaks else 0,
        "bare": raw.get("bare"),
        "sim": sim,
    }
    if observed:
        figures["downs"] = observed["downs"]
        figures["observer_disconnects"] = observed["disconnects"]
        figures["last_status"] = observed["last"]
    snapshots = raw.get("snapshots", [])
    if snapshots:
        final = snapshots[-1]
        figures.update(
            drops=final["drops"],
            bus_trouble=final["bus_trouble"],
            reconnects=final["reconnects"],
            disconnected_snapshots=sum(1 for s in snapshots if s["connected"] is False),
            log=final["log"],
            warnings=final["warnings"],
        )
    before = raw.get("before")
    first, last = raw.get("s0", {}).get("orch"), raw.get("s1", {}).get("orch")
    if first is None or last is None:
        return figures  # the orchestrator died before or during the window
    span = last.at - first.at
    figures["steady"] = (first.at, last.at)
    # Heartbeats through the product (its load balancer's table), while that hook exists.
    counted = [
        s for s in snapshots if s["heartbeats"] is not None and first.at <= s["at"] <= last.at
    ]
    accepted = math.nan
    if len(counted) >= 2:
        done = counted[-1]["heartbeats"] - counted[0]["heartbeats"]
        accepted = safe_div(done, counted[-1]["at"] - counted[0]["at"])
    basis = sent_rate if math.isnan(accepted) else accepted
    cpu = last.cpu_s - first.cpu_s
    figures.update(
        accepted_rate=accepted,
        orch_cores=cpu / span,
        cpu_us_per_hb=1e6 * safe_div(cpu, basis * span),
        cpu_basis="sent" if math.isnan(accepted) else "accepted",
        rss_per_gateway=(first.rss - before.rss) / count if before else math.nan,
        rss_end=last.rss,
        threads_before=before.threads if before else 0,
        threads_end=last.threads,
    )
    return figures


def _phase_latencies(result: dict[str, Any], raw: dict[str, Any]) -> None:
    """p50/p99 and failures of the status requests sent in each phase. A request with no
    good answer (timeout, no responders, an error reply) counts as infinitely slow."""
    requests = (raw.get("observed") or {}).get("requests", [])
    steady = result.get("steady", (math.nan, math.nan))
    for phase, (lo, hi) in (("reg", raw.get("registration", steady)), ("steady", steady)):
        chosen = [r for r in requests if lo <= r[0] <= hi]
        latencies = [r[1] if r[1] is not None else math.inf for r in chosen]
        failures: dict[str, int] = {}
        for _, _, outcome in chosen:
            if outcome != "ok":
                failures[outcome] = failures.get(outcome, 0) + 1
        result[f"{phase}_requests"] = len(chosen)
        result[f"{phase}_p50"] = _latency_percentile(latencies, 50)
        result[f"{phase}_p99"] = _latency_percentile(latencies, 99)
        result[f"{phase}_failures"] = failures
    downs = result.get("downs", [])
    result["false_downs"] = sum(1 for d in downs if d[1] == "down")
    result["false_status_downs"] = sum(1 for d in downs if d[1] == "status_changed")
    reg = raw.get("registration", (math.nan, math.nan))
    for phase, (lo, hi) in (("registration", reg), ("steady", steady)):
        result[f"false_downs_{phase}"] = sum(
            1 for d in downs if d[1] == "down" and lo <= d[0] <= hi
        )


def _latency_percentile(latencies: list[float], q: float) -> float:
    """`percentile`, where a failed request (inf) at or next to the rank makes it inf."""
    ordered = sorted(latencies)
    if ordered and math.isinf(ordered[math.ceil((len(ordered) - 1) * q / 100.0)]):
        return math.inf
    return percentile(ordered, q)


def _judge(result: dict[str, Any]) -> None:
    """Whether the step held, and if not, every reason why (how it broke)."""
    why = []
    if not result.get("orchestrator_alive", False):
        why.append("the orchestrator process died")
    reg = result.get("registered_s")
    if reg is None:
        why.append(f"not all registered ({result.get('managed_at_timeout', 0):,} managed)")
    elif reg > AIM_REGISTERED_S:
        why.append(f"registration took {reg:.1f}s > {AIM_REGISTERED_S:g}s")
    if result.get("false_downs") or result.get("false_status_downs"):
        why.append(
            f"false downs: {result.get('false_downs', 0):,} gateway.down, "
            f"{result.get('false_status_downs', 0):,} status_changed to down "
            f"(gateway.down: {result.get('false_downs_registration', 0):,} while registering, "
            f"{result.get('false_downs_steady', 0):,} in steady state)"
        )
    if result.get("steady_p99", math.inf) > AIM_STEADY_P99_S:
        why.append(f"steady p99 {_ms(result.get('steady_p99', math.nan))} > 250ms")
    if result.get("reg_p99", math.inf) > AIM_REGISTRATION_P99_S:
        why.append(f"registration p99 {_ms(result.get('reg_p99', math.nan))} > 1s")
    for phase in ("reg", "steady"):
        if result.get(f"{phase}_failures"):
            why.append(f"{phase} requests not answered: {result[f'{phase}_failures']}")
    lost = ("bus_trouble", "disconnected_snapshots", "reconnects", "observer_disconnects")
    if any(result.get(key) for key in lost):
        why.append(
            f"BUS: {result.get('bus_trouble', 0)} trouble log lines, "
            f"{result.get('reconnects', 0)} reconnects and "
            f"{result.get('disconnected_snapshots', 0)} disconnected seconds (orchestrator), "
            f"{result.get('observer_disconnects', 0)} disconnects (observer)"
        )
    accepted, sent = result.get("accepted_rate", math.nan), result.get("sent_rate", math.nan)
    if not math.isnan(accepted) and accepted < 0.95 * sent:
        why.append(f"accepted {accepted:,.0f} of {sent:,.0f} heartbeats/s")
    if result.get("drops"):
        why.append(f"shed/dropped at the edge: {result['drops']}")
    result["held"] = not why
    result["why"] = why


# Output -----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return "fail"
    return f"{1000 * seconds:,.0f}"


def report(results: Sequence[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        bare = r.get("bare") or {}
        bare_us = bare.get("cpu_us_per_hb", math.nan)
        cpu_us = r.get("cpu_us_per_hb", math.nan)
        reg = r.get("registered_s")
        failures = sum(r.get("reg_failures", {}).values()) + sum(
            r.get("steady_failures", {}).values()
        )
        rows.append(
            [
                f"{r['gateways']:,}",
                f"{reg:.1f}s" if reg is not None else f"no ({r.get('managed_at_timeout', 0):,})",
                f"{_ms(r.get('reg_p50', math.nan))}/{_ms(r.get('reg_p99', math.nan))}",
                f"{_ms(r.get('steady_p50', math.nan))}/{_ms(r.get('steady_p99', math.nan))}",
                str(failures),
                f"{r.get('false_downs', 0):,}/{r.get('false_status_downs', 0):,}",
                f"{r.get('accepted_rate', math.nan):,.0f}",
                f"{r.get('sent_rate', math.nan):,.0f}",
                f"{cpu_us:.1f}",
                f"{bare_us:.1f}",
                fmt_ratio(safe_div(cpu_us, bare_us)),
                f"{r.get('orch_cores', math.nan):.2f}",
                f"{r.get('rss_per_gateway', math.nan) / 1024:.1f}",
                f"{r.get('rss_end', math.nan) / 2**20:.0f}",
                f"{r.get('threads_end', 0):,}",
                f"{r.get('sim_cores', math.nan):.2f}",
                f"{r.get('server_cores', math.nan):.2f}",
                "yes" if r.get("held") else "NO",
            ]
        )
    print_table(
        f"Fleet scale, 1 Hz heartbeats, status asked {PROBE_HZ}/s ({machine_line()})",
        [
            "gateways",
            "registered",
            "reg p50/p99 ms",
            "steady p50/p99 ms",
            "unanswered",
            "false downs",
            "accepted/s",
            "sent/s",
            "CPU us/hb",
            "bare us/hb",
            "vs bare",
            "orch cores",
            "RSS KB/gw",
            "RSS MB",
            "threads",
            "sim cores",
            "nats cores",
            "held",
        ],
        rows,
    )
    held = [r["gateways"] for r in results if r.get("held")]
    print(f"Largest step held: {max(held):,} gateways" if held else "No step held.")
    for r in results:
        if r.get("held"):
            continue
        print(f"  {r['gateways']:,} did not hold:")
        for reason in r.get("why", []) + r.get("notes", []):
            print(f"    - {reason}")
        last = r.get("last_status") or {}
        if last:
            extra = {k: v for k, v in last.items() if k not in _KNOWN_STATUS}
            print(
                f"    - last status: by status {last.get('gateways_by_status')}, "
                f"managed {last.get('gateways_managed')}, restarts {last.get('actor_restarts')}"
                + (f", new fields {extra}" if extra else "")
            )
        for line in r.get("log", [])[:4]:
            print(f"    - log: {line}")
    print(flush=True)


_KNOWN_STATUS = {
    "status",
    "features",
    "active_distributions",
    "successfully_completed_distributions",
    "failed_distributions",
    "gateways_managed",
    "gateways_healthy",
    "load_balancing_strategy",
    "health_check_threshold",
    "ha_enabled",
    "malformed_messages",
    "actor_restarts",
    "selections",
    "gateways_by_status",
    "distributions_by_state",
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench fleet", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", default="1000,2500,5000,10000,20000", help="fleet sizes")
    parser.add_argument("--duration", type=float, default=20.0, help="steady seconds per step")
    parser.add_argument("--registration-timeout", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between the phases")
    parser.add_argument("--baseline", type=float, default=5.0, help="bare subscriber seconds")
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="for the orchestrator")
    parser.add_argument(
        "--max-broken", type=int, default=1, help="stop stepping after this many steps not held"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    args = parser.parse_args(argv)
    steps = [int(s.replace("_", "")) for s in args.steps.split(",") if s.strip()]

    def say(line: str) -> None:
        print(line, flush=True)

    results, broken = [], 0
    for count in steps:
        started = time.perf_counter()
        result = run_step(count, args, say)
        result["wall_s"] = time.perf_counter() - started
        say(f"  {count:,}: {'held' if result['held'] else 'NOT held'} ({result['wall_s']:.0f}s)")
        results.append(result)
        broken += not result["held"]
        if broken >= args.max_broken and count != steps[-1]:
            say(f"  stopping after {broken} step(s) not held (--max-broken {args.max_broken})")
            break
    report(results)
    if args.json:  # the runner's own lines share stdout, so JSON goes to a file
        document = {"machine": machine_line(), "argv": list(argv or []), "results": results}
        Path(args.json).write_text(json.dumps(_jsonable(document), indent=1, default=str))
        print(f"results written to {args.json}")
