"""The loader's line of waiting requests, in memory: places, merges and pages in O(1).

Guarantee: the line holds exactly the loader requests of this node recorded after the
loader's start and not yet taken in hand, in log order; a request's place in it
(1 = next), the first reload of a plugin waiting in it (the one a new reload joins),
its length and a page of it after a given request are found without reading the log
and without walking the line.

Mechanism: the line is fed in log order by one subscription of the queue
(``services/loader/queue.py``, started where the loader's own starts, so it is rebuilt
from the log at each boot) and cut at its head when the loader takes a request in hand
(the loader handles them in log order, so nothing leaves from the middle). Each request
gets a sequence number when it joins; its place is its number minus the head's, plus
one. The entries are a list whose taken head is dropped in one slice once it is most of
the list, so every operation is amortised O(1) (a page: O(log n + limit)).
"""

from __future__ import annotations

import bisect
import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernel.events import Recorded

__all__ = ["Line"]

#: Taken entries kept before the list is compacted (and at least half of it).
COMPACT_AT = 1024


class Line:
    """The requests waiting for the loader, oldest first (see the module docstring)."""

    def __init__(self, taken: int = 0) -> None:
        #: The log position of the last request taken in hand (or left by an earlier run):
        #: a request at or before it never joins the line.
        self.taken = taken
        #: The highest position seen (joined or not): the line is complete up to it.
        self.seen = taken
        self._items: list[Recorded] = []
        self._head = 0  # index in _items of the first waiting request
        self._base = 0  # sequence number of _items[0]
        self._seq: dict[int, int] = {}  # position -> sequence number
        self._reloads: dict[str, collections.deque[Recorded]] = {}

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __contains__(self, position: int) -> bool:
        return position in self._seq

    def join(self, record: Recorded, reload_of: str | None = None) -> bool:
        """``record`` was recorded (in log order): it waits in line unless already taken.

        ``reload_of``: the plugin it reloads, when a later reload may join it.
        """
        position = record.position
        if position <= self.seen:
            return False  # delivered twice, or taken before it was seen
        self.seen = position
        if position <= self.taken:
            return False
        self._seq[position] = self._base + len(self._items)
        self._items.append(record)
        if reload_of is not None:
            self._reloads.setdefault(reload_of, collections.deque()).append(record)
        else:
            name = record.data.get("name")
            if isinstance(name, str):
                # another request of that plugin (an uninstall, a disable): a reload asked
                # after it must run after it, so none queued before it may be joined
                self._reloads.pop(name, None)
        return True

    def see(self, position: int) -> None:
        """Records up to ``position`` were seen (none of them joins the line)."""
        self.seen = max(self.seen, position)

    def take(self, position: int) -> None:
        """The loader takes the request at ``position`` in hand (and is past all before)."""
        self.taken = max(self.taken, position)
        items = self._items
        while self._head < len(items) and items[self._head].position <= position:
            record = items[self._head]
            self._head += 1
            del self._seq[record.position]
            name = record.data.get("name")
            queued = self._reloads.get(name) if isinstance(name, str) else None
            if queued and queued[0] is record:
                queued.popleft()
                if not queued:
                    del self._reloads[name]  # type: ignore[arg-type]
        if self._head >= COMPACT_AT and self._head * 2 >= len(items):
            del items[: self._head]
            self._base += self._head
            self._head = 0

    def place(self, position: int) -> int | None:
        """1 for the next request to be taken, n for the n-th; None: not in line."""
        seq = self._seq.get(position)
        return None if seq is None else seq - self._base - self._head + 1

    def reload_of(self, name: str) -> Recorded | None:
        """The first reload of plugin ``name`` waiting in line behind its other requests."""
        queued = self._reloads.get(name)
        return queued[0] if queued else None

    def page(self, after: int, limit: int) -> list[tuple[int, Recorded]]:
        """Up to ``limit`` requests recorded after position ``after``, with their places."""
        items = self._items
        start = bisect.bisect_right(items, after, lo=self._head, key=lambda r: r.position)
        return [
            (i - self._head + 1, items[i]) for i in range(start, min(len(items), start + limit))
        ]

    def waiting(self) -> list[Recorded]:
        """The whole line, oldest first."""
        return self._items[self._head :]
