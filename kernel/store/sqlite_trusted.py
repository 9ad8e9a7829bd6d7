"""The writer's own connection runs without the append-only triggers; every other one
runs with them.

Guarantee: every connection but the store's writer — the ``sqlite3`` shell, a script, a
second xcore process that took no lock — has each of its inserts into ``events`` checked
by the append-only triggers (no ``INSERT OR REPLACE`` over an event, no position at or
before the end, no indexed id or stream version reused) and its updates and deletes
refused. The writer itself needs no such check: it is the only one to assign positions
and versions (the lock file admits one writer), it checks ``expected_version`` and ids
itself (the unindexed end's in memory, the id index by a probe: ``sqlite_ids.py``), and
it only ever issues plain ``INSERT`` (a conflict is an error, never a replacement; the
position key still refuses one).

Why: a ``BEFORE INSERT`` trigger costs SQLite a sub-program per row — in a raw loop of
100-row inserts, about 8,500 instructions a row before its probes run and 14,000 with
them. Turning them off for the writer took a durable append from ~137,600 to ~111,800
instructions (``python -m bench.instructions``).

Mechanism: SQLite's per-connection switch ``SQLITE_DBCONFIG_ENABLE_TRIGGER``, turned off
on the writer's connection only. Python 3.12+ exposes it (``Connection.setconfig``); on
3.11 it is called through ``ctypes`` with the connection's ``sqlite3 *`` handle, which
is checked first (the handle must name the same database file) — on any doubt the
triggers stay on, which is correct, only slower.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sqlite3
import sys
from typing import Final

__all__ = ["ENABLE_TRIGGER", "skip_triggers", "triggers_enabled"]

log = logging.getLogger("xcore.store")

#: ``SQLITE_DBCONFIG_ENABLE_TRIGGER`` (sqlite3.h; stable since SQLite 3.8.7).
ENABLE_TRIGGER: Final = 1003


def _native() -> tuple[ctypes.CDLL, int] | None:
    """The SQLite library the ``sqlite3`` module uses and the offset of its handle, on
    CPython 3.11 on Linux (where the layout of ``pysqlite_Connection`` is known:
    ``PyObject_HEAD`` then ``sqlite3 *db``); None anywhere else."""
    if (
        sys.implementation.name != "cpython"
        or sys.version_info[:2] != (3, 11)
        or sys.platform != "linux"
        or platform.machine() not in ("x86_64", "aarch64")
    ):
        return None
    try:
        import _sqlite3

        lib = ctypes.CDLL(_sqlite3.__file__)
        lib.sqlite3_db_filename.restype = ctypes.c_char_p
        lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.sqlite3_db_config  # noqa: B018 - resolves the symbol (AttributeError if absent)
    except (ImportError, OSError, AttributeError) as exc:
        log.debug("SQLite's native library is not reachable through ctypes: %r", exc)
        return None
    return lib, object.__basicsize__


def _handle(conn: sqlite3.Connection, path: str) -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    native = _native()
    if native is None:
        return None
    lib, offset = native
    db = ctypes.c_void_p.from_address(id(conn) + offset)
    if not db.value:
        return None
    name = lib.sqlite3_db_filename(db, b"main")
    if name is None or os.path.realpath(os.fsdecode(name)) != os.path.realpath(path):
        return None  # not the handle we think it is: leave the connection alone
    return lib, db


def _config(conn: sqlite3.Connection, path: str, value: int) -> int | None:
    """Set (0 or 1) or query (-1) the switch; its value after, or None if unreachable."""
    setconfig = getattr(conn, "setconfig", None)
    if setconfig is not None:  # Python 3.12+
        if value >= 0:
            setconfig(ENABLE_TRIGGER, bool(value))
        return int(conn.getconfig(ENABLE_TRIGGER))  # type: ignore[attr-defined]
    found = _handle(conn, path)
    if found is None:
        return None
    lib, db = found
    out = ctypes.c_int(-1)
    rc = lib.sqlite3_db_config(
        db, ctypes.c_int(ENABLE_TRIGGER), ctypes.c_int(value), ctypes.byref(out)
    )
    return out.value if rc == 0 and out.value in (0, 1) else None


def skip_triggers(conn: sqlite3.Connection, path: str) -> bool:
    """Turn the triggers off on ``conn`` (the writer's connection to ``path``; call it in
    the connection's thread). True when they are off; False (with a debug line) when
    this interpreter cannot reach the switch, and they stay on."""
    try:
        done = _config(conn, path, 0) == 0
    except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
        log.debug("could not turn the triggers off on the writer of %s: %r", path, exc)
        return False
    if not done:
        log.debug("the writer of %s keeps the append-only triggers (no switch here)", path)
    return done


def triggers_enabled(conn: sqlite3.Connection, path: str) -> bool | None:
    """Whether the triggers are on for ``conn`` (None: this interpreter cannot tell)."""
    value = _config(conn, path, -1)
    return None if value is None else bool(value)
