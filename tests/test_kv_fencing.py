"""Compare-and-set writes of leader state (issue 16), on a real nats-server: KvStore's
update_many and the FencedKv that remembers revisions. A write whose answer is lost (the
server stored it) is no conflict when tried again; another writer's write is."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import nats.errors
import pytest
from nats.js.kv import KeyValue

from bus.fenced_kv import Fenced, FencedKv
from bus.jetstream import KvError, KvStore, WrongRevision, bucket_name, ensure_bucket
from bus.runtime import Bus
from schemas.codec import encode
from schemas.stored import VersionCounter


class Faulty(KeyValue):
    """The bucket as the server keeps it, with a fault around each write: `write` gets
    the key and the write itself, to make (or not) when and as it likes."""

    def __init__(self, kv: KeyValue) -> None:
        self.__dict__.update(vars(kv))

    async def _update(
        self,
        key: str,
        value: bytes,
        last: int | None = None,
        validate_keys: bool = True,
        msg_ttl: float | None = None,
    ) -> int:
        return await self.write(
            key, lambda: KeyValue._update(self, key, value, last, validate_keys, msg_ttl)
        )

    async def write(self, key: str, make: Callable[[], Awaitable[int]]) -> int:
        return await make()


class LosesAnswers(Faulty):
    """The answer to the first write of each key in `keys` is lost on its way back (as
    when the connection drops right after the server stored the write): the write is
    made, the writer hears nothing."""

    def __init__(self, kv: KeyValue, *keys: str) -> None:
        super().__init__(kv)
        self.to_lose = set(keys)
        self.attempts: list[str] = []

    async def write(self, key: str, make: Callable[[], Awaitable[int]]) -> int:
        self.attempts.append(key)
        revision = await make()
        if key in self.to_lose:
            self.to_lose.discard(key)
            raise nats.errors.TimeoutError
        return revision


class Overtaken(LosesAnswers):
    """After a lost answer, another writer writes the key before the retry."""

    async def write(self, key: str, make: Callable[[], Awaitable[int]]) -> int:
        try:
            return await super().write(key, make)
        except nats.errors.TimeoutError:
            await self.put(key, encode(counter(7)))
            raise


class Held(Faulty):
    """The next write after `hold()` waits until `release` (run on the bus loop) lets it
    through: a write still on its way while other things happen."""

    def __init__(self, kv: KeyValue) -> None:
        super().__init__(kv)
        self.gate = asyncio.Event()
        self.waiting = threading.Event()  # the held write has come
        self._armed = False

    def hold(self) -> None:
        self.gate.clear()
        self.waiting.clear()
        self._armed = True

    async def release(self) -> None:
        self.gate.set()

    async def write(self, key: str, make: Callable[[], Awaitable[int]]) -> int:
        if self._armed:
            self._armed = False
            self.waiting.set()
            await self.gate.wait()
        return await make()


def update(kv: KvStore, key: str, value: VersionCounter | None, last: int) -> int:
    """One compare-and-set write: its new revision."""
    return kv.update_many({key: (value, last)})[key]


def counter(n: int) -> VersionCounter:
    return VersionCounter(config_type="Route", last_version=n)


@pytest.fixture
def name(bus: Bus, prefix: str) -> str:
    name = bucket_name(prefix, "cas")
    bus.run(ensure_bucket(bus, name, 1))
    return name


def store(bus: Bus, name: str, *, patience_s: float = 12.0) -> KvStore:
    return KvStore(bus, bus.run(bus.js.key_value(name)), name, patience_s=patience_s)


def losing(
    bus: Bus,
    name: str,
    *keys: str,
    kind: type[LosesAnswers] = LosesAnswers,
    patience_s: float = 12.0,
) -> KvStore:
    """A store of the bucket whose first write of each of `keys` loses its answer; with
    no patience, that write ends in KvError (no answer, not tried again)."""
    kv = kind(bus.run(bus.js.key_value(name)), *keys)
    return KvStore(bus, kv, name, patience_s=patience_s)


def test_a_write_at_the_revision_last_known_goes_through_one_behind_it_is_refused(
    bus: Bus, name: str
) -> None:
    kv = store(bus, name)
    first = update(kv, "a", counter(1), 0)
    with pytest.raises(WrongRevision, match="key a is not at the revision"):
        update(kv, "a", counter(9), 0)  # a create: it exists
    second = update(kv, "a", counter(2), first)
    assert second > first
    with pytest.raises(WrongRevision):
        update(kv, "a", counter(9), first)  # behind
    with pytest.raises(WrongRevision):  # b is refused; c is written all the same
        kv.update_many({"b": (counter(9), second), "c": (counter(3), 0)})
    assert kv.get("a", VersionCounter) == counter(2)
    assert kv.get("b", VersionCounter) is None
    assert kv.get("c", VersionCounter) == counter(3)
    _, at = kv.get_at("c")
    with pytest.raises(WrongRevision):
        update(kv, "c", None, second)  # a delete behind
    assert update(kv, "c", None, at) == 0  # deleted at its revision
    assert kv.get_at("c")[0] is None
    assert update(kv, "c", counter(4), 0) > at  # created again over its delete marker


def test_a_write_whose_answer_was_lost_is_its_own_when_tried_again(bus: Bus, name: str) -> None:
    """a's first attempt is stored but its answer lost: the retry, at the same revision,
    is refused by the server, finds its own value there, and returns its revision."""
    kv = store(bus, name)
    at = update(kv, "a", counter(1), 0)
    lossy = losing(bus, name, "a")
    revisions = lossy.update_many({"a": (counter(2), at), "b": (counter(5), 0)})
    assert isinstance(lossy._kv, LosesAnswers)
    assert sorted(lossy._kv.attempts) == ["a", "a", "b"]  # b once: it was answered
    assert kv.get_at("a") == (encode(counter(2)), revisions["a"])
    assert kv.get("b", VersionCounter) == counter(5)
    assert update(kv, "a", counter(3), revisions["a"]) > revisions["a"]


def test_a_write_whose_answer_was_lost_and_another_writer_wrote_since_is_refused(
    bus: Bus, name: str
) -> None:
    kv = store(bus, name)
    at = update(kv, "a", counter(1), 0)
    lossy = losing(bus, name, "a", kind=Overtaken)
    with pytest.raises(WrongRevision):
        update(lossy, "a", counter(2), at)
    assert kv.get("a", VersionCounter) == counter(7)


def test_fenced_kv_is_refused_once_another_writer_wrote_a_key_since_it_read_it(
    bus: Bus, name: str
) -> None:
    newer, stale = FencedKv(store(bus, name)), FencedKv(store(bus, name))
    stale.put("a", counter(1))
    stale.put("a", counter(2))
    assert newer.read_all() == {"a": encode(counter(2))}
    newer.put("a", counter(3))
    newer.put("b", counter(1))
    with pytest.raises(Fenced, match="key a was written by another replica since"):
        stale.put("a", counter(4))
    with pytest.raises(Fenced, match="key b was written"):
        stale.put("b", counter(4))  # it knows no b: it creates it, and b exists
    assert newer.kv.get("a", VersionCounter) == counter(3)
    assert newer.kv.get("b", VersionCounter) == counter(1)
    newer.purge(["a"])
    newer.put("a", counter(5))  # created again


def test_fenced_kv_after_a_write_of_unknown_outcome_goes_on_from_where_it_left_the_key(
    bus: Bus, name: str
) -> None:
    """A write that ends in KvError may or may not have been made: the next write of its
    key goes on from its value if it was made, from the revision before if it was not,
    and is fenced if another writer wrote the key meanwhile."""
    made = FencedKv(losing(bus, name, "a", patience_s=0))
    with pytest.raises(KvError):
        made.put("a", counter(1))  # made, its answer lost: the store gives up
    made.put("a", counter(2))
    assert made.kv.get("a", VersionCounter) == counter(2)

    too_big = VersionCounter(config_type="x" * 2_000_000, last_version=1)
    with pytest.raises(KvError, match="over the server's max payload"):
        made.put("a", too_big)  # not made
    made.put("a", counter(3))
    assert made.kv.get("a", VersionCounter) == counter(3)

    overtaken = FencedKv(losing(bus, name, "c", kind=Overtaken, patience_s=0))
    with pytest.raises(KvError):
        overtaken.put("c", counter(1))  # made, then another writer wrote c
    with pytest.raises(Fenced):
        overtaken.put("c", counter(2))
    assert made.kv.get("c", VersionCounter) == counter(7)


def test_a_write_of_an_earlier_tenure_landing_late_teaches_the_next_tenure_nothing(
    bus: Bus, name: str
) -> None:
    """A write begun before the store is read whole again (this replica leads again)
    lands after that read: the new tenure did not read what it wrote, so its own next
    write of the key is fenced, not made over it. A writer that names its tenure is
    refused, unwritten, once another has begun."""
    held = Held(bus.run(bus.js.key_value(name)))
    fenced = FencedKv(KvStore(bus, held, name))
    fenced.put("a", counter(1))
    first = fenced.tenure
    held.hold()
    late = threading.Thread(target=fenced.put, args=("a", counter(2)))
    late.start()
    assert held.waiting.wait(5)

    assert fenced.read_all() == {"a": encode(counter(1))}
    bus.run(held.release())
    late.join(10)
    assert fenced.kv.get("a", VersionCounter) == counter(2)  # it landed
    with pytest.raises(Fenced, match="key a was written by another replica since"):
        fenced.put("a", counter(3))

    fenced.read_all()
    with pytest.raises(Fenced, match="key b was written by this replica's next tenure"):
        fenced.put_many({"b": counter(1)}, tenure=first)
    assert fenced.kv.get("b", VersionCounter) is None
    fenced.put_many({"b": counter(1)}, tenure=fenced.tenure)
    assert fenced.kv.get("b", VersionCounter) == counter(1)


def test_a_read_of_every_entry_has_every_key_each_time_and_no_deleted_one(
    bus: Bus, name: str
) -> None:
    """Read at once after the writes, over and over: nats-py's "initial values done"
    marker can come before the values, and a read that trusted it alone came back empty
    (a store migrated from nothing at start, then fenced by its own keys)."""
    kv = store(bus, name)
    for n in range(30):
        kv.put(f"key-{n}", counter(n))
    kv.update_many({"key-0": (None, kv.get_at("key-0")[1])})  # deleted: a marker stays
    expected = {f"key-{n}" for n in range(1, 30)}
    for _ in range(200):
        assert set(kv.entries_at()) == expected
