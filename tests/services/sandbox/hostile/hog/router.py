from fastapi import APIRouter

router = APIRouter()
hoard: list[bytearray] = []


@router.get("/attack")
def attack() -> dict[str, int]:
    while True:
        hoard.append(bytearray(8 * 1024 * 1024))
