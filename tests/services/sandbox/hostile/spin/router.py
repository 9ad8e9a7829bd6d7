from fastapi import APIRouter

router = APIRouter()


@router.get("/attack")
async def attack() -> None:
    while True:
        pass
