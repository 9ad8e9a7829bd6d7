"""The SQLite log's stream index: written lagged and sorted, read with the short end.

Why: a ``UNIQUE (stream, version)`` index checked by SQLite on every insert dirties one
index leaf per stream in every commit — with 100 producers on 100 streams, most of the
pages a group commit writes (1.8 ms of a batch's commit here, against 0.8 ms without the
index). Versions need no such check: the single writer (the lock file admits one)
assigns them and checks ``expected_version`` in memory.

The guarantee kept: a read by stream returns exactly that stream's events, in order, at
any moment. The mechanism:

- ``streams_index (stream, version, position)``, a ``WITHOUT ROWID`` table keyed by
  ``(stream, version)``, holds every event up to the mark ``indexed_upto`` (in
  ``xcore_meta``);
- the writer keeps the events after the mark in memory and, every ``index_every``
  events, writes them sorted (``flush_statements``: read back from the log's last
  pages and sorted by SQLite) — in the transaction of the batch that crosses the bound,
  so the index and the mark never disagree with the log — and moves the mark. Sorted
  rows of one stream share a leaf: each leaf is written once per flush, not per batch;
- a read by stream asks the index up to the mark and scans the short unindexed end
  (fewer than ``index_every`` plus one batch of rows) in the same statement, hence the
  same snapshot;
- at open, the writer reloads the unindexed end from the log.

``(stream, version)`` stays unique all the same: the writer never reuses a version, the
append-only trigger refuses an outside insert of a version already indexed, and a clean
close indexes the end, so a closed log is indexed whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterable
from itertools import chain
from typing import Any, Final

from kernel.store.sqlite_ids import IdRow, id_index_statements

__all__ = [
    "INDEXED_UPTO",
    "INDEX_EVERY",
    "MARK_SQL",
    "VERSIONS_CHUNK",
    "IndexRow",
    "flush_statements",
    "index_statements",
    "read_stream_sql",
    "stream_version_sql",
    "stream_versions_sql",
    "true_mark",
    "unindexed_sql",
]

#: Events kept out of the index before they are written to it.
INDEX_EVERY: Final = 1024
#: Rows per multi-row INSERT (3 parameters each: far under SQLite's parameter limit).
_CHUNK: Final = 500
#: The ``xcore_meta`` key of the mark.
INDEXED_UPTO: Final = "indexed_upto"
_MARK = f"(SELECT CAST(value AS INTEGER) FROM xcore_meta WHERE key = '{INDEXED_UPTO}')"
#: The mark, as an SQL expression (NULL in a log that has none).
MARK_SQL: Final = _MARK

#: Index row: (stream, version, position).
IndexRow = tuple[str, int, int]


def index_statements(
    rows: Iterable[IndexRow], upto: int, ids: Iterable[IdRow] = ()
) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements writing ``rows`` to the stream index and ``ids`` to the id index
    (``sqlite_ids.py``: both share the mark), sorted, and moving the mark to ``upto``."""
    ordered = sorted(rows)
    statements = id_index_statements(ids)
    for i in range(0, len(ordered), _CHUNK):
        chunk = ordered[i : i + _CHUNK]
        # OR IGNORE: a row an outside writer slipped into the log with a version already
        # used must not wedge every later append (``xcore replay verify`` reports it)
        sql = "INSERT OR IGNORE INTO streams_index (stream, version, position) VALUES " + ",".join(
            ["(?, ?, ?)"] * len(chunk)
        )
        statements.append((sql, tuple(chain.from_iterable(chunk))))
    statements.append(
        (
            "INSERT INTO xcore_meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (INDEXED_UPTO, str(upto)),
        )
    )
    return statements


def flush_statements(mark: int, upto: int) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements writing every event after ``mark``, up to ``upto``, to the stream
    and id indexes, and moving the mark to ``upto`` — run in the transaction that wrote
    those events (they are read back from the log: its last pages, in cache; SQLite
    sorts the stream rows itself, no Python sort and no value bound per row).

    ``mark`` is the writer's own, not the one stored: another program may have moved
    that one (``xcore_meta`` has no trigger), and the flush puts it back."""
    after = "position > ? AND position <= ?"
    return [
        (
            "INSERT OR IGNORE INTO streams_index (stream, version, position)"
            f" SELECT stream, version, position FROM events WHERE {after}"
            " ORDER BY stream, version",
            (mark, upto),
        ),
        (
            # in position order: of an id stored twice (by an outside writer), the
            # first position is the one indexed (see sqlite_ids.py)
            "INSERT OR IGNORE INTO ids_index (id, position)"
            f" SELECT id, position FROM events WHERE {after} ORDER BY position",
            (mark, upto),
        ),
        (
            "INSERT INTO xcore_meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (INDEXED_UPTO, str(upto)),
        ),
    ]


def read_stream_sql(
    columns: str, *, after: int, stream: str, types: Collection[str] | None, limit: int | None
) -> tuple[str, list[Any]]:
    """One statement reading ``stream`` after ``after``: the index, then the unindexed end."""
    type_clause = ""
    type_params: list[Any] = []
    if types is not None:
        type_clause = f" AND type IN ({','.join('?' * len(types))})"
        type_params = list(types)
    sql = (
        f"SELECT {columns} FROM events WHERE position IN "
        "(SELECT position FROM streams_index WHERE stream = ? AND position > ?)"
        # the event's own stream checked too: a row another program slipped into the
        # index must not put another stream's event in this one's read
        f" AND stream = ?{type_clause}"
        f" UNION ALL SELECT {columns} FROM events"
        f" WHERE position > MAX(?, COALESCE({_MARK}, 0)) AND stream = ?{type_clause}"
        " ORDER BY position"
    )
    params: list[Any] = [stream, after, stream, *type_params, after, stream, *type_params]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def stream_version_sql(stream: str) -> tuple[str, list[Any]]:
    """The statement finding a stream's last version (0 when it has none)."""
    sql = (
        "SELECT MAX(COALESCE((SELECT MAX(version) FROM streams_index WHERE stream = ?), 0),"
        f" COALESCE((SELECT MAX(version) FROM events WHERE position > COALESCE({_MARK}, 0)"
        " AND stream = ?), 0))"
    )
    return sql, [stream, stream]


def stream_versions_sql(streams: list[str], *, indexed: bool = True) -> tuple[str, list[Any]]:
    """One statement finding the last version of each of ``streams``: rows of (stream,
    version), none for a stream without events. ``indexed=False``: a format-1 log (no
    stream index). At most ``_CHUNK`` streams (the caller splits longer lists)."""
    marks = ",".join("?" * len(streams))
    if not indexed:
        sql = f"SELECT stream, MAX(version) FROM events WHERE stream IN ({marks}) GROUP BY stream"
        return sql, list(streams)
    sql = (
        "SELECT s, MAX(v) FROM ("
        f"SELECT stream AS s, MAX(version) AS v FROM streams_index WHERE stream IN ({marks})"
        " GROUP BY stream UNION ALL SELECT stream, MAX(version) FROM events"
        f" WHERE position > COALESCE({_MARK}, 0) AND stream IN ({marks}) GROUP BY stream"
        ") GROUP BY s"
    )
    return sql, [*streams, *streams]


#: Streams per :func:`stream_versions_sql` statement.
VERSIONS_CHUNK: Final = _CHUNK


def unindexed_sql() -> str:
    """The statement listing the events after the mark: rows of (stream, version,
    position, id), an index row and the event's id."""
    return (
        "SELECT stream, version, position, id FROM events"
        f" WHERE position > COALESCE({_MARK}, 0) ORDER BY position"
    )


#: The event at the greatest position at or below ``?`` when it is in either index at
#: that position (its stream row or its id row); no row when it is not, or is none.
_INDEXED_AT = (
    "SELECT e.position FROM (SELECT position, stream, version, id FROM events"
    " WHERE position <= ? ORDER BY position DESC LIMIT 1) AS e"
    " WHERE EXISTS (SELECT 1 FROM streams_index AS s WHERE s.stream = e.stream"
    " AND s.version = e.version AND s.position = e.position)"
    " OR EXISTS (SELECT 1 FROM ids_index AS i WHERE i.id = e.id AND i.position = e.position)"
)
#: The same for the event at the least position above ``?``.
_INDEXED_AFTER = _INDEXED_AT.replace(
    "position <= ? ORDER BY position DESC", "position > ? ORDER BY position"
)


def true_mark(conn: sqlite3.Connection) -> tuple[int, int | None]:
    """The stored mark, and the true one when they differ (None when they agree).

    A flush moves the mark in the transaction that indexes the events up to it, so in
    a log only xcore wrote, the event at the mark is indexed and the one after it is
    not. A mark an outside writer moved (``xcore_meta`` has no trigger) breaks one of
    the two: raised, the events between the true mark and it would never be indexed
    nor read by stream; lowered, reads by stream would return the indexed events after
    it twice. Two probes tell; when one fails, the true mark (the indexed events are a
    prefix of the log) is found by bisection, a probe per step."""
    row = conn.execute(
        f"SELECT COALESCE({_MARK}, 0), (SELECT MAX(position) FROM events)"
    ).fetchone()
    stored, last = int(row[0]), int(row[1] or 0)

    def indexed(at: int) -> bool:
        return conn.execute(_INDEXED_AT, (at,)).fetchone() is not None

    if (
        stored <= last
        and (stored == 0 or indexed(stored))
        and conn.execute(_INDEXED_AFTER, (stored,)).fetchone() is None
    ):
        return stored, None
    low, high = 0, last  # indexed(low) holds (or low is 0); nothing above high is indexed
    while low < high:
        middle = (low + high + 1) // 2
        if indexed(middle):
            low = middle
        else:
            high = middle - 1
    return stored, low
