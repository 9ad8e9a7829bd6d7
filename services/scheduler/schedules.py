"""Schedules changed at runtime: what operators added, changed or removed through the
admin API, folded from the log, and merged into a plugin's declarations when it loads.

Guarantee: a runtime change is an event (``ScheduleAdded``, ``ScheduleChanged``,
``ScheduleRemoved``), so it survives restarts and shows in the replay; a plugin's code
stays the authority for what it declares — a change made to a declared task holds only
while the plugin declares the same thing it declared when the change was made. When
the declaration itself changes (a new version of the plugin), the declaration wins and
``ScheduleConflict`` reports the dropped change.

Mechanism: :class:`ScheduleBook` folds the events (at boot from the log, then live as
the service handles them); :meth:`ScheduleBook.merge` rewrites one plugin's list of
:class:`~kernel.sdk.TaskSpec` before it is compiled: declared specs get their override
applied (or are reported as conflicting), and each runtime schedule becomes a spec
calling its declared function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kernel.events import Recorded
from kernel.sdk import TaskSpec
from services.scheduler.specs import TaskDeclarationError, expand_schedules

__all__ = [
    "BOOK_EVENTS",
    "ChangeConflict",
    "Merged",
    "ScheduleBook",
    "declared_key",
    "with_trigger",
]

BOOK_EVENTS = ("ScheduleAdded", "ScheduleChanged", "ScheduleRemoved", "ScheduleConflict")


class ChangeConflict(TaskDeclarationError):
    """A runtime change that contradicts what exists (a taken id, a declared task)."""


_TRIGGER_FIELDS = ("cron", "every", "at", "after", "trigger", "start", "end")


def declared_key(spec: TaskSpec) -> str:
    """What a declaration says about when and how it runs (to detect it changed)."""
    parts = {k: getattr(spec, k) for k in (*_TRIGGER_FIELDS, "tz", "args", "kwargs")}
    return repr(sorted((k, repr(v)) for k, v in parts.items() if v not in (None, (), {})))


def with_trigger(spec: TaskSpec, trigger: dict[str, Any] | None, **changes: Any) -> TaskSpec:
    """``spec`` with its trigger replaced by ``trigger`` (dict form), and ``changes``."""
    if trigger is not None:
        changes.update({k: None for k in _TRIGGER_FIELDS})
        changes["trigger"] = dict(trigger)
    return dataclasses.replace(spec, schedules=(), **changes)


def expanded(specs: Iterable[TaskSpec]) -> list[TaskSpec]:
    """Each ``schedules=[...]`` declaration as its schedules (one task each); one that
    cannot be expanded stays as it is (its compilation reports why)."""
    out: list[TaskSpec] = []
    for spec in specs:
        try:
            out.extend(expand_schedules(spec) if isinstance(spec, TaskSpec) else [spec])
        except TaskDeclarationError:
            out.append(spec)
    return out


@dataclass
class Merged:
    specs: list[TaskSpec]
    #: runtime schedules that cannot be built (task id -> reason)
    broken: dict[str, str] = field(default_factory=dict)
    #: declared tasks whose runtime change was dropped: (task id, declared key, change)
    conflicts: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


class ScheduleBook:
    """Runtime schedules (``added``) and runtime changes (``changed``), by task id."""

    def __init__(self) -> None:
        self.added: dict[str, dict[str, Any]] = {}
        self.changed: dict[str, dict[str, Any]] = {}

    def fold(self, records: Iterable[Recorded]) -> None:
        for r in records:
            self.apply(r.type, r.data)

    def apply(self, type_name: str, d: dict[str, Any]) -> None:
        tid = d["task"]
        if type_name == "ScheduleAdded":
            self.added[tid] = {
                "plugin": d["plugin"],
                "function": d["function"],
                "trigger": d["trigger"],
                "args": list(d.get("args") or ()),
                "kwargs": dict(d.get("kwargs") or {}),
            }
        elif type_name == "ScheduleChanged":
            if tid in self.added:
                add = self.added[tid]
                for key in ("trigger", "args", "kwargs"):
                    if d.get(key) is not None:
                        add[key] = d[key]
            else:
                prev = self.changed.get(tid, {})
                self.changed[tid] = {
                    "trigger": d.get("trigger") or prev.get("trigger"),
                    "args": d.get("args") if d.get("args") is not None else prev.get("args"),
                    "kwargs": (
                        d.get("kwargs") if d.get("kwargs") is not None else prev.get("kwargs")
                    ),
                    "declared": d.get("declared") or prev.get("declared"),
                }
        elif type_name == "ScheduleRemoved":
            self.added.pop(tid, None)
            self.changed.pop(tid, None)
        elif type_name == "ScheduleConflict":
            self.changed.pop(tid, None)

    def merge(self, plugin: str, specs: list[TaskSpec]) -> Merged:
        """``plugin``'s declarations with the runtime changes and schedules applied."""
        specs = expanded(specs)
        by_name = {s.name: s for s in specs if isinstance(getattr(s, "name", None), str)}
        out: list[TaskSpec] = []
        merged = Merged(out)
        for spec in specs:
            tid = f"{plugin}.{getattr(spec, 'name', '?')}"
            change = self.changed.get(tid)
            if change is None or not isinstance(spec, TaskSpec):
                out.append(spec)
                continue
            if change.get("declared") != declared_key(spec):
                merged.conflicts.append((tid, declared_key(spec), change))
                out.append(spec)
                continue
            extra: dict[str, Any] = {}
            if change.get("args") is not None:
                extra["args"] = tuple(change["args"])
            if change.get("kwargs") is not None:
                extra["kwargs"] = dict(change["kwargs"])
            out.append(with_trigger(spec, change.get("trigger"), **extra))
        for tid, add in sorted(self.added.items()):
            if add["plugin"] != plugin:
                continue
            base = by_name.get(add["function"])
            if base is None:
                merged.broken[tid] = (
                    f"runtime schedule: the plugin no longer declares the task "
                    f"{add['function']!r} whose function it calls"
                )
                continue
            out.append(
                with_trigger(
                    base,
                    add["trigger"],
                    name=tid.split(".", 1)[1],
                    args=tuple(add["args"]),
                    kwargs=dict(add["kwargs"]),
                    depends_on=(),
                )
            )
        return merged
