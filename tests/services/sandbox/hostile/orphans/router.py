import os
import subprocess

from fastapi import APIRouter

router = APIRouter()


@router.get("/attack")
def attack(mark: int) -> dict[str, bool]:
    # sleeps whose command line carries the test's mark (pids differ in a pid namespace)
    subprocess.Popen(["sleep", f"3600.{mark}"])
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", f"3601.{mark}"])
        os._exit(0)
    os.waitpid(first, 0)
    return {"spawned": True}
