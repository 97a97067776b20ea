"""The HTTP API: a route for each endpoint that has one, plus health and Prometheus metrics.

A thin translator. Each API call becomes the NATS request on the matching `P.api.*`
subject and the reply body is returned as it is, so HTTP and NATS bodies are the same
by construction; an error reply's code picks the status (bad_request 400, not_found 404,
unavailable 503, internal 500), and no answer at all is 503 `unavailable`.

The routes come from the endpoint table (schemas/endpoints.py, `Endpoint.http`, under
/api/v1/orchestration; docs/PROTOCOL.md section 6 lists them, held to the table by a
test). GET routes take the request's fields from the path (`{field}`) and the query
string. POST bodies are forwarded untouched (an empty one as `{}`; a route with `{field}`
in its path sets that field in it): the actors validate them, so a bad body gets the
same `bad_request` over HTTP as over NATS. Bodies over 8 MiB are refused with 413.
Besides those:

| HTTP | NATS request |
|---|---|
| GET  /healthz | `P.api.status`: 200 `{"status": "ok"}` or 503 |
| GET  /metrics | the counts of P.api.status (and, for small fleets, P.api.gateways' heartbeat ages), as Prometheus text |

When a token is configured, every path but `/healthz` needs
`Authorization: Bearer <token>` (401 otherwise): `/healthz` is for load balancers and
orchestrators' probes, which say nothing beyond "up or not". A read-only token may call
the routes of endpoints that change nothing (403 otherwise). The server runs on its own
bus (own loop thread, own NATS connection), never on the orchestrator's, so a slow HTTP
client cannot delay a heartbeat.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from bus.connection import ClientAuth
from bus.edge import MAX_REQUEST_BYTES, error_body
from bus.runtime import Bus
from bus.subjects import Subjects
from gatefleet import http_bridge, metrics
from schemas.api import (
    GATEWAYS_MAX_LIMIT,
    ErrorCode,
    GatewaySnapshot,
    GatewaysReply,
    GatewaysRequest,
    StatusReply,
)
from schemas.codec import decode, encode
from schemas.endpoints import ENDPOINTS, GATEWAYS, HTTP_PREFIX, STATUS, Endpoint
from schemas.settings import HttpSettings

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
DEFAULT_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 2.0
SHUTDOWN_TIMEOUT_S = 5.0
JSON = "application/json"
DEFAULT_PER_GATEWAY_METRICS_MAX = HttpSettings().per_gateway_metrics_max  # one default
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AnyEndpoint = Endpoint[msgspec.Struct, msgspec.Struct]


class HttpApi:
    """The HTTP server and its bus, started and stopped from any thread but the bus's."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        access_log: bool = True,
        per_gateway_metrics_max: int = DEFAULT_PER_GATEWAY_METRICS_MAX,
    ) -> None:
        self.timeout = timeout
        self.access_log = access_log
        self.per_gateway_metrics_max = per_gateway_metrics_max
        self._bus: Bus | None = None
        self._runner: web.AppRunner | None = None

    def start(
        self,
        url: str,
        prefix: str,
        host: str,
        port: int,
        token: str,
        *,
        read_only_token: str = "",
        auth: ClientAuth | None = None,
    ) -> tuple[str, int]:
        """Connects to NATS at `url` (with `auth`'s credentials) and serves on `host:port`
        (0: a free port).

        Returns the bound (host, port). Raises BusError if NATS is unreachable, OSError
        if the address cannot be bound; either way nothing is left running."""
        if self._bus is not None:
            raise RuntimeError("the HTTP API is already running")
        bus = Bus(url, name="gatefleet-http", auth=auth)
        bus.start()
        try:
            app = make_app(
                bus,
                Subjects(prefix),
                token=token,
                timeout=self.timeout,
                per_gateway_metrics_max=self.per_gateway_metrics_max,
                read_only_token=read_only_token,
            )
            self._runner = bus.run(self._serve(app, host, port), timeout=30)
        except BaseException:
            bus.stop()
            raise
        self._bus = bus
        bound_host, bound_port = (str(part) for part in self._runner.addresses[0][:2])
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info("HTTP API on http://%s:%s%s", shown, bound_port, HTTP_PREFIX)
        return bound_host, int(bound_port)

    async def _serve(self, app: web.Application, host: str, port: int) -> web.AppRunner:
        if self.access_log:
            runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        else:
            runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    def stop(self) -> None:
        """Stops serving (in-flight calls get up to SHUTDOWN_TIMEOUT_S), then the bus."""
        bus, runner = self._bus, self._runner
        self._bus = self._runner = None
        if bus is None:
            return
        try:
            if runner is not None:
                bus.run(runner.cleanup(), timeout=SHUTDOWN_TIMEOUT_S + 5)
        finally:
            bus.stop()


def make_app(
    bus: Bus,
    subjects: Subjects,
    *,
    token: str,
    timeout: float,
    per_gateway_metrics_max: int = DEFAULT_PER_GATEWAY_METRICS_MAX,
    read_only_token: str = "",
) -> web.Application:
    """The aiohttp application; its handlers must run on `bus`'s loop."""
    api = _Api(bus, subjects, timeout, per_gateway_metrics_max)
    app = web.Application(
        middlewares=[_error_bodies, _bearer_auth(token, read_only_token)],
        client_max_size=MAX_REQUEST_BYTES,
    )
    for endpoint in ENDPOINTS:
        if endpoint.http is not None:
            method, path = endpoint.http
            forward = api.forward_get if method == "GET" else api.forward_post
            app.router.add_route(method, HTTP_PREFIX + path, forward(endpoint))
    app.router.add_get(HEALTH_PATH, api.healthz)
    app.router.add_get("/metrics", api.metrics)
    return app


class _Api:
    """The handlers: each one NATS request."""

    def __init__(
        self, bus: Bus, subjects: Subjects, timeout: float, per_gateway_metrics_max: int
    ) -> None:
        self.bus = bus
        self.subjects = subjects
        self.timeout = timeout
        self.per_gateway_metrics_max = per_gateway_metrics_max

    async def ask(
        self,
        endpoint: AnyEndpoint,
        body: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 - passed on as the NATS request timeout
    ) -> tuple[int, bytes]:
        subject = self.subjects.api(endpoint.name)
        return await http_bridge.request(self.bus, subject, body, timeout or self.timeout)

    def forward_get(self, endpoint: AnyEndpoint) -> Handler:
        """The request's fields from the path (`{field}`) and the query string."""

        async def handle(request: web.Request) -> web.Response:
            fields = {**request.query, **request.match_info}
            try:
                body = encode(query_body(endpoint.request, fields)) if fields else b"{}"
            except ValueError as exc:
                return _error(400, "bad_request", str(exc))
            return _json(*await self.ask(endpoint, body))

        return handle

    def forward_post(self, endpoint: AnyEndpoint) -> Handler:
        """The JSON body, with the path's fields (`{field}`) set in it."""

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if request.match_info:
                try:
                    fields = decode(body, dict[str, Any]) if body.strip() else {}
                except msgspec.DecodeError as exc:
                    return _error(400, "bad_request", f"invalid JSON body: {exc}")
                body = encode({**fields, **request.match_info})
            return _json(*await self.ask(endpoint, body if body.strip() else b"{}"))

        return handle

    async def healthz(self, _request: web.Request) -> web.Response:
        if not http_bridge.connected(self.bus):
            return _error(503, "unavailable", "not connected to NATS")
        status, body = await self.ask(STATUS, b"{}", min(self.timeout, HEALTH_TIMEOUT_S))
        if status != http_bridge.OK:
            return _json(503, body)
        down = {part: why for part, why in decode(body, StatusReply).health.items() if why != "ok"}
        if down:
            reasons = "; ".join(f"{part}: {why}" for part, why in sorted(down.items()))
            return _error(503, "unavailable", reasons)
        return _json(200, b'{"status":"ok"}')

    async def metrics(self, _request: web.Request) -> web.Response:
        """Prometheus text (gatefleet/metrics.py); `gatefleet_up 0` alone when the
        orchestrator does not answer."""
        status = await self._status()
        gateways = None
        if status is not None and status.gateways_managed <= self.per_gateway_metrics_max:
            gateways = await self._gateways(self.per_gateway_metrics_max)
        page = metrics.render(status, gateways, datetime.now(UTC))
        return web.Response(body=page, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _status(self) -> StatusReply | None:
        # The status carries every count (a list of distributions could outgrow a message).
        code, body = await self.ask(STATUS, b"{}")
        if code != http_bridge.OK:
            log.warning("metrics: gatefleet did not answer: %s", body)
            return None
        try:
            return decode(body, StatusReply)
        except msgspec.DecodeError:
            log.exception("metrics: unexpected reply")
            return None

    async def _gateways(self, at_most: int) -> list[GatewaySnapshot] | None:
        """Up to `at_most` gateways, page by page; None if a page does not come."""
        rows: list[GatewaySnapshot] = []
        cursor: str | None = None
        while len(rows) < at_most:
            limit = min(GATEWAYS_MAX_LIMIT, at_most - len(rows))
            code, body = await self.ask(
                GATEWAYS, encode(GatewaysRequest(limit=limit, cursor=cursor))
            )
            if code != http_bridge.OK:
                log.warning("metrics: no gateways list: %s", body)
                return None
            page = decode(body, GatewaysReply)
            rows += page.gateways
            cursor = page.next_cursor
            if cursor is None:
                break
        return rows


_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def query_body(kind: type[msgspec.Struct], fields: dict[str, str]) -> msgspec.Struct:
    """A request body from path and query strings; ValueError says which field is wrong."""
    values: dict[str, object] = dict(fields)
    for field in msgspec.structs.fields(kind):
        text = fields.get(field.encode_name)
        if text is not None and field.type is bool:
            if text.lower() not in _BOOLEANS:
                raise ValueError(f"{field.encode_name} must be true or false")
            values[field.encode_name] = _BOOLEANS[text.lower()]
    try:
        return msgspec.convert(values, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc


# Responses, authentication and error bodies ----------------------------------------------


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type=JSON)


def _error(
    status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = _json(status, error_body(code, message))
    response.headers.update(headers or {})
    return response


# What a read-only token may call besides GET: the POST routes that change nothing.
_READ_ONLY_POSTS = frozenset(
    HTTP_PREFIX + e.http[1] for e in ENDPOINTS if e.http and e.http[0] == "POST" and not e.writes
)


def _bearer_auth(token: str, read_only_token: str = "") -> Middleware:
    """A middleware refusing calls without `Authorization: Bearer <token>` (none if neither
    token is set); `read_only_token` may call GET routes and select-gateway only."""
    tokens = [(token.encode(), False)] if token else []
    tokens += [(read_only_token.encode(), True)] if read_only_token else []

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if tokens and request.path != HEALTH_PATH:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            given_bytes = given.strip().encode()
            # Every token compared, in constant time: which one matched is not timed.
            matches = [ro for t, ro in tokens if hmac.compare_digest(given_bytes, t)]
            if scheme.lower() != "bearer" or not matches:
                challenge = {"WWW-Authenticate": 'Bearer realm="gatefleet"'}
                return _error(401, "bad_request", "missing or wrong bearer token", challenge)
            reads = request.method in ("GET", "HEAD") or request.path in _READ_ONLY_POSTS
            if all(matches) and not reads:
                return _error(403, "bad_request", "this token may only read and select")
        return await handler(request)

    return check


@web.middleware
async def _error_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method, body too large) and crashes,
    answered with the protocol's error body instead of plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code: ErrorCode = "not_found" if exc.status == 404 else "bad_request"
        if exc.status >= 500:
            code = "unavailable" if exc.status == 503 else "internal"
        message = _MESSAGES.get(exc.status) or exc.reason
        headers = {k: v for k, v in exc.headers.items() if k in _KEPT_HEADERS}
        return _error(exc.status, code, message, headers)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error(500, "internal", "internal error")


_KEPT_HEADERS = {"Allow"}
_MESSAGES = {
    404: "no such path",
    405: "method not allowed",
    413: f"request body over {MAX_REQUEST_BYTES} bytes",
}
