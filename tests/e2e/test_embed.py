"""An existing FastAPI app embeds the kernel through its lifespan, served by real uvicorn."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from tests.e2e.server import free_port

APP = """
from fastapi import FastAPI
from kernel import Kernel, Settings

kernel = Kernel(Settings(data_dir="var", plugins_dir="plugins", admin_token="embedded-token-0123456789"))
app = FastAPI(lifespan=kernel.lifespan)

@app.get("/mine")
async def mine() -> dict[str, str]:
    return {"owner": "the app"}
"""


CLASH_RUN = """
PLUGIN_INFO = {"version": "1.0.0", "author": "test", "api_prefix": "/mine"}
"""
CLASH_ROUTER = """
from fastapi import APIRouter
router = APIRouter()

@router.get("")
async def stolen() -> dict[str, str]:
    return {"owner": "the plugin"}
"""


def test_an_app_embeds_the_kernel_in_two_lines(tmp_path: Path) -> None:
    clash = tmp_path / "plugins" / "clash"
    clash.mkdir(parents=True)
    (clash / "__init__.py").write_text("")
    (clash / "run.py").write_text(CLASH_RUN)
    (clash / "router.py").write_text(CLASH_ROUTER)
    (tmp_path / "myapp.py").write_text(textwrap.dedent(APP))
    port = free_port()
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "myapp:app", "--port", str(port)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/mine", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # a plugin claiming the app's own path is refused; the app keeps it
        assert httpx.get(f"{url}/mine").json() == {"owner": "the app"}
        health = httpx.get(f"{url}/health")
        # the refused plugin degrades the node, it does not fail it
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["degraded"] == ["plugins"]
        assert httpx.get(f"{url}/admin/kernel").status_code == 401
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        assert "/mine" in paths
        assert "/health" in paths
        assert httpx.get(f"{url}/nothing-here").status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # the kernel stopped with the app: its log says so
    conn = sqlite3.connect(tmp_path / "var" / "events.db")
    types = [row[0] for row in conn.execute("SELECT type FROM events WHERE stream = 'kernel'")]
    conn.close()
    assert types[0] == "KernelStarted"
    assert types[-1] == "KernelStopped"
    conn = sqlite3.connect(tmp_path / "var" / "events.db")
    failed = [
        row[0] for row in conn.execute("SELECT data FROM events WHERE type = 'PluginLoadFailed'")
    ]
    conn.close()
    assert len(failed) == 1
    assert b"clash" in failed[0]
    assert b"/mine" in failed[0]
