"""gatefleet's request endpoints as a NATS micro service: the `$SRV` discovery protocol.

`nats micro ls`, `nats micro info gatefleet` and any micro client find the `P.api.*`
endpoints through `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`, each alone, with the service
name (`gatefleet`) and with the name and this process's id; every gatefleet process
answers (no queue group), with its subject prefix in the metadata.

The stats are true to the end. A request counts once its reply is published on the API
lane, whoever published it (the actor, the edge's `bad_request`, a shed `unavailable`), and
its processing time runs from its arrival on the lane to that publish; a reply carrying the
micro error headers counts as an error. nats-py's `nats.micro` times only its handler
coroutine, which here would only hand the request to an actor: so `$SRV` is answered here.

Everything runs on the API lane's loop: the arrivals (`timed` handlers), the reply hook
(`Bus.on_published`) and the `$SRV` answers, so the counters need no lock. A request
never answered within UNANSWERED_AFTER_NS counts as an error, and stops being tracked
(looked for on STATS, and whenever more than SWEEP_ABOVE requests wait).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TypedDict

import msgspec
from nats.nuid import NUID

from bus.runtime import Bus, Inbound, SubscriptionHandle
from bus.subjects import Subjects
from schemas.endpoints import API_QUEUE, ENDPOINTS, Endpoint
from schemas.micro import (
    INFO_RESPONSE,
    PING_RESPONSE,
    STATS_RESPONSE,
    EndpointInfo,
    EndpointStats,
    InfoResponse,
    PingResponse,
    StatsResponse,
)

SERVICE_NAME = "gatefleet"
DESCRIPTION = "gatefleet's orchestration API (docs/PROTOCOL.md)"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
# A request with no reply after this long counts as an error (a client gave up long ago).
UNANSWERED_AFTER_NS = 60 * 1_000_000_000
# Requests waiting for their reply above which those never answered are looked for (the
# mark then doubles with the requests still waiting, so a look stays rare under load).
SWEEP_ABOVE = 4096


@dataclass(slots=True)
class _Counts:
    """One endpoint's counters."""

    name: str
    subject: str
    requests: int = 0
    errors: int = 0
    last_error: str = ""
    processing_ns: int = 0

    def done(self, elapsed_ns: int, error: str | None) -> None:
        self.requests += 1
        self.processing_ns += elapsed_ns
        if error is not None:
            self.errors += 1
            self.last_error = error

    def stats(self) -> EndpointStats:
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=API_QUEUE,
            num_requests=self.requests,
            num_errors=self.errors,
            last_error=self.last_error,
            processing_time=self.processing_ns,
            average_processing_time=self.processing_ns // self.requests if self.requests else 0,
        )


class _Identity(TypedDict):
    name: str
    id: str
    version: str
    metadata: dict[str, str]


class MicroService:
    """The `$SRV` answers and the request stats of one gatefleet process."""

    def __init__(
        self,
        subjects: Subjects,
        endpoints: Iterable[Endpoint[msgspec.Struct, msgspec.Struct]] = ENDPOINTS,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.subjects = subjects
        self.id = NUID().next().decode()
        self.version = _version()
        self.metadata = {"subject_prefix": subjects.prefix}
        # What changes while it runs (the replica's role), added to `metadata` per answer.
        self.describe: Callable[[], dict[str, str]] = dict
        self.started = datetime.now(UTC)
        self._clock = clock
        self._counts = {e.name: _Counts(e.name, subjects.api(e.name)) for e in endpoints}
        # Requests waiting for their reply: reply subject -> (endpoint, arrival). A client
        # reusing one reply subject for requests in flight together is counted once.
        self._pending: dict[str, tuple[_Counts, int]] = {}
        self._sweep_above = SWEEP_ABOVE

    # The stats ----------------------------------------------------------------------------

    def timed(self, endpoint: str, handler: Callable[[Inbound], None]) -> Callable[[Inbound], None]:
        """`handler` for `endpoint`'s subscription, with each request's arrival noted."""
        counts, pending, clock = self._counts[endpoint], self._pending, self._clock

        def handle(msg: Inbound) -> None:
            reply = msg.reply
            if reply:
                pending[reply] = (counts, clock())
                if len(pending) > self._sweep_above:
                    self._sweep()
            handler(msg)

        return handle

    def waited_ns(self, reply: str) -> int | None:
        """How long the request answered on `reply` has waited since it arrived (None: not
        a request in flight). On the API lane's loop, as the stats are."""
        entry = self._pending.get(reply)
        return None if entry is None else self._clock() - entry[1]

    def published(self, subject: str, headers: dict[str, str] | None) -> None:
        """The API lane published a message (`Bus.on_published`): if it answers a request,
        that request is done."""
        entry = self._pending.pop(subject, None)
        if entry is None:
            return
        counts, arrived = entry
        error = None
        if headers and ERROR_CODE_HEADER in headers:
            error = f"{headers[ERROR_CODE_HEADER]}:{headers.get(ERROR_HEADER, '')}"
        counts.done(self._clock() - arrived, error)

    def _sweep(self) -> None:
        now = self._clock()
        unanswered = [
            reply
            for reply, (_, arrived) in self._pending.items()
            if now - arrived > UNANSWERED_AFTER_NS
        ]
        for reply in unanswered:
            counts, arrived = self._pending.pop(reply)
            counts.done(now - arrived, f"500:no reply within {UNANSWERED_AFTER_NS // 10**9} s")
        self._sweep_above = max(SWEEP_ABOVE, 2 * len(self._pending))

    # The answers --------------------------------------------------------------------------

    def ping(self) -> PingResponse:
        return PingResponse(type=PING_RESPONSE, **self._identity())

    def info(self) -> InfoResponse:
        return InfoResponse(
            type=INFO_RESPONSE,
            **self._identity(),
            description=DESCRIPTION,
            endpoints=[
                EndpointInfo(name=c.name, subject=c.subject, queue_group=API_QUEUE)
                for c in self._counts.values()
            ],
        )

    def stats(self) -> StatsResponse:
        self._sweep()
        return StatsResponse(
            type=STATS_RESPONSE,
            **self._identity(),
            started=self.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            endpoints=[c.stats() for c in self._counts.values()],
        )

    def _identity(self) -> _Identity:
        return {
            "name": SERVICE_NAME,
            "id": self.id,
            "version": self.version,
            "metadata": {**self.metadata, **self.describe()},
        }

    def start(self, bus: Bus) -> list[SubscriptionHandle]:
        """Answers `$SRV` on `bus` (the API lane) and hears of every reply it publishes."""
        bus.on_published = self.published
        answers: dict[str, Callable[[], msgspec.Struct]] = {
            "PING": self.ping,
            "INFO": self.info,
            "STATS": self.stats,
        }
        handles = []
        for verb, answer in answers.items():

            def on_request(msg: Inbound, answer: Callable[[], msgspec.Struct] = answer) -> None:
                if msg.reply:
                    bus.publish(msg.reply, answer())

            for subject in self.subjects.service_discovery(verb, SERVICE_NAME, self.id):
                handles.append(bus.subscribe(subject, on_request))
        return handles


def _version() -> str:
    """gatefleet's version as installed (a micro service's version must be semver)."""
    try:
        return version("gatefleet")
    except PackageNotFoundError:
        return "0.0.0"
