"""``bisect``: the first position at which a condition on projection state holds.

Guarantee: the answer P is exact — the condition is false after folding up to the
handled event before P and true after P — and the search folds the log at most once,
however many probes it takes; with the snapshot cache warm (any earlier ``state``,
``bisect`` or ``verify`` of the same log), it folds only one interval of it.

Mechanism: like ``git bisect``, it assumes the condition, once true, stays true (a
failure counter passing 3). Only the projections the condition reads are folded.

1. Binary search over the cached snapshots (``replay/cache.py``): each probe loads a
   saved state and evaluates the condition — no fold per probe.
2. Past the last cached snapshot, fold forward interval by interval (``every``
   positions), saving a snapshot at each boundary and testing the condition there.
3. Within the one interval where the condition turns true, fold event by event from
   the interval's start and test after each event: the first event that makes it
   true is the answer.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field

from kernel.events import Recorded
from kernel.projections import Projection
from replay.cache import SnapshotCache
from replay.errors import Defect, ReplayError
from replay.expr import Expression, compile_expression
from replay.fold import check_gaps, steps
from replay.progress import Progress
from replay.projections import resolve

__all__ = ["BisectResult", "bisect"]

EVERY = 10_000


@dataclass
class BisectResult:
    expression: str
    #: first position where the condition holds (0: already on the empty state;
    #: None: it never holds up to ``last``)
    position: int | None
    record: Recorded | None
    last: int
    probes: int = 0
    folded: int = 0
    snapshots_used: int = 0
    defects: list[Defect] = field(default_factory=list)


def _blob(state: dict[str, Projection]) -> bytes | None:
    try:
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None


def bisect(
    log: object,
    expression: str | Expression,
    *,
    projections: Iterable[str] | None = None,
    cache: SnapshotCache | None = None,
    every: int = EVERY,
    progress: bool = False,
) -> BisectResult:
    """Find the first position where ``expression`` holds (see the module docstring).

    ``projections`` adds user projection classes (``module:Class``) to the installed ones.
    """
    from replay.source import Log

    assert isinstance(log, Log)
    if every < 1:
        raise ReplayError(f"--every must be at least 1, not {every}")
    classes = resolve(None)
    if projections:
        classes.update(resolve(projections))
    expr = (
        expression
        if isinstance(expression, Expression)
        else compile_expression(expression, classes)
    )
    need = {name: classes[name] for name in expr.projections if name in classes}
    last = log.last_position()
    result = BisectResult(expr.text, None, None, last)
    result.defects.extend(check_gaps(log, last))
    before = len(log.defects)

    def holds(state: dict[str, Projection], position: int) -> bool:
        result.probes += 1
        return expr.evaluate(state, position)

    def fresh() -> dict[str, Projection]:
        return {n: c() for n, c in need.items()}

    def finish(position: int | None) -> BisectResult:
        result.position = position
        if position:
            result.record = log.get(position)
        result.defects.extend(log.defects[before:])
        return result

    if not need:
        # a condition on ``position`` alone: no state to fold
        lo, hi = 0, last + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if holds({}, mid):
                hi = mid
            else:
                lo = mid + 1
        return finish(lo if lo <= last else None)

    state = fresh()
    if holds(state, 0):
        return finish(0)

    # 1. binary search over cached snapshots
    base_pos, true_pos = 0, None
    if cache is not None and cache.enabled:
        common: set[int] | None = None
        for cls in need.values():
            got = set(cache.positions(cls, last))
            common = got if common is None else common & got
        candidates = sorted(p for p in (common or set()) if p > 0)
        lo, hi = 0, len(candidates)
        base_state: dict[str, Projection] | None = None
        while lo < hi:
            mid = (lo + hi) // 2
            pos = candidates[mid]
            loaded = {n: cache.load(c, pos) for n, c in need.items()}
            if any(p is None for p in loaded.values()):
                del candidates[mid]  # stale entry: drop it and search on
                hi -= 1
                continue
            result.snapshots_used += 1
            probe = {n: p for n, p in loaded.items() if p is not None}
            if holds(probe, pos):
                hi = mid
                true_pos = pos
            else:
                lo = mid + 1
                base_pos, base_state = pos, probe
        if base_state is not None:
            state = base_state

    def scan(start: dict[str, Projection], until: int) -> int | None:
        """Fold event by event from ``start`` to ``until``; the first position it holds."""
        for r in steps(log, start, until=until, defects=result.defects):
            result.folded += 1
            if holds(start, r.position):
                return r.position
        return None

    # 3. the answer lies in (base_pos, true_pos]
    if true_pos is not None:
        found = scan(state, true_pos)
        if found is None:  # cannot happen when the condition is monotonic
            found = true_pos
        return finish(found)

    # 2. fold forward from the last cached state, interval by interval
    bar = Progress("bisect", last, start=base_pos, enabled=None if progress else False)
    try:
        pos = base_pos
        while pos < last:
            boundary = min((pos // every + 1) * every, last)
            saved = _blob(state)
            for r in steps(log, state, until=boundary, defects=result.defects):
                result.folded += 1
                if saved is None and holds(state, r.position):
                    return finish(r.position)
                bar.update(r.position)
            if cache is not None and cache.enabled:
                for p in state.values():
                    cache.save(p, boundary)
                cache.commit()
            if saved is not None and holds(state, boundary):
                found = scan(pickle.loads(saved), boundary)
                return finish(found if found is not None else boundary)
            pos = boundary
    finally:
        bar.close()
    return finish(None)
