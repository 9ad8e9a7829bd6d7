"""The replay tool: inspect and debug an xcore event log, read-only.

    from replay import open_log, state_at

    with open_log("var/events.db") as log:             # or a .jsonl slice
        state = state_at(log, 1234)                     # every installed projection
        tasks = state["scheduler.tasks"]                # the TaskTable instance
        assert tasks.tasks["hello.cleanup"].failures <= 3

Nothing here writes to the log or runs plugin or task code: projections' handlers are
the only code that runs. The command line is ``xcore replay ...`` (``replay/cli.py``);
docs/replay.md describes both.
"""

from __future__ import annotations

import os
from typing import Any

from kernel.projections import Projection
from replay.bisect import BisectResult, bisect
from replay.cache import SnapshotCache
from replay.diff import Change, diff_views
from replay.errors import Defect, ReplayError
from replay.expr import Expression, compile_expression
from replay.fold import State, fold
from replay.positions import resolve as resolve_position
from replay.projections import discover, import_events, load_class
from replay.slices import export_slice, import_slice
from replay.source import Log, SliceLog, SQLiteLog, open_log
from replay.verify import VerifyReport, verify
from replay.why import Why, why

__all__ = [
    "BisectResult",
    "Change",
    "Defect",
    "Expression",
    "Log",
    "ReplayError",
    "SQLiteLog",
    "SliceLog",
    "SnapshotCache",
    "State",
    "VerifyReport",
    "Why",
    "bisect",
    "compile_expression",
    "diff",
    "diff_views",
    "discover",
    "export_slice",
    "fold",
    "import_events",
    "import_slice",
    "load_class",
    "open_log",
    "resolve_position",
    "state_at",
    "verify",
    "why",
]

import_events()


def _log(log: Log | str | os.PathLike[str]) -> Log:
    return log if isinstance(log, Log) else open_log(log)


def state_at(
    log: Log | str | os.PathLike[str],
    at: int | str | None = None,
    *projections: type[Projection] | Projection | str,
) -> State:
    """The projections (default: every installed one) as they were at ``at``.

    ``at`` is a position, an ISO 8601 time, or None for the end of the log.
    """
    opened = _log(log)
    try:
        position = resolve_position(opened, at)
        return fold(opened, list(projections) or None, until=position)
    finally:
        if opened is not log:
            opened.close()


def diff(
    log: Log | str | os.PathLike[str],
    a: int | str,
    b: int | str,
    *projections: type[Projection] | Projection | str,
) -> list[Change]:
    """What changed in the projections between points ``a`` and ``b``."""
    opened = _log(log)
    try:
        pa, pb = sorted((resolve_position(opened, a), resolve_position(opened, b)))
        first = fold(opened, list(projections) or None, until=pa)
        view_a: dict[str, Any] = first.view()
        second = fold(opened, list(first.projections.values()), until=pb, gaps=False)
        return diff_views(view_a, second.view())
    finally:
        if opened is not log:
            opened.close()
