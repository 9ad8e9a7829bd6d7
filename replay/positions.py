"""Points in a log, given as a position (``1234``) or a time (ISO 8601).

A time names the state *as of* that moment: the last event recorded at or before it
(``--at``, ``--to``), or the first at or after it (``--from``). Times without a zone are
UTC. A position must lie inside the log: one past the end is an error, not a silent
clamp, since it usually means the wrong file.
"""

from __future__ import annotations

from datetime import UTC, datetime

from replay.errors import ReplayError
from replay.source import Log

__all__ = ["parse_time", "resolve"]


def parse_time(text: str) -> float:
    """Epoch seconds of an ISO 8601 time (``2026-11-29T10:15:00``, ``...Z``, ``...+01:00``)."""
    try:
        dt = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise ReplayError(
            f"bad time {text!r}: give a position (an integer) or an ISO 8601 time "
            f"such as 2026-11-29T10:15:00Z"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def resolve(
    log: Log, text: str | int | None, *, start: bool = False, last: int | None = None
) -> int:
    """The position ``text`` names in ``log`` (``None``: the end of the log).

    ``start=True`` reads a time as "from this moment" (the first event at or after it).
    """
    end = log.last_position() if last is None else last
    if text is None:
        return end
    if isinstance(text, int) or str(text).strip().lstrip("-").isdigit():
        pos = int(text)
        if pos < 0:
            raise ReplayError(
                f"bad position {text}: positions start at 1 (0 is before the first event)"
            )
        if pos > end:
            raise ReplayError(
                f"position {pos} is past the end of {log.location} (last position {end})"
            )
        return pos
    ts = parse_time(str(text))
    if start:
        found = log.position_at(ts, before=False)
        return found if found is not None else end + 1
    found = log.position_at(ts, before=True)
    return found if found is not None else 0
