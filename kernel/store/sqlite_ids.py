"""The SQLite log's id index: written lagged, the short end held in memory.

Why: a ``UNIQUE`` index on ``events (id)`` checked by SQLite on every insert makes every
commit write two B-tree leaves to the write-ahead log — the table's and the id index's
— where one would do: a one-event durable commit in a raw ``sqlite3`` loop does about
7,900 commits/s with the index and 9,600/s without (+21%), and 100-row commits spend
about a fifth of their CPU maintaining it. The single writer needs no such check on the
hot path: it assigns every row and checks explicit ids (the idempotency keys) itself.

The guarantee kept: an event id is in the log at most once, and an append that gives an
id already in the log (``explicit_id``) stores nothing new and returns the stored event
— whether that id is still in the unindexed end, in the index, or was written before a
restart. The mechanism (the stream index's, ``sqlite_streams.py``, with the same mark):

- ``ids_index (id PRIMARY KEY, position) WITHOUT ROWID`` holds the id of every event up
  to the mark ``indexed_upto``;
- the writer holds the ids after the mark in a dict (id to position) and writes them to
  the index (nearly in order already: fresh ids begin with the time) in the
  transaction of the batch that moves the mark (every ``index_every`` events, with the
  stream index), so index, mark and log never disagree;
- an explicit id is looked up in that dict, then in the index (one probe per id);
- an id that is not explicit is refused when it is in that dict or in the index; the
  index is probed only for an id that might be in it: the writer knows the greatest id
  of 32 characters in the index (the bound, kept in ``xcore_meta`` at each flush), and
  a fresh id (``new_id``: 32 hex digits, the time first) sorts after it — no probe. An
  id of another length, or one at or below the bound (a clock set back, an id given by
  the caller), is probed: one read of the index, in the batch's transaction;
- at open, the writer reloads the unindexed end from the log; a clean close indexes it.

The writer never stores an explicit id twice (it looks it up first) and ids it draws
itself are fresh (UUIDv7: a millisecond time and 74 random bits). Every other
connection goes through the append-only trigger, which refuses an insert of an id that
is in the index. What no check covers is an outside insert of an id that is only in the
unindexed end (at most ``index_every`` events plus one batch): the flush then keeps the
first position of that id (``INSERT OR IGNORE``, the dict keeping the first), lookups
find that one, and ``xcore replay verify`` reports the duplicate by position.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from itertools import chain
from typing import Any, Final

__all__ = [
    "BOUND_KEY",
    "FRESH_LENGTH",
    "IdRow",
    "bound_sql",
    "bound_statement",
    "ceiling",
    "id_index_statements",
    "indexed_ids_sql",
    "lookup_sql",
    "positions_sql",
    "raise_bound",
]

#: Rows per multi-row INSERT (2 parameters each).
_CHUNK: Final = 500
#: Index row: (id, position).
IdRow = tuple[str, int]
#: The length of the ids ``new_id`` draws (32 hex digits, time first).
FRESH_LENGTH: Final = 32
#: The ``xcore_meta`` key of the bound: no id of ``FRESH_LENGTH`` characters in the
#: index sorts after it (a hint: the open reads the index above it, see ``bound_sql``).
BOUND_KEY: Final = "ids_bound"


#: How far ahead of the clock at open the ceiling is (milliseconds; see ``ceiling``).
CEILING_AHEAD_MS: Final = 366 * 24 * 3600 * 1000


def ceiling(now_ns: int) -> str:
    """The ceiling of fresh ids for a writer opened at ``now_ns`` (``time.time_ns()``):
    the id ``new_id`` would draw a year later with no random bits.

    Why: an id of 32 characters that sorts above every fresh id (a caller's
    ``uuid4().hex`` beginning with 1 to f, ``"z" * 32``) would raise the bound above
    every fresh id to come, and every later append would probe the index. Ids at or
    above the ceiling never raise the bound and are never taken for fresh (always
    probed); ids between the bound and the ceiling are fresh. Fixed for the writer's
    life, so an id stored above it stays above it (a writer running a year without a
    restart probes its ids from then on: correct, a little slower)."""
    top = (now_ns // 1_000_000 + CEILING_AHEAD_MS) & 0xFFFF_FFFF_FFFF
    return (top << 80).to_bytes(16, "big").hex()


def raise_bound(bound: str, ids: Collection[str], ceiling: str) -> str:
    """``bound`` raised to the greatest of ``ids`` of ``FRESH_LENGTH`` characters below
    ``ceiling``."""
    if not ids:
        return bound
    top = max(ids)  # in C; the common case: a fresh id is the greatest
    if len(top) == FRESH_LENGTH and top < ceiling:
        return max(top, bound)
    for i in ids:
        if len(i) == FRESH_LENGTH and bound < i < ceiling:
            bound = i
    return bound


def bound_sql() -> str:
    """The statement finding the bound below the ceiling (bound as its one parameter):
    the greatest indexed id of ``FRESH_LENGTH`` characters under it, read above the
    stored hint only (a seek, then the few ids above it; from the ceiling down once for
    a log whose hint is missing or not under it: upgraded, copied, imported, or written
    before the ceiling)."""
    stored = f"(SELECT value FROM xcore_meta WHERE key = '{BOUND_KEY}')"
    hint = f"(CASE WHEN {stored} < ?1 THEN {stored} ELSE '' END)"
    return (
        "SELECT COALESCE((SELECT MAX(id) FROM ids_index"
        f" WHERE length(id) = {FRESH_LENGTH} AND id > {hint} AND id < ?1), {hint})"
    )


def bound_statement(bound: str) -> tuple[str, tuple[Any, ...]]:
    """The statement storing the bound (in a flush's transaction)."""
    return (
        "INSERT INTO xcore_meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (BOUND_KEY, bound),
    )


def id_index_statements(rows: Iterable[IdRow]) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements writing ``rows`` to the id index (the mark is moved by
    :func:`~kernel.store.sqlite_streams.index_statements`, in the same transaction).

    Not sorted, unlike the stream index's rows: fresh ids begin with the time, so they
    arrive nearly in order, and a leaf is written once per transaction whatever the
    order of the inserts; sorting cost ~700 instructions per event (string compares)."""
    ordered = list(rows)
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for i in range(0, len(ordered), _CHUNK):
        chunk = ordered[i : i + _CHUNK]
        # OR IGNORE: an id an outside writer slipped into the unindexed end twice must
        # not wedge every later append; the first position wins (see the docstring)
        sql = "INSERT OR IGNORE INTO ids_index (id, position) VALUES " + ",".join(
            ["(?, ?)"] * len(chunk)
        )
        statements.append((sql, tuple(chain.from_iterable(chunk))))
    return statements


def indexed_ids_sql(count: int) -> str:
    """The statement finding which of ``count`` ids are in the index: rows of (id,
    position)."""
    sql = _LOOKUPS.get(count)
    if sql is None:
        sql = f"SELECT id, position FROM ids_index WHERE id IN ({','.join('?' * count)})"
        if count <= _CHUNK:
            _LOOKUPS[count] = sql
    return sql


_LOOKUPS: dict[int, str] = {}


def positions_sql(count: int) -> str:
    """The statement finding which of ``count`` ids are in the index, with the event each
    names checked to have that id: rows of (id, position). For an explicit id, whose
    stored event the append returns: a row another program slipped into the index must
    not make an append return another event and store nothing."""
    return (
        "SELECT i.id, i.position FROM ids_index AS i JOIN events AS e"
        f" ON e.position = i.position WHERE i.id IN ({','.join('?' * count)}) AND e.id = i.id"
    )


def lookup_sql(columns: str, count: int, mark: str) -> str:
    """One statement reading the events of ``count`` ids (bound three times:
    ``[*ids, *ids, *ids]``) from the index and from the unindexed end after ``mark`` (an
    SQL expression), in position order: for readers that do not hold the writer's dict
    (replay). An index row is taken only when the event it names has that id (a row
    another program slipped into the index must not answer for another event)."""
    marks = ",".join("?" * count)
    return (
        f"SELECT {columns} FROM events WHERE position IN "
        f"(SELECT position FROM ids_index WHERE id IN ({marks})) AND id IN ({marks})"
        f" UNION SELECT {columns} FROM events WHERE position > COALESCE({mark}, 0)"
        f" AND id IN ({marks}) ORDER BY position"
    )
