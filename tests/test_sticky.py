"""Sticky clients' pure logic (actors/sticky.py): when a change is shared, how the TTL
and the memory bound forget, what a bucket value does, and the key of any client id."""

from __future__ import annotations

import random
import re

import pytest

from actors.sticky import StickyClients, bucket_key, client_of
from schemas.codec import encode
from schemas.stored import StickyAssignment

KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


def stored(gateway_id: str) -> bytes:
    return encode(StickyAssignment(gateway_id=gateway_id))


def test_a_change_is_shared_once_and_a_kept_gateway_only_to_refresh() -> None:
    sticky = StickyClients(ttl_s=100.0)
    assert sticky.remember("alice", "gw-1", now=0.0)  # new
    assert not sticky.remember("alice", "gw-1", now=1.0)  # kept
    assert not sticky.remember("alice", "gw-1", now=9.9)
    assert sticky.remember("alice", "gw-1", now=10.0)  # a tenth of the TTL: refreshed
    assert not sticky.remember("alice", "gw-1", now=19.9)  # counted from the refresh
    assert sticky.remember("alice", "gw-2", now=20.0)  # moved
    assert sticky.gateway("alice", now=20.0) == "gw-2"
    assert sticky.remember("alice", None, now=21.0)  # no gateway left: deleted
    assert sticky.gateway("alice", now=21.0) is None
    assert not sticky.remember("alice", None, now=22.0)  # nothing left to delete


def test_an_assignment_is_forgotten_at_its_ttl() -> None:
    sticky = StickyClients(ttl_s=100.0)
    sticky.remember("alice", "gw-1", now=0.0)
    assert sticky.gateway("alice", now=99.9) == "gw-1"
    assert sticky.gateway("alice", now=100.0) is None
    assert len(sticky) == 0
    assert sticky.remember("alice", "gw-1", now=100.0)  # a new client again: shared


def test_the_least_recently_seen_client_goes_first_beyond_capacity() -> None:
    sticky = StickyClients(ttl_s=100.0, capacity=2)
    sticky.remember("a", "gw-1", now=0.0)
    sticky.remember("b", "gw-1", now=0.0)
    sticky.remember("a", "gw-1", now=1.0)  # seen again: b is now the oldest
    sticky.remember("c", "gw-1", now=2.0)
    assert [sticky.gateway(c, now=3.0) for c in "abc"] == ["gw-1", None, "gw-1"]


def test_bucket_values_are_applied_with_their_age() -> None:
    sticky = StickyClients(ttl_s=100.0)
    key = bucket_key("alice")
    assert sticky.apply_stored(key, stored("gw-1"), age_s=30.0, now=1000.0)
    assert sticky.gateway("alice", now=1069.9) == "gw-1"
    assert sticky.gateway("alice", now=1070.0) is None  # written 100 s before
    # Another replica moved it, then deleted it.
    assert sticky.apply_stored(key, stored("gw-2"), age_s=0.0, now=1100.0)
    assert sticky.gateway("alice", now=1100.0) == "gw-2"
    assert not sticky.remember("alice", "gw-2", now=1101.0)  # as shared: nothing to write
    assert sticky.apply_stored(key, None, age_s=0.0, now=1102.0)
    assert sticky.gateway("alice", now=1102.0) is None
    # A value older than the TTL, that the bucket had not dropped yet, is no assignment.
    assert sticky.apply_stored(key, stored("gw-3"), age_s=100.0, now=1103.0)
    assert sticky.gateway("alice", now=1103.0) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("not base64!", stored("gw-1")),
        ("YWxpY2U=", stored("gw-1")),  # padded: not a key bucket_key makes
        ("", stored("gw-1")),
        ("_w", stored("gw-1")),  # not UTF-8
        (bucket_key("alice"), b"{oops"),
        (bucket_key("alice"), b'{"gateway_id": "bad id!"}'),
    ],
)
def test_a_value_that_does_not_read_is_ignored(key: str, value: bytes) -> None:
    sticky = StickyClients(ttl_s=100.0)
    sticky.remember("alice", "gw-0", now=0.0)
    assert not sticky.apply_stored(key, value, age_s=0.0, now=1.0)
    assert sticky.gateway("alice", now=1.0) == "gw-0"


def test_every_client_id_has_a_valid_key_of_its_own() -> None:
    rng = random.Random(16)
    alphabet = "aZ09.-_=/*> \t\n\x00é漢😀"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(5000)}
    ids |= {"a", "a.", ".a", "a..b", "*", ">", "x" * 256, "😀" * 256}
    keys = {bucket_key(client_id) for client_id in ids}
    assert len(keys) == len(ids)  # no two ids share a key
    for client_id in ids:
        key = bucket_key(client_id)
        assert KV_KEY.fullmatch(key), key
        assert "." not in key  # one token: no empty token, whatever the id
        assert client_of(key) == client_id
