"""A plugin that blocks the event loop cannot keep `xcore serve` from stopping.

A real server, a route that spins without ever awaiting: the watchdog names the plugin,
file and line in the log while the loop is blocked, and a SIGTERM the loop cannot act
on ends the process after ``stop_grace`` (logs flushed first).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.server import serve

ROUTER = """from fastapi import APIRouter
router = APIRouter()

@router.get("/spin")
async def spin():
    while True:  # never awaits: the event loop is stuck here
        pass
"""


def test_sigterm_ends_a_server_whose_loop_is_blocked(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    folder = plugins / "spinner"
    folder.mkdir(parents=True)
    (folder / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/spin'}\n"
    )
    (folder / "router.py").write_text(ROUTER)
    env = {
        "XCORE_ADMIN_TOKEN": "e2e-admin-token-0123456789",
        "XCORE_LOOP_BLOCK_THRESHOLD": "0.3",
        "XCORE_STOP_GRACE": "1",
    }
    with serve(tmp_path, plugins_dir=plugins, env=env) as server:
        assert httpx.get(f"{server.url}/app/spin/x", timeout=5).status_code == 404

        def hit() -> None:
            with contextlib.suppress(httpx.HTTPError):  # it never answers
                httpx.get(f"{server.url}/app/spin/spin", timeout=2)

        threading.Thread(target=hit, daemon=True).start()
        deadline = time.monotonic() + 30
        # (a loaded machine may block the loop briefly at boot too: wait for this block)
        while "blocked for more than 0.3s by plugin 'spinner'" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        assert server.process.returncode == 128 + signal.SIGTERM, server.output()
    output = server.output()
    assert "by plugin 'spinner' router.py line 6" in output
    assert "ending the process" in output
