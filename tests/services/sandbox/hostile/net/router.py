import socket

from fastapi import APIRouter

router = APIRouter()


@router.get("/attack")
def attack(port: int) -> dict[str, str]:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(b"GET /health/live HTTP/1.0\r\n\r\n")
            return {"result": "connected: " + s.recv(200).decode("latin-1")}
    except OSError as exc:
        return {"result": f"refused: {type(exc).__name__}: {exc}"}
