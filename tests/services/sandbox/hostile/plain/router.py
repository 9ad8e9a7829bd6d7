from fastapi import APIRouter

router = APIRouter()


@router.get("/ok")
async def ok() -> dict[str, bool]:
    return {"ok": True}
