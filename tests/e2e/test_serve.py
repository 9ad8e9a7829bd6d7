"""`xcore serve` end to end: a real uvicorn server, output sent to a regular file."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import httpx

from tests.e2e.server import serve

TOKEN = "e2e-admin-token-0123456789"


def test_serve_answers_health_and_logs_to_a_regular_file(tmp_path: Path) -> None:
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["status"] == "ok"
        assert body["components"]["store"]["ok"] is True
        kernel = httpx.get(
            f"{server.url}/admin/kernel", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
        )
        assert kernel.status_code == 200
        assert "admin" in kernel.json()["services"]
        events = httpx.get(
            f"{server.url}/admin/events",
            params={"type": "KernelStarted"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        ).json()["events"]
        assert events[0]["data"]["boot"] == kernel.json()["boot"]
    # uvicorn stops cleanly on SIGTERM, then re-raises it: -15 is a clean stop
    assert server.process.returncode in (0, -15)
    output = server.output()
    assert "kernel started" in output
    assert "kernel stopped" in output
    assert TOKEN not in output  # the configured secret is never logged


def test_a_generated_admin_token_is_printed_once_and_stored_hashed(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        match = re.search(r"shown only this once\):\s+(\S+)", server.output())
        assert match, server.output()
        token = match.group(1)
        ok = httpx.get(
            f"{server.url}/admin/kernel", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert ok.status_code == 200
    hash_file = server.data_dir / "admin-token.sha256"
    assert stat.S_IMODE(hash_file.stat().st_mode) == 0o600
    assert token not in hash_file.read_text()
    assert server.output().count(token) == 1

    # a restart keeps the same token and does not print it again
    with serve(tmp_path) as again:
        ok = httpx.get(
            f"{again.url}/admin/kernel", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert ok.status_code == 200
        assert "shown only this once" not in again.output()


def test_a_bad_setting_stops_serve_with_the_key_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kernel.cli", "serve", "--data-dir", str(tmp_path)],
        env={"XCORE_PORT": "eighty", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "XCORE_PORT" in proc.stderr
    assert "'port'" in proc.stderr
