"""What replay reports: bad input (one clear line, exit 2) and defects found in a log.

ReplayError              bad input: not an xcore log, a position past the end, a bad
                         time or expression, an unknown projection (the CLI exits 2)
DamagedLog               an SQLite file whose pages cannot be read (truncated, overwritten):
                         bad input to most commands, a defect to ``verify`` (exit 1)
Defect                   something wrong *in the log* (a gap, a corrupted row, a handler
                         that raised): reported with its position, the replay goes on
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.errors import XcoreError

__all__ = ["DamagedLog", "Defect", "ReplayError"]


class ReplayError(XcoreError):
    """Bad input to replay; the message is the whole explanation, on one line."""


class DamagedLog(ReplayError):
    """An SQLite log whose pages cannot be read: a truncated or overwritten copy."""


@dataclass(frozen=True, slots=True)
class Defect:
    """A defect of the log found while reading or folding it.

    ``kind`` is one of ``gap``, ``corrupt``, ``upcast``, ``version``, ``handler``,
    ``snapshot``, ``id`` (an id stored twice), ``index`` (a log index that disagrees
    with the events), ``unknown-type`` (the last is a warning: a newer version's or a
    plugin's event type, kept and passed over).
    """

    kind: str
    position: int | None
    message: str

    def __str__(self) -> str:
        where = f"position {self.position}" if self.position is not None else "log"
        return f"{where}: {self.kind}: {self.message}"
