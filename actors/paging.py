"""Paging of `P.api.gateways`, `P.api.distributions.list` and of the per-gateway states
in `P.api.distributions.get`: pure functions, no I/O.

A page is the first `limit` rows, in sort-key order, whose key is greater than the
cursor's, among the rows that pass the filters. The cursor is the sort key of the last
row returned (a gateway's id; a distribution's (created_at, id)), never an offset, so a
cursor stays valid while rows come and go: a row added or removed before it shifts
nothing, and the row it names may itself be gone. Rows added after it while a client
pages are seen, rows removed are not: each page is as of when it was served.

The per-gateway states of one distribution are paged in target order, by position:
targets are only ever added at the end, so a position is as stable as a key. Their
cursor also names the distribution, so that one distribution's is not used on another.

On the wire a cursor is opaque: base64url (unpadded) of the JSON array `[kind, *key]`,
e.g. `["gw", "edge-1"]`, `["dgw", "dist-…", 499]`. The kind keeps one list's cursor from
being used on another.

Besides `limit`, a page's rows take at most `max_bytes` of JSON (at least one row is
always returned), so that a reply fits in one NATS message however large its rows are.
A page cut short that way still has its `next_cursor`: only a null one means the end.
"""

from __future__ import annotations

import base64
import binascii
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from actors.distribution_machine import TERMINAL_STATUSES
from schemas.api import (
    DISTRIBUTIONS_DEFAULT_LIMIT,
    GATEWAY_STATES_DEFAULT_LIMIT,
    GATEWAYS_DEFAULT_LIMIT,
    PAGE_MAX_BYTES,
    Distribution,
    DistributionListReply,
    DistributionListRequest,
    DistributionPage,
    GatewaySnapshot,
    GatewaysReply,
    GatewaysRequest,
)
from schemas.types import GatewayId
from schemas.wire import DistributionId

T = TypeVar("T")
K = TypeVar("K")

GATEWAY_CURSOR: Final = "gw"
DISTRIBUTION_CURSOR: Final = "dist"
GATEWAY_STATE_CURSOR: Final = "dgw"
_json = msgspec.json.Encoder()
_gateway_cursor = msgspec.json.Decoder(tuple[Literal["gw"], GatewayId])
_distribution_cursor = msgspec.json.Decoder(
    tuple[Literal["dist"], Annotated[datetime, Meta(tz=True)], DistributionId]
)
_gateway_state_cursor = msgspec.json.Decoder(
    tuple[Literal["dgw"], DistributionId, Annotated[int, Meta(ge=0, le=2**31)]]
)


class BadCursor(ValueError):
    """A cursor that is not one of ours (or is another list's): a `bad_request`."""


def encode_cursor(kind: str, *key: Any) -> str:
    raw = _json.encode([kind, *key])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_cursor(cursor: str, decoder: msgspec.json.Decoder[K]) -> K:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        # msgspec.DecodeError is a ValueError; named for the reader.
        raise BadCursor(f"invalid cursor {cursor[:80]!r}: not one this list gave") from exc


def take_page(
    rows: Iterable[T],
    key: Callable[[T], Any],
    *,
    after: Any | None,
    limit: int,
    max_bytes: int = PAGE_MAX_BYTES,
) -> tuple[list[T], bool]:
    """The first `limit` rows by `key` past `after` (None: from the start), cut short
    before `max_bytes` of JSON; and whether more rows follow."""
    head = _head(rows, key, after=after, limit=limit)
    page = _fit(head[:limit], max_bytes)
    return page, len(page) < len(head)


def _head(rows: Iterable[T], key: Callable[[T], Any], *, after: Any | None, limit: int) -> list[T]:
    """The first `limit` + 1 rows by `key` past `after` (one more: do more follow?)."""
    candidates = rows if after is None else (row for row in rows if key(row) > after)
    return heapq.nsmallest(limit + 1, candidates, key=key)


def _fit(rows: list[T], max_bytes: int) -> list[T]:
    """The first rows that take at most `max_bytes` of JSON (at least one)."""
    page: list[T] = []
    size = 0
    for row in rows:
        size += len(_json.encode(row)) + 1  # and its comma
        if page and size > max_bytes:
            break
        page.append(row)
    return page


def _gateway_key(row: GatewaySnapshot) -> str:
    return row.gateway_id


def gateways_page(
    table: Iterable[GatewaySnapshot],
    request: GatewaysRequest,
    *,
    max_bytes: int = PAGE_MAX_BYTES,
) -> GatewaysReply:
    """One page of `P.api.gateways` from the gateway table, by gateway id.
    Raises BadCursor."""
    after = None
    if request.cursor:
        _, after = _decode_cursor(request.cursor, _gateway_cursor)
    status, region = request.status, request.region
    rows = (
        row
        for row in table
        if (status is None or row.status == status) and (region is None or row.region == region)
    )
    page, more = take_page(
        rows,
        _gateway_key,
        after=after,
        limit=request.limit or GATEWAYS_DEFAULT_LIMIT,
        max_bytes=max_bytes,
    )
    next_cursor = encode_cursor(GATEWAY_CURSOR, page[-1].gateway_id) if more else None
    return GatewaysReply(gateways=page, next_cursor=next_cursor)


def _distribution_key(row: Distribution) -> tuple[datetime, str]:
    return row.created_at, row.id


# A row's phase and blocker (DistributionPage.phase, .blocked_by), from its record.
Annotate = Callable[[Distribution], tuple[str, str | None]]


def distributions_page(
    records: Iterable[Distribution],
    request: DistributionListRequest,
    *,
    max_bytes: int = PAGE_MAX_BYTES,
    annotate: Annotate | None = None,
) -> DistributionListReply:
    """One page of `P.api.distributions.list`, oldest first (created_at, then id), each
    row with the first page of its per-gateway states (and, given `annotate`, its phase
    and blocker). Raises BadCursor."""
    after = None
    if request.cursor:
        _, created_at, dist_id = _decode_cursor(request.cursor, _distribution_cursor)
        after = (created_at, dist_id)
    status, config_type = request.status, request.config_type
    rows = (
        row
        for row in records
        if (request.include_completed or row.status not in TERMINAL_STATUSES)
        and (status is None or row.status == status)
        and (config_type is None or row.config_type == config_type)
    )
    limit = request.limit or DISTRIBUTIONS_DEFAULT_LIMIT
    head = _head(rows, _distribution_key, after=after, limit=limit)
    pages = [
        distribution_page(row, max_bytes=max_bytes, **_notes(annotate, row)) for row in head[:limit]
    ]
    page = _fit(pages, max_bytes)
    next_cursor = None
    if len(page) < len(head):
        last = page[-1]
        next_cursor = encode_cursor(DISTRIBUTION_CURSOR, last.created_at, last.id)
    return DistributionListReply(distributions=page, next_cursor=next_cursor)


def _notes(annotate: Annotate | None, record: Distribution) -> dict[str, Any]:
    if annotate is None:
        return {}
    phase, blocked_by = annotate(record)
    return {"phase": phase, "blocked_by": blocked_by}


def distribution_page(
    record: Distribution,
    *,
    limit: int | None = None,
    cursor: str | None = None,
    max_bytes: int = PAGE_MAX_BYTES,
    phase: str = "",
    blocked_by: str | None = None,
) -> DistributionPage:
    """`P.api.distributions.get`: the record with one page of its targets' states, in
    target order, cut short before their JSON takes `max_bytes`. The cursor is the last
    position returned: targets are only ever added at the end, so it stays valid.
    Raises BadCursor."""
    start = 0
    if cursor:
        _, dist_id, last = _decode_cursor(cursor, _gateway_state_cursor)
        if dist_id != record.id:
            raise BadCursor(f"invalid cursor {cursor[:80]!r}: it is another distribution's")
        start = last + 1
    targets, states = record.target_gateways, record.gateways
    page: list[str] = []
    size = 0
    for gw in targets[start : start + (limit or GATEWAY_STATES_DEFAULT_LIMIT)]:
        # The id in target_gateways, gateways and one of successful/failed, and its state.
        size += 3 * (len(gw) + 3) + len(_json.encode(states[gw])) + 1
        if page and size > max_bytes:
            break
        page.append(gw)
    end = start + len(page)
    in_page = set(page)
    fields = msgspec.structs.asdict(record)
    fields.update(
        target_gateways=page,
        gateways={gw: states[gw] for gw in page},
        successful_gateways=[gw for gw in record.successful_gateways if gw in in_page],
        failed_gateways=[gw for gw in record.failed_gateways if gw in in_page],
        target_count=len(targets),
        successful_count=len(record.successful_gateways),
        failed_count=len(record.failed_gateways),
        state_counts=dict(Counter(d.state for d in states.values())),
        next_cursor=(
            encode_cursor(GATEWAY_STATE_CURSOR, record.id, end - 1) if end < len(targets) else None
        ),
        phase=phase,
        blocked_by=blocked_by,
    )
    return DistributionPage(**fields)
