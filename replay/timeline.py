"""``timeline``: the events of a log as a readable table or as JSON lines.

Each row shows the position, the time (UTC, milliseconds), the stream, the type and the
fields that matter for that type — identifiers and outcomes first, bulky fields
(tracebacks, digests, path lists) left out; ``--json`` prints every envelope whole.
Colour is used only on a terminal (and never with ``NO_COLOR`` set): failures in red,
successes in green, requests in cyan, the kernel's own events dimmed.

Filters combine (all must match): ``--type`` (repeatable), ``--stream``, ``--plugin``
(the plugin's own stream, its tasks' streams, and any event naming it), ``--task``.
``--follow`` keeps printing new events as a running kernel appends them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from kernel.events import Recorded
from replay.source import Log

__all__ = ["Filter", "Painter", "format_row", "iterate"]

#: data fields never shown in the table (``--json`` has them)
BULKY = {"traceback", "digest", "paths", "routes", "tasks", "limits", "state", "config", "openapi"}
#: fields shown first when an event has them
FIRST = (
    "name",
    "plugin",
    "task",
    "run_id",
    "generation",
    "version",
    "stage",
    "attempt",
    "reason",
    "error",
)
WIDTH = 160


class Painter:
    """ANSI colours, or none."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO, mode: str = "auto") -> Painter:
        if mode == "always":
            return cls(True)
        if mode == "never" or os.environ.get("NO_COLOR"):
            return cls(False)
        return cls(stream.isatty())

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and code else text

    def for_type(self, type_name: str) -> str:
        if any(
            w in type_name
            for w in (
                "Failed",
                "Crashed",
                "Exceeded",
                "Conflict",
                "Raised",
                "Rejected",
                "Refused",
                "Missed",
            )
        ):
            return "31"  # red
        if type_name.endswith(("Requested",)):
            return "36"  # cyan
        if any(w in type_name for w in ("Succeeded", "Loaded", "Reloaded", "Mounted", "Resolved")):
            return "32"  # green
        if type_name.startswith("Kernel") or type_name == "SubscriberFailed":
            return "2" if type_name != "SubscriberFailed" else "31"
        return ""


class Filter:
    """Which events to show; None fields match everything."""

    def __init__(
        self,
        types: list[str] | None = None,
        stream: str | None = None,
        plugin: str | None = None,
        task: str | None = None,
    ) -> None:
        self.types = set(types) if types else None
        self.stream = stream
        self.plugin = plugin
        self.task = task

    def __call__(self, r: Recorded) -> bool:
        if self.types is not None and r.type not in self.types:
            return False
        if self.stream is not None and r.stream != self.stream:
            return False
        d = r.data if isinstance(r.data, dict) else {}
        if self.plugin is not None:
            p = self.plugin
            if not (
                r.stream == f"plugin-{p}"
                or r.stream.startswith(f"task-{p}.")
                or r.stream == f"sandbox-{p}"
                or d.get("plugin") == p
                or d.get("name") == p
                or str(d.get("task", "")).startswith(f"{p}.")
            ):
                return False
        if self.task is not None:
            t = self.task
            if not (r.stream == f"task-{t}" or d.get("task") == t):
                return False
        return True


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
_CONTROL[ord("\n")] = " "


def clean(text: str) -> str:
    """``text`` without control characters: an event's data never drives the terminal."""
    return text.translate(_CONTROL)


def _short(value: Any, limit: int = 60) -> str:
    text = clean(value) if isinstance(value, str) else clean(orjson.dumps(value).decode())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary(r: Recorded) -> str:
    d = r.data if isinstance(r.data, dict) else {"data": r.data}
    keys = [k for k in FIRST if k in d] + sorted(
        str(k) for k in d if k not in FIRST and k not in BULKY
    )
    parts = []
    for k in keys:
        v = d[k]
        if v is None or v == [] or v == {}:
            continue
        if (
            isinstance(v, float)
            and 1e9 < v < 4e9
            and (k.endswith(("_at", "_run", "_for")) or k == "at")
        ):
            v = datetime.fromtimestamp(v, UTC).strftime("%H:%M:%S.%f")[:-3]
        parts.append(f"{clean(k)}={_short(v)}")
    if not r.known:
        parts.insert(0, "(unknown type)")
    return " ".join(parts)


def format_row(r: Recorded, painter: Painter, width: int = WIDTH) -> str:
    when = datetime.fromtimestamp(r.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    stream = clean(r.stream) if len(r.stream) <= 24 else clean(r.stream[:23]) + "…"
    rest = summary(r)
    room = max(width - 85, 20)
    if len(rest) > room:
        rest = rest[: room - 1] + "…"
    position = painter.paint(f"{r.position:>8}", "1")
    type_name = painter.paint(f"{clean(r.type):<22}", painter.for_type(r.type))
    return f"{position}  {when}  {stream:<24}  {type_name}  {rest}"


def header() -> str:
    return f"{'POSITION':>8}  {'TIME (UTC)':<23}  {'STREAM':<24}  {'TYPE':<22}  FIELDS"


def iterate(
    log: Log,
    *,
    after: int,
    until: int | None,
    keep: Callable[[Recorded], bool],
    follow: bool = False,
    poll: float = 0.2,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Recorded]:
    """The matching events in order; with ``follow``, keep waiting for new ones."""
    types = None
    if isinstance(keep, Filter) and keep.types is not None:
        types = keep.types
    stream = keep.stream if isinstance(keep, Filter) else None
    while True:
        for batch in log.batches(
            after=after, until=until, types=types, stream=stream, batch_size=2000
        ):
            for r in batch:
                if keep(r):
                    yield r
            after = batch[-1].position
        if not follow or (stop is not None and stop()):
            return
        time.sleep(poll)
        log.refresh()


def write_json(r: Recorded, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(orjson.dumps(r.to_dict()).decode() + "\n")
