"""Admin routes of the kernel itself: its description and the event log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query

from kernel.http import error_responses, link
from kernel.kernel import Kernel

__all__ = ["build_router"]


def build_router(kernel: Kernel) -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.get("/kernel", summary="This kernel: node, boot, version, services, projections")
    async def describe() -> dict[str, Any]:
        return {**kernel.describe(), "last_position": await kernel.store.last_position()}

    @router.get(
        "/events",
        summary="Read the event log",
        responses={
            200: {
                "links": {
                    "GetFirstEvent": link(
                        "/admin/events/{position}",
                        "get",
                        position="$response.body#/events/0/position",
                    )
                }
            }
        },
    )
    async def events(
        after: int = Query(0, ge=0, description="return events after this position"),
        limit: int = Query(100, ge=1, le=5000),
        type: list[str] = Query([], description="only these event types (repeatable)"),
        stream: str | None = Query(None, description="only this stream"),
    ) -> dict[str, Any]:
        records = await kernel.read(after=after, types=type or None, stream=stream, limit=limit)
        return {
            "events": [r.to_dict() for r in records],
            "next_after": records[-1].position if records else after,
            "last_position": await kernel.store.last_position(),
        }

    @router.get(
        "/events/{position}", summary="One event by its position", responses=error_responses(404)
    )
    async def event(position: int) -> dict[str, Any]:
        records = await kernel.read(after=position - 1, limit=1) if position > 0 else []
        if not records or records[0].position != position:
            raise HTTPException(status_code=404, detail=f"no event at position {position}")
        return records[0].to_dict()

    return router
