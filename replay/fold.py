"""Folding projections over a log to a position: the heart of replay.

Guarantee: the state replay computes at position P is the state the live kernel's
projection had after folding the same events up to P — the same handlers, fed the same
events in the same order (``tests/replay/test_equivalence.py`` checks it with random
logs). Nothing but the projections' handlers runs: no service, plugin or task code.

Mechanism: one pass reads only the event types the projections handle, in batches, and
calls each handler directly (a projection that overrides ``apply`` gets ``apply``). A
handler that raises is reported as a defect with its position and the fold goes on, so
a log is replayed as far as it can be; rows that do not decode are reported by the
source; gaps in positions are found up front by counting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kernel.events import Recorded
from kernel.projections import Projection
from replay.errors import Defect, ReplayError
from replay.progress import Progress
from replay.projections import resolve as resolve_projections
from replay.projections import view
from replay.source import Log

__all__ = ["State", "check_gaps", "fold", "steps"]

P = TypeVar("P", bound=Projection)
Handler = Callable[[Any, Recorded], None]


@dataclass
class State:
    """Projections as they were at ``position``: ``state["scheduler.tasks"]`` or
    ``state[TaskTable]`` gives the projection instance itself."""

    position: int
    projections: dict[str, Projection]
    defects: list[Defect] = field(default_factory=list)
    #: events folded to compute it (fewer when it started from a snapshot)
    folded: int = 0

    def __getitem__(self, key: str | type[P]) -> Any:
        name = key if isinstance(key, str) else key.name
        try:
            return self.projections[name]
        except KeyError:
            raise KeyError(
                f"no projection {name!r} in this state (has: {', '.join(self.projections)})"
            ) from None

    def __contains__(self, key: object) -> bool:
        name = key if isinstance(key, str) else getattr(key, "name", None)
        return name in self.projections

    def view(self) -> dict[str, Any]:
        """Every projection's state as JSON-ready data, by projection name."""
        return {name: view(p) for name, p in sorted(self.projections.items())}


def instantiate(
    projections: Iterable[type[Projection] | Projection | str] | None,
    warn: list[str] | None = None,
) -> dict[str, Projection]:
    """Fresh projections from classes, instances or names (all installed when None)."""
    items = list(projections or [])
    if not items:
        return {name: cls() for name, cls in resolve_projections(None, warn).items()}
    out: dict[str, Projection] = {}
    names = [p for p in items if isinstance(p, str)]
    for cls_ in resolve_projections(names, warn).values() if names else []:
        out[cls_.name] = cls_()
    for p in items:
        if isinstance(p, Projection):
            out[p.name] = p
        elif isinstance(p, type) and issubclass(p, Projection):
            out[p.name] = p()
    return out


def _dispatch(projections: Sequence[Projection]) -> dict[str, list[tuple[Projection, Handler]]]:
    table: dict[str, list[tuple[Projection, Handler]]] = {}
    for p in projections:
        overridden = type(p).apply is not Projection.apply
        for type_name, handler in type(p)._handlers.items():
            fn: Handler = (lambda proj, r: proj.apply(r)) if overridden else handler
            table.setdefault(type_name, []).append((p, fn))
    return table


def check_gaps(log: Log, until: int) -> list[Defect]:
    """Gaps in positions up to ``until``, found by counting (cheap) then located."""
    expected = until - log.slice_after
    if log.filtered or expected <= 0 or log.count(until) == expected:
        return []
    return [
        Defect(
            "gap",
            a,
            f"positions {a}..{b} are missing ({b - a + 1} events)"
            if b > a
            else f"position {a} is missing",
        )
        for a, b in log.missing(until)
    ]


def steps(
    log: Log,
    projections: Mapping[str, Projection],
    *,
    until: int | None = None,
    defects: list[Defect] | None = None,
    progress: Progress | None = None,
    batch_size: int = 20_000,
) -> Iterator[Recorded]:
    """Fold event by event, yielding each event once the projections have applied it.

    Only events some projection handles are read and yielded. The caller may stop at
    any time; the projections' ``position`` is then the last yielded event's.
    """
    if defects is None:
        defects = []
    live = list(projections.values())
    if not live:
        return
    end = log.last_position() if until is None else until
    start = min(p.position for p in live)
    table = _dispatch(live)
    types = set(table)
    for batch in log.batches(after=start, until=end, types=types, batch_size=batch_size):
        for r in batch:
            for p, handler in table[r.type]:
                if r.position <= p.position:
                    continue  # this projection started from a later snapshot
                try:
                    handler(p, r)
                except Exception as exc:
                    defects.append(
                        Defect(
                            "handler",
                            r.position,
                            f"projection {p.name!r} failed on {r.type}: "
                            f"{type(exc).__name__}: {exc}",
                        )
                    )
                p.position = r.position
            yield r
        if progress is not None:
            progress.update(batch[-1].position)
    for p in live:
        p.position = max(p.position, end)


def fold(
    log: Log,
    projections: Iterable[type[Projection] | Projection | str] | None = None,
    *,
    until: int | None = None,
    progress: bool | Progress | None = None,
    gaps: bool = True,
) -> State:
    """Fold ``projections`` (default: every installed one) up to ``until`` (default: the end).

    Instances are folded from their own ``position`` (so a restored state continues).
    """
    last = log.last_position()
    end = last if until is None else until
    if end > last:
        raise ReplayError(
            f"position {end} is past the end of {log.location} (last position {last})"
        )
    instances = instantiate(projections)
    for p in instances.values():
        if p.position > end:
            raise ReplayError(
                f"projection {p.name!r} is already at position {p.position}, past {end}: "
                f"a fold only moves forward (start from a fresh instance)"
            )
    before = len(log.defects)
    defects: list[Defect] = check_gaps(log, end) if gaps else []
    bar: Progress | None
    if isinstance(progress, Progress):
        bar = progress
    elif progress:
        bar = Progress(
            "replay", end, start=min((p.position for p in instances.values()), default=0)
        )
    else:
        bar = None
    count = 0
    try:
        for _ in steps(log, instances, until=end, defects=defects, progress=bar):
            count += 1
    finally:
        if bar is not None and not isinstance(progress, Progress):
            bar.close()
    defects = log.defects[before:] + defects
    defects.sort(key=lambda d: d.position or 0)
    return State(end, instances, defects, count)
