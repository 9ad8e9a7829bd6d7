"""``xcore store copy SRC DST``: move an event log between SQLite and PostgreSQL.

    xcore store copy var/events.db postgresql://xcore@db/xcore     # to a cluster
    xcore store copy postgresql://xcore@db/xcore backup.db        # and back

Guarantee: DST ends up holding exactly SRC's events — same positions, streams,
versions, ids, payloads and timestamps — checked by a digest over every row of both
logs, or the command says where they differ and exits non-zero. It is resumable: a copy
that stopped half-way (Ctrl-C, a lost connection) is continued by running it again,
after checking that what DST holds is the start of SRC. DST must be empty or such a
prefix; a DST holding another log is refused, nothing written. A SRC with a hole (an
event deleted by hand) is copied up to the hole, then refused by name and position.

Mechanism: rows are read in batches in position order and written raw (not appended:
appending would stamp new times), each batch in one transaction. On PostgreSQL the
batch takes the log's ordering lock, so a copy never interleaves with a writing node;
on SQLite the copy holds the log's lock file, so no kernel writes it meanwhile.
Checkpoints and snapshots are not copied: they belong to the nodes and projections,
which rebuild them from the log.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from kernel.errors import StoreError, XcoreError
from kernel.store.sqlite_streams import index_statements

__all__ = ["copy_log", "register"]

T = TypeVar("T")

ROW = "position, stream, version, type, schema, data, meta, id, recorded_at"
Row = tuple[Any, ...]


class Side(Protocol):
    location: str

    async def last(self) -> int: ...
    async def rows(self, after: int, limit: int) -> list[Row]: ...
    async def write(self, rows: Sequence[Row]) -> None: ...
    async def close(self) -> None: ...


def _norm(row: Row) -> Row:
    """One row in a form both backends agree on (bytes, ints, float)."""
    p, stream, version, type_, schema, data, meta, id_, at = row
    return (int(p), str(stream), int(version), str(type_), int(schema), bytes(data),
            bytes(meta), str(id_), float(at))  # fmt: skip


# -- SQLite ------------------------------------------------------------------------------


class SQLiteSide:
    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.location = str(path)
        self.writable = writable
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    @classmethod
    async def open(cls, path: Path, *, writable: bool) -> SQLiteSide:
        from kernel.store.sqlite import SQLiteStore

        side = cls(path, writable=writable)
        if writable:
            store = SQLiteStore(path)  # creates (or checks) the log's tables
            await store.open()
            await store.close()
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"{path} is open for writing by a running kernel") from None
            side._lock_fd = fd
            side._conn = sqlite3.connect(str(path), isolation_level="IMMEDIATE")
            side._conn.execute("PRAGMA synchronous=FULL")
        else:
            store = SQLiteStore(path, readonly=True)  # checks it exists and is an xcore log
            await store.open()
            await store.close()
            side._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        return side

    def _c(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def last(self) -> int:
        row = self._c().execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
        return int(row[0])

    async def rows(self, after: int, limit: int) -> list[Row]:
        sql = f"SELECT {ROW} FROM events WHERE position > ? ORDER BY position LIMIT ?"
        return [_norm(r) for r in self._c().execute(sql, (after, limit)).fetchall()]

    async def write(self, rows: Sequence[Row]) -> None:
        conn = self._c()
        marks = ",".join("?" * 9)
        try:
            conn.executemany(f"INSERT INTO events ({ROW}) VALUES ({marks})", rows)
            if rows:
                # the batch indexed in its own transaction (the log's lagged stream and id
                # indexes, sqlite_streams.py): the next kernel to open the copy has no
                # long unindexed end to reload, and a later batch repeating an id or a
                # stream version is refused by the insert guard
                for sql, params in index_statements(
                    [(r[1], r[2], r[0]) for r in rows], rows[-1][0], [(r[7], r[0]) for r in rows]
                ):
                    conn.execute(sql, params)
            conn.commit()
        except sqlite3.Error as exc:
            conn.rollback()
            raise StoreError(
                f"{self.path}: copy failed, this batch was not written: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# -- PostgreSQL ------------------------------------------------------------------------------


class PostgresSide:
    def __init__(self, store: Any, conn: Any) -> None:
        self.store = store
        self.conn = conn
        self.location = store.location

    @classmethod
    async def open(cls, dsn: str) -> PostgresSide:
        from kernel.store.postgres import PostgresStore

        store = PostgresStore(dsn)
        await store.open()  # creates or checks the schema; learns the ordering lock
        await store.close()
        return cls(store, await store.connect())

    async def _guard(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op``, its driver's failure told as a clear error naming the log and ``what``
        (a traceback of asyncpg's before)."""
        import asyncpg

        from kernel.store.postgres_writer import CONNECTION_ERRORS

        try:
            return await op()
        except StoreError:
            raise
        except CONNECTION_ERRORS as exc:
            reason = (
                f"no answer within {self.store.command_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            raise StoreError(
                f"{self.location}: {what} failed, the connection was lost ({reason}); "
                "what was copied before is kept: run the copy again to resume"
            ) from None
        except (asyncpg.PostgresError, asyncpg.DataError, ValueError, UnicodeError) as exc:
            raise StoreError(
                f"{self.location}: {what}: PostgreSQL refused it ({type(exc).__name__}: "
                f"{exc}); nothing of it was written"
            ) from None

    async def last(self) -> int:
        async def op() -> int:
            return int(await self.conn.fetchval("SELECT COALESCE(MAX(position), 0) FROM events"))

        return await self._guard("reading the last position", op)

    async def rows(self, after: int, limit: int) -> list[Row]:
        async def op() -> list[Row]:
            records = await self.conn.fetch(
                f"SELECT {ROW} FROM events WHERE position > $1 ORDER BY position LIMIT $2",
                after,
                limit,
            )
            return [_norm(tuple(r)) for r in records]

        return await self._guard(f"reading events after {after}", op)

    async def write(self, rows: Sequence[Row]) -> None:
        async def op() -> None:
            await self._write(rows)

        try:
            await self._guard(f"writing events {rows[0][0]} to {rows[-1][0]}", op)
        except StoreError as exc:
            if "refused" not in str(exc) or len(rows) == 1:
                raise
            culprit = await self._culprit(rows)
            if culprit is None:
                raise
            raise StoreError(
                f"{exc} (the event PostgreSQL refuses is {culprit[0]}, stream "
                f"{culprit[1]!r}, type {culprit[3]!r})"
            ) from None

    async def _culprit(self, rows: Sequence[Row]) -> Row | None:
        """The first of ``rows`` the server refuses: they are inserted one after the
        other (each continues the log) in a transaction that is rolled back, so nothing
        is written."""
        import asyncpg

        from kernel.store.postgres_writer import INSERT

        tx = self.conn.transaction()
        await tx.start()
        try:
            for row in rows:
                try:
                    await self.conn.execute(INSERT, *[[v] for v in row])
                except (asyncpg.PostgresError, asyncpg.DataError, ValueError, UnicodeError):
                    return row
        finally:
            await tx.rollback()
        return None

    async def _write(self, rows: Sequence[Row]) -> None:
        from kernel.store.postgres_writer import INSERT

        cols = [list(c) for c in zip(*rows, strict=True)]
        async with self.conn.transaction():
            await self.conn.execute("SELECT pg_advisory_xact_lock($1)", self.store.lock_key)
            last = await self.last()
            if last != rows[0][0] - 1:
                raise StoreError(
                    f"{self.location}: another writer appended meanwhile (the log is at "
                    f"{last}, the copy was at {rows[0][0] - 1}); stop the nodes and run again"
                )
            await self.conn.execute(INSERT, *cols)
            await self.conn.execute(
                "SELECT pg_notify($1, $2)", self.store.channel, str(rows[-1][0])
            )

    async def close(self) -> None:
        try:
            await self.conn.close(timeout=5)
        except Exception:  # closing a lost connection: nothing left to release
            self.conn.terminate()


async def open_side(spec: str, *, writable: bool) -> Side:
    if spec.startswith(("postgres://", "postgresql://")) or "dbname=" in spec:
        return await PostgresSide.open(spec)
    return await SQLiteSide.open(Path(spec), writable=writable)


# -- the copy --------------------------------------------------------------------------------


@dataclass
class Report:
    copied: int = 0
    already: int = 0
    total: int = 0
    verified: bool = False
    digest: str = ""
    problems: list[str] = field(default_factory=list)


class Progress:
    """A progress bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = max(total, 1)
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0

    def show(self, done: int, what: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        share = min(done / self.total, 1.0)
        if self.tty:
            bar = "#" * int(share * 30)
            self.out.write(f"\r{what:9} [{bar:<30}] {done}/{self.total} ({share:.0%})")
            if force:
                self.out.write("\n")
        else:
            self.out.write(f"{what}: {done}/{self.total} events ({share:.0%})\n")
        self.out.flush()


async def _digest(side: Side, upto: int, batch: int, progress: Progress | None) -> str:
    h = hashlib.sha256()
    after = 0
    while after < upto:
        rows = await side.rows(after, min(batch, upto - after))
        if not rows:
            break
        for r in rows:
            h.update(repr(r).encode())
        after = rows[-1][0]
        if progress is not None:
            progress.show(after, "verifying")
    return h.hexdigest()


async def copy_log(
    src_spec: str, dst_spec: str, *, batch: int = 5000, out: TextIO | None = None
) -> Report:
    out = out if out is not None else sys.stderr
    src = await open_side(src_spec, writable=False)
    try:
        dst = await open_side(dst_spec, writable=True)
    except BaseException:
        await src.close()
        raise
    report = Report()
    try:
        total = await src.last()
        report.total = total
        have = await dst.last()
        if have > total:
            raise XcoreError(
                f"{dst.location} holds {have} events, more than {src.location} ({total}): "
                "it is not a partial copy of it; give an empty destination"
            )
        if have:
            # resuming: what DST holds must be the start of SRC
            mine = await dst.rows(have - 1, 1)
            theirs = await src.rows(have - 1, 1)
            if mine != theirs:
                raise XcoreError(
                    f"{dst.location} holds a different log (event {have} differs from "
                    f"{src.location}'s); give an empty destination"
                )
            report.already = have
            out.write(f"resuming after position {have} (already copied)\n")
        progress = Progress(total, out)
        after = have
        while after < total:
            rows = await src.rows(after, batch)
            if not rows:
                break
            gap = next(
                (i for i, row in enumerate(rows) if row[0] != after + 1 + i), None
            )  # a damaged source (a row deleted by hand): never copy a log with a hole
            if gap is not None:
                if gap:
                    await dst.write(rows[:gap])
                    report.copied += gap
                    after += gap
                raise XcoreError(
                    f"{src.location} is damaged: event {after + 1} is missing (the log "
                    f"jumps from {after} to {rows[gap][0]}); {report.already + report.copied} "
                    f"events up to it were copied to {dst.location}, nothing after"
                )
            await dst.write(rows)
            report.copied += len(rows)
            after = rows[-1][0]
            progress.show(after, "copying")
        progress.show(after, "copying", force=True)
        # verify: the same rows, in the same order, on both sides
        a = await _digest(src, total, batch, Progress(total, out))
        b = await _digest(dst, total, batch, None)
        report.digest = a
        report.verified = a == b and await dst.last() == total
        if not report.verified:
            report.problems.append(
                f"the logs differ after the copy (digests {a[:12]} and {b[:12]})"
            )
    finally:
        await src.close()
        await dst.close()
    return report


# -- the command ------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("store", help="manage event logs (copy between backends)")
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    cp = sub.add_parser(
        "copy",
        help="copy a log: SQLite file <-> PostgreSQL DSN (resumable, verified)",
        description=(
            "Copy every event of SRC into DST (an SQLite file path or a postgresql:// DSN). "
            "Run it again to resume an interrupted copy. Stop the nodes writing DST first."
        ),
    )
    cp.add_argument("src", help="the log to read (a file path or a DSN)")
    cp.add_argument("dst", help="the log to write (empty, or a partial copy of SRC)")
    cp.add_argument("--batch", type=int, default=5000, help="events per transaction")
    cp.set_defaults(func=cmd_copy)


def cmd_copy(args: argparse.Namespace) -> int:
    from kernel.store.postgres import redact_dsn

    if args.batch < 1:
        raise XcoreError("--batch must be at least 1")
    report = asyncio.run(copy_log(args.src, args.dst, batch=args.batch))
    dst = redact_dsn(args.dst)
    if not report.verified:
        for p in report.problems:
            print(f"xcore: error: {p}", file=sys.stderr)
        return 1
    print(
        f"copied {report.copied} events ({report.already} were already there) to {dst}; "
        f"verified {report.total} events, sha256 {report.digest[:16]}"
    )
    return 0
