from fastapi import APIRouter

router = APIRouter()


@router.get("/attack")
def attack() -> None:
    line = "flood " * 20
    while True:
        print(line)
