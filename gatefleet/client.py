"""A Python client for gatefleet over NATS, mirroring the seed's usage examples.

    with GatefleetClient("nats://127.0.0.1:4222") as client:
        choice = client.select_optimal_gateway("us-west")
        client.update_load_balancing_config("LeastConnections", 75.0)

Error replies become typed exceptions; an unreachable server is `Unavailable`.

The two lists are paged: `gateways()` and `list_distributions()` return one page (its
`next_cursor` asks for the next), `gateway_pages()` and `distribution_pages()` go through
every page:

    for page in client.gateway_pages(status="healthy"):
        for gateway in page.gateways: ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from bus.connection import AccessRefused, BusError, ClientAuth
from bus.micro import SERVICE_NAME
from bus.runtime import Bus
from bus.subjects import Subjects
from schemas import endpoints as api
from schemas.api import (
    DISTRIBUTIONS_MAX_LIMIT,
    GATEWAY_STATES_MAX_LIMIT,
    GATEWAYS_MAX_LIMIT,
    DistributeReply,
    DistributeRequest,
    DistributionActionRequest,
    DistributionGetRequest,
    DistributionListReply,
    DistributionListRequest,
    DistributionPage,
    Empty,
    GatewaysReply,
    GatewaysRequest,
    LoadBalancingConfig,
    LoadBalancingUpdate,
    MaintenanceReply,
    MaintenanceRequest,
    MaybeError,
    RollbackRequest,
    Rollout,
    SelectReply,
    SelectRequest,
    StatusReply,
)
from schemas.codec import DecodeError, decode
from schemas.endpoints import Endpoint
from schemas.micro import PingResponse, Replica, replica_of
from schemas.types import DistributionStatus, GatewayStatus, StrategyName

T = TypeVar("T", bound=msgspec.Struct)
# How long `replicas()` listens for answers: every replica answers $SRV.PING at once.
REPLICAS_WAIT_S = 0.5
P = TypeVar("P", GatewaysReply, DistributionListReply, DistributionPage)


class GatefleetError(Exception):
    """An error reply from gatefleet (or no reply at all)."""

    code = "internal"


class BadRequest(GatefleetError):
    code = "bad_request"


class NotFound(GatefleetError):
    code = "not_found"


class Unavailable(GatefleetError):
    code = "unavailable"


class Refused(Unavailable):
    """The server refused this client's credentials, or TLS failed."""


class InternalError(GatefleetError):
    code = "internal"


_BY_CODE: dict[str, type[GatefleetError]] = {
    cls.code: cls for cls in (BadRequest, NotFound, Unavailable, InternalError)
}


class GatefleetClient:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "gatefleet",
        timeout: float = 5.0,
        auth: ClientAuth | None = None,
    ) -> None:
        """`auth`: the .creds file and TLS CA to connect with (none: an open bus)."""
        self.subjects = Subjects(prefix)
        self.timeout = timeout
        self._bus = Bus(url, name="gatefleet-client", use_uvloop=False, auth=auth)

    def connect(self) -> None:
        try:
            self._bus.start(connect_timeout=self.timeout)
        except AccessRefused as exc:
            raise Refused(str(exc)) from exc
        except BusError as exc:
            raise Unavailable(str(exc)) from exc

    def close(self) -> None:
        self._bus.stop()

    def __enter__(self) -> GatefleetClient:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, endpoint: Endpoint[msgspec.Struct, T], body: msgspec.Struct) -> T:
        """Requests `P.api.<endpoint>` and decodes the reply, raising the typed error. An
        `unavailable` answer with `retry_after_ms` (no replica led; nobody took the
        request) is asked again after that long, while the timeout allows."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                data = self._bus.ask(self.subjects.api(endpoint.name), body, self.timeout)
            except BusError as exc:
                raise Unavailable(str(exc)) from exc
            error = decode(data, MaybeError).error
            if error is None:
                return decode(data, endpoint.reply)
            wait_s = (error.retry_after_ms or 0) / 1000
            if not wait_s or time.monotonic() + wait_s >= deadline:
                raise _BY_CODE.get(error.code, GatefleetError)(error.message)
            time.sleep(wait_s)

    # The seed's operations ---------------------------------------------------------------

    def status(self) -> StatusReply:
        return self.call(api.STATUS, Empty())

    def replicas(self, wait_s: float = REPLICAS_WAIT_S) -> list[Replica]:
        """Every gatefleet replica on this prefix that answers NATS service discovery
        within `wait_s`, by replica id."""
        try:
            answers = self._bus.gather(f"$SRV.PING.{SERVICE_NAME}", b"", wait_s)
        except BusError as exc:
            raise Unavailable(str(exc)) from exc
        found = []
        for data in answers:
            try:
                ping = decode(data, PingResponse)
            except DecodeError:
                continue  # not a micro answer: not ours to list
            replica = replica_of(ping)
            if replica is not None and ping.metadata.get("subject_prefix") == self.subjects.prefix:
                found.append(replica)
        return sorted(found, key=lambda r: r.replica_id)

    def gateways(
        self,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        status: GatewayStatus | None = None,
        region: str | None = None,
    ) -> GatewaysReply:
        """One page of gateways by id (the first, without a cursor)."""
        request = GatewaysRequest(limit=limit, cursor=cursor, status=status, region=region)
        return self.call(api.GATEWAYS, request)

    def gateway_pages(
        self,
        *,
        status: GatewayStatus | None = None,
        region: str | None = None,
        max_rows: int | None = None,
    ) -> Iterator[GatewaysReply]:
        """Every page of gateways, in order, up to `max_rows` rows in all (None: every
        row). The last page's `next_cursor` is where a cut-short listing would go on."""

        def fetch(limit: int, cursor: str | None) -> GatewaysReply:
            return self.gateways(limit=limit, cursor=cursor, status=status, region=region)

        return _pages(fetch, lambda page: len(page.gateways), GATEWAYS_MAX_LIMIT, max_rows)

    def select_optimal_gateway(
        self, region: str | None = None, client_id: str | None = None
    ) -> SelectReply:
        return self.call(api.SELECT_GATEWAY, SelectRequest(region=region, client_id=client_id))

    def get_load_balancing_config(self) -> LoadBalancingConfig:
        return self.call(api.LOAD_BALANCING_GET, Empty())

    def update_load_balancing_config(
        self, strategy: StrategyName | None = None, health_threshold: float | None = None
    ) -> LoadBalancingConfig:
        update = LoadBalancingUpdate(strategy=strategy, health_threshold=health_threshold)
        return self.call(api.LOAD_BALANCING_SET, update)

    def set_maintenance(
        self, gateway_id: str, enabled: bool, reason: str | None = None
    ) -> MaintenanceReply:
        request = MaintenanceRequest(gateway_id=gateway_id, enabled=enabled, reason=reason)
        return self.call(api.MAINTENANCE, request)

    def distribute(
        self,
        config_type: str,
        config_data: dict[str, Any],
        target_gateways: list[str] | None = None,
        *,
        rollout: Rollout | None = None,
        dry_run: bool = False,
    ) -> DistributeReply:
        """A new distribution (with `rollout`: progressive delivery); with `dry_run`, only
        its `plan`, nothing stored or pushed."""
        request = DistributeRequest(
            config_type=config_type,
            config_data=config_data,
            target_gateways=target_gateways,
            rollout=rollout,
            dry_run=dry_run,
        )
        return self.call(api.DISTRIBUTE, request)

    def pause_distribution(self, distribution_id: str) -> DistributionPage:
        """No new batch until resumed (a running distribution); answers it as it is now."""
        return self.call(
            api.DISTRIBUTIONS_PAUSE, DistributionActionRequest(distribution_id=distribution_id)
        )

    def resume_distribution(self, distribution_id: str) -> DistributionPage:
        return self.call(
            api.DISTRIBUTIONS_RESUME, DistributionActionRequest(distribution_id=distribution_id)
        )

    def abort_distribution(self, distribution_id: str) -> DistributionPage:
        """Ends it `aborted`: nothing more is pushed, nothing is rolled back."""
        return self.call(
            api.DISTRIBUTIONS_ABORT, DistributionActionRequest(distribution_id=distribution_id)
        )

    def rollback(
        self,
        config_type: str,
        to_version: int | None = None,
        target_gateways: list[str] | None = None,
    ) -> DistributeReply:
        """Pushes an earlier version's content (None: the one before the desired version)
        again, as a new version."""
        request = RollbackRequest(
            config_type=config_type, to_version=to_version, target_gateways=target_gateways
        )
        return self.call(api.ROLLBACK, request)

    def get_distribution(
        self, distribution_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> DistributionPage:
        """A distribution with one page of its per-gateway states (the first, without a
        cursor); its counts are of every target."""
        request = DistributionGetRequest(
            distribution_id=distribution_id, limit=limit, cursor=cursor
        )
        return self.call(api.DISTRIBUTIONS_GET, request)

    def distribution_gateway_pages(self, distribution_id: str) -> Iterator[DistributionPage]:
        """Every page of a distribution's per-gateway states, in target order."""

        def fetch(limit: int, cursor: str | None) -> DistributionPage:
            return self.get_distribution(distribution_id, limit=limit, cursor=cursor)

        return _pages(fetch, lambda page: len(page.target_gateways), GATEWAY_STATES_MAX_LIMIT, None)

    def whole_distribution(self, distribution_id: str) -> DistributionPage:
        """A distribution with every gateway's state, read page by page (so not one
        snapshot while it runs); its other fields as of the last page."""
        return merge_pages(list(self.distribution_gateway_pages(distribution_id)))

    def list_distributions(
        self,
        include_completed: bool = True,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        status: DistributionStatus | None = None,
        config_type: str | None = None,
    ) -> DistributionListReply:
        """One page of distributions, oldest first (the first, without a cursor)."""
        request = DistributionListRequest(
            include_completed=include_completed,
            limit=limit,
            cursor=cursor,
            status=status,
            config_type=config_type,
        )
        return self.call(api.DISTRIBUTIONS_LIST, request)

    def distribution_pages(
        self,
        include_completed: bool = True,
        *,
        status: DistributionStatus | None = None,
        config_type: str | None = None,
        max_rows: int | None = None,
    ) -> Iterator[DistributionListReply]:
        """Every page of distributions, oldest first, up to `max_rows` rows in all."""

        def fetch(limit: int, cursor: str | None) -> DistributionListReply:
            return self.list_distributions(
                include_completed,
                limit=limit,
                cursor=cursor,
                status=status,
                config_type=config_type,
            )

        return _pages(
            fetch, lambda page: len(page.distributions), DISTRIBUTIONS_MAX_LIMIT, max_rows
        )


def merge_pages(pages: list[DistributionPage]) -> DistributionPage:
    """One DistributionPage holding the per-gateway states of all these pages."""
    gateways = {gw: d for page in pages for gw, d in page.gateways.items()}
    return msgspec.structs.replace(
        pages[-1],
        target_gateways=[gw for page in pages for gw in page.target_gateways],
        gateways=gateways,
        successful_gateways=[gw for page in pages for gw in page.successful_gateways],
        failed_gateways=[gw for page in pages for gw in page.failed_gateways],
        next_cursor=None,
    )


def _pages(
    fetch: Callable[[int, str | None], P],
    count: Callable[[P], int],
    page_size: int,
    max_rows: int | None,
) -> Iterator[P]:
    """Pages from `fetch(limit, cursor)` until the last one, or `max_rows` rows."""
    cursor: str | None = None
    left = max_rows
    while left is None or left > 0:
        page = fetch(page_size if left is None else min(page_size, left), cursor)
        yield page
        cursor = page.next_cursor
        if cursor is None:
            return
        if left is not None:
            left -= count(page)
