"""``GET /admin/nodes``: every node of the cluster as this node's projection has it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

if TYPE_CHECKING:
    from services.cluster.service import ClusterService

__all__ = ["build_router"]


def build_router(service: ClusterService) -> APIRouter:
    router = APIRouter(tags=["cluster"])

    @router.get("/nodes", summary="The cluster's nodes, heartbeats, plugins and runs")
    async def nodes() -> dict[str, Any]:
        return service.describe()

    @router.get("/nodes/{node}", summary="One node of the cluster")
    async def one(node: str) -> dict[str, Any]:
        for row in service.describe()["nodes"]:
            if row["node"] == node:
                return dict(row)
        raise HTTPException(404, f"no node {node!r} in the cluster")

    return router
