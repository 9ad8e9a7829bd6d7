"""shouter's routes, served at ``/app/shouter/v1/...`` (router prefix kept below)."""

from __future__ import annotations

from fastapi import APIRouter

from .loud import loud

router = APIRouter(prefix="/v1", tags=["shouter"])


@router.get("/shout/{text}")
async def shout(text: str) -> dict[str, str]:
    return {"shout": loud(text)}
