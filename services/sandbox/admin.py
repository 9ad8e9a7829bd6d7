"""The sandbox's admin API (under ``/admin``, behind the admin guard).

    GET /admin/sandbox           isolation level and every sandboxed plugin's worker
    GET /admin/sandbox/{name}    one plugin: state, level, limits, pid, RSS, CPU, calls,
                                 restarts, last exit, the tail of its stderr

The same view is added to the plugin's row of ``/admin/plugins`` (key ``host``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

if TYPE_CHECKING:
    from .service import SandboxService

__all__ = ["admin_router"]


def admin_router(service: SandboxService) -> APIRouter:
    router = APIRouter(tags=["sandbox"])

    @router.get("/sandbox", summary="Sandbox level and every sandboxed plugin's worker")
    async def overview() -> dict[str, Any]:
        return {"level": service.level, "plugins": service.all()}

    @router.get("/sandbox/{name}", summary="One sandboxed plugin's worker, limits and stats")
    async def one(name: str) -> dict[str, Any]:
        found = service.describe(name)
        if found is None:
            raise HTTPException(404, f"no sandboxed plugin named {name!r} is loaded")
        return found

    return router
