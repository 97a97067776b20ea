"""Sticky clients: the gateway each client was sent to, the same on every replica.

A client (`client_id`) stays on its gateway while that gateway stays selectable (the
rule is the strategies', actors/strategies.py). `StickyClients` is one replica's copy,
its fast path: a selection reads it, never the bucket. Pure logic, no I/O: the load
balancer shares what changes through the `sticky` bucket (schemas/stored.py) and feeds
back what the bucket's watch tells (`apply_stored`), every replica's writes, its own
included, in the bucket's order, so that each replica ends up with the bucket's value.

What is shared (`remember` says when): a new client, a client moved to another gateway,
a client with no gateway left (deleted); never a selection that keeps its gateway, but
once a tenth of the TTL, so that the bucket, which forgets a key `ttl_s` after its last
write, keeps a client that keeps coming. Every replica forgets an assignment as the
bucket does, `ttl_s` after it was written (the bucket tells how old a value is, by the
server's clock against ours), and the least recently seen beyond MAX_STICKY_CLIENTS.

Two replicas that assign a new client at the same moment answer it differently until
the later write reaches both (milliseconds); from then on both answer the later one.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict

from schemas.codec import DecodeError, decode
from schemas.settings import MAX_STICKY_CLIENTS
from schemas.stored import StickyAssignment

# A client that keeps its gateway is written again after this share of the TTL.
REFRESH_SHARE = 0.1


def bucket_key(client_id: str) -> str:
    """The client's key: unpadded base64url of its UTF-8, a valid key for any id and a
    different one for each."""
    return base64.urlsafe_b64encode(client_id.encode()).rstrip(b"=").decode("ascii")


def client_of(key: str) -> str | None:
    """The client id `key` stands for; None if no `bucket_key` makes it."""
    try:
        client_id = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return client_id if client_id and bucket_key(client_id) == key else None


class StickyClients:
    """Client id -> (gateway id, when its value was written), least recently seen first.
    Times are on the caller's clock (`now`)."""

    def __init__(self, ttl_s: float, capacity: int = MAX_STICKY_CLIENTS) -> None:
        self.ttl_s = ttl_s
        self._refresh_s = ttl_s * REFRESH_SHARE
        self._capacity = capacity
        self._assigned: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._assigned)

    def gateway(self, client_id: str, now: float) -> str | None:
        """The client's gateway, unless it has none or it is past its TTL."""
        assigned = self._assigned.get(client_id)
        if assigned is None:
            return None
        if now - assigned[1] >= self.ttl_s:
            del self._assigned[client_id]
            return None
        return assigned[0]

    def remember(self, client_id: str, gateway_id: str | None, now: float) -> bool:
        """The client was just sent to `gateway_id` (None: nowhere). True when the bucket
        must be told: a change, or a refresh due."""
        if gateway_id is None:
            return self._assigned.pop(client_id, None) is not None
        assigned = self._assigned.get(client_id)
        if (
            assigned is not None
            and assigned[0] == gateway_id
            and now - assigned[1] < self._refresh_s
        ):
            self._assigned.move_to_end(client_id)
            return False
        self._assign(client_id, gateway_id, now)
        return True

    def apply_stored(self, key: str, value: bytes | None, age_s: float, now: float) -> bool:
        """A value of the bucket (None: deleted), written `age_s` ago; False if it does not
        read as one (it is then ignored)."""
        client_id = client_of(key)
        if client_id is None:
            return False
        if value is None or age_s >= self.ttl_s:
            self._assigned.pop(client_id, None)
            return True
        try:
            gateway_id = decode(value, StickyAssignment).gateway_id
        except DecodeError:
            return False
        self._assign(client_id, gateway_id, now - age_s)
        return True

    def _assign(self, client_id: str, gateway_id: str, written: float) -> None:
        self._assigned[client_id] = (gateway_id, written)
        self._assigned.move_to_end(client_id)
        if len(self._assigned) > self._capacity:
            self._assigned.popitem(last=False)  # forget the least recently seen client
