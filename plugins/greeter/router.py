"""greeter's routes: no router prefix, so they sit right under ``/app/greeter``."""

from __future__ import annotations

from fastapi import APIRouter

from . import state

router = APIRouter(tags=["greeter"])


@router.get("/greet/{name}")
async def greet(name: str) -> dict[str, str]:
    return {"message": state.greet(name)}
