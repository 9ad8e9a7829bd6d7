"""jobs' routes: ``GET /app/jobs/status`` shows what its tasks did."""

from __future__ import annotations

from fastapi import APIRouter

from .run import STATE

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/status")
async def status() -> dict[str, float]:
    return dict(STATE)
