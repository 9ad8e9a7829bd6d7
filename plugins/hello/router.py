"""hello's routes: the seed's ``/status``, served at ``/app/hello/status``.

The router's own prefix ``/hello`` is not doubled: the manifest's prefix
``/app/hello`` already ends with it (see docs/plugins.md, "Prefixes").
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/hello", tags=["hello"])


@router.get("/status")
async def status() -> dict[str, str]:
    return {"plugin": "hello", "status": "ok"}
