"""Slices: part of a log as JSON lines, to carry to another machine or attach to a bug.

A slice is one header line, then one event envelope per line, exactly as
``Recorded.to_dict()`` gives it (position, stream, version, type, schema, data, meta,
recorded_at)::

    {"xcore_slice": 1, "source": "var/events.db", "after": 1200, "until": 1450, ...}
    {"position": 1201, "stream": "task-hello.cleanup", "version": 7, "type": ...}

Positions, versions and ids are kept, so an event is named the same in the slice as in
the original log. A slice is replayed directly (``open_log("bug.jsonl")``, every
``replay`` command) or imported into a new SQLite log (``replay import``) that the kernel
and other tools open like any log. A slice that does not start at position 1 replays
from an empty state: export from the start (the default) when the bug depends on
earlier history. Import never overwrites a file: it writes a temporary file beside the
target and renames it into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import orjson

from kernel.events import Recorded, registry
from kernel.store.sqlite import FORMAT, INDEX_WHOLE_LOG, SCHEMA
from replay.errors import Defect, ReplayError
from replay.fold import check_gaps
from replay.progress import Progress
from replay.source import SLICE_FORMAT, Log, SliceLog

__all__ = ["export_slice", "import_slice"]


def export_slice(
    log: Log,
    out: TextIO,
    *,
    after: int = 0,
    until: int | None = None,
    types: list[str] | None = None,
    keep: Callable[[Recorded], bool] | None = None,
    progress: bool = False,
) -> tuple[int, list[Defect]]:
    """Write the slice ``after < position <= until`` to ``out``; return (events, defects)."""
    end = log.last_position() if until is None else until
    header = {
        "xcore_slice": SLICE_FORMAT,
        "source": log.location,
        "after": after,
        "until": end,
        "types": sorted(types) if types else None,
        "filtered": bool(types) or keep is not None,
        "exported_at": datetime.now(UTC).isoformat(),
    }
    out.write(orjson.dumps(header).decode() + "\n")
    count = 0
    defects: list[Defect] = []
    before = len(log.defects)
    bar = Progress("export", end, start=after, enabled=None if progress else False)
    try:
        for batch in log.batches(after=after, until=end, types=types):
            lines = []
            for r in batch:
                if keep is not None and not keep(r):
                    continue
                try:
                    d = r.to_dict()
                    cls = registry.get(r.type)
                    if cls is not None and r.type in registry.versioned:
                        d["schema"] = cls.schema_version  # the data is upcast already
                    lines.append(orjson.dumps(d).decode())
                except Exception as exc:
                    defects.append(
                        Defect("corrupt", r.position, f"{r.type}: not exportable: {exc}")
                    )
                    continue
            if lines:
                out.write("\n".join(lines) + "\n")
            count += len(lines)
            bar.update(batch[-1].position)
    finally:
        bar.close()
    defects = log.defects[before:] + defects
    return count, defects


def import_slice(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    defects: list[Defect] | None = None,
) -> int:
    """Write the slice ``source`` into a new SQLite log at ``target``; return the count.

    Lines of the slice that do not decode are skipped; they are added to ``defects``
    (when given) so that the caller can say so: the new log would not show the loss."""
    src = SliceLog(source)
    if defects is not None:
        defects.extend(src.defects)
        if src.events:  # a gap is kept as it is (positions are copied), and said
            defects.extend(check_gaps(src, src.events[-1].position))
    dest = Path(target)
    if dest.exists() or dest.is_symlink():
        raise ReplayError(
            f"{dest} already exists: import writes a new log, it never overwrites one"
        )
    if not dest.parent.is_dir():
        raise ReplayError(f"{dest.parent}: no such directory")
    tmp = dest.with_name(f".{dest.name}.importing-{os.getpid()}")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO xcore_meta (key, value) VALUES ('format', ?)", (str(FORMAT),))
            if src.slice_after:
                conn.execute(
                    "INSERT INTO xcore_meta (key, value) VALUES ('slice_after', ?)",
                    (str(src.slice_after),),
                )
            if src.filtered:
                conn.execute("INSERT INTO xcore_meta (key, value) VALUES ('slice_filtered', '1')")
            conn.execute(
                "INSERT INTO xcore_meta (key, value) VALUES ('imported_from', ?)",
                (str(src.header.get("source", source)),),
            )
            seen: dict[str, int] = {}
            for r in src.events:
                first = seen.setdefault(r.meta.id, r.position)
                if first != r.position:
                    raise ReplayError(
                        f"{source}: cannot import it: id {r.meta.id!r} is at positions "
                        f"{first} and {r.position} (duplicate ids)"
                    )
            conn.executemany(
                "INSERT INTO events (position, stream, version, type, schema, data, meta, id,"
                " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.position,
                        r.stream,
                        r.version,
                        r.type,
                        r.schema,
                        orjson.dumps(r.data),
                        r.meta.to_json(),
                        r.meta.id,
                        r.timestamp,
                    )
                    for r in src.events
                ],
            )
            # the ids and versions indexed whole (the log's own indexes check an id
            # only once it is indexed: a duplicate here is refused as it always was)
            for statement in INDEX_WHOLE_LOG:
                conn.execute(statement)
            conn.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise ReplayError(
                f"{source}: cannot import it: {exc} (duplicate positions, ids or versions)"
            ) from None
        finally:
            conn.close()
        os.replace(tmp, dest)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return len(src.events)
