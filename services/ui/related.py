"""Causes and effects of one event, for the page's event view (``/admin/events/{pos}/related``).

Causes follow ``causation_id`` back from the event to the origin (the HTTP request, the
file change or the timer whose event started it); effects are the events caused by it,
directly or through others; ``correlated`` lists every event of the same correlation.
The search is bounded: it reads at most ``window`` events on each side of the position,
so a request on a log of millions of events costs the same as on a small one, and says
when the bound cut a chain short.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Path, Query

from kernel.events import Recorded
from kernel.http import error_responses
from kernel.kernel import Kernel

__all__ = ["build_router", "related"]

#: How many events a chain may have before it is cut (a loop guard).
MAX_CHAIN = 200


async def related(kernel: Kernel, position: int, window: int) -> dict[str, Any]:
    start = max(0, position - window - 1)
    before = await kernel.read(after=start, limit=window + 1)
    target = next((r for r in before if r.position == position), None)
    if target is None:
        raise HTTPException(status_code=404, detail=f"no event at position {position}")
    after = await kernel.read(after=position, limit=window)
    by_id = {r.meta.id: r for r in before}

    causes: list[Recorded] = []
    cursor = target
    cut = False
    while cursor.meta.causation_id and len(causes) < MAX_CHAIN:
        cause = by_id.get(cursor.meta.causation_id)
        if cause is None:
            cut = True  # caused by an event older than the window
            break
        causes.append(cause)
        cursor = cause
    causes.reverse()

    effects: list[Recorded] = []
    reached = {target.meta.id}
    for r in after:
        if r.meta.causation_id in reached and len(effects) < MAX_CHAIN:
            effects.append(r)
            reached.add(r.meta.id)

    correlation = target.meta.correlation_id
    correlated = (
        [r for r in [*before, *after] if r.meta.correlation_id == correlation][:MAX_CHAIN]
        if correlation
        else []
    )
    return {
        "event": target.to_dict(),
        "causes": [r.to_dict() for r in causes],
        "effects": [r.to_dict() for r in effects],
        "correlated": [r.to_dict() for r in correlated],
        "window": window,
        "causes_cut_by_window": cut,
        "effects_cut_by_window": len(after) == window,
    }


def build_router(kernel: Kernel) -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.get(
        "/events/{position}/related",
        summary="What caused an event and what it caused in turn",
        responses=error_responses(404),
    )
    async def event_related(
        position: int = Path(ge=1, le=2**63 - 1, description="the event's position"),
        window: int = Query(5000, ge=1, le=50_000, description="events read on each side"),
    ) -> dict[str, Any]:
        return await related(kernel, position, window)

    return router
