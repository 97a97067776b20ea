"""Coalescer: items handed from the bus loop to one actor with at most one wake-up in flight."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Items handed from the bus loop to one actor, with at most one wake-up in flight.

    The loop `put`s each item and tells the actor only when `put` returns True, that is
    when no wake-up is pending; the actor, when that message reaches it, `take`s all the
    items put so far. So a burst costs one `tell` (one thread wake-up) instead of one per
    item, and the loop never waits for the actor: no lock, a deque and a flag.

    Why nothing is lost: `take` clears the flag *before* it empties the deque, and `put`
    appends *before* it reads the flag. An item put after the flag was cleared sends a new
    wake-up; one put before is in the deque that `take` empties. (The worst race costs an
    extra wake-up that finds nothing.) One thread puts, one thread takes.
    """

    __slots__ = ("_armed", "_items")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._armed = False

    def put(self, item: T) -> bool:
        """Loop side: True when the caller must wake the actor."""
        self._items.append(item)
        if self._armed:
            return False
        self._armed = True
        return True

    def take(self) -> list[T]:
        """Actor side: every item put so far, in the order put."""
        self._armed = False
        items: list[T] = []
        pop = self._items.popleft
        try:
            while True:
                items.append(pop())
        except IndexError:  # empty (the loop side may also have dropped the oldest)
            return items

    def drop_oldest(self) -> bool:
        """Loop side, under overload: the oldest item goes. False when the actor took them
        all first (between the caller's length check and this call): nothing was dropped."""
        try:
            self._items.popleft()
        except IndexError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._items)
