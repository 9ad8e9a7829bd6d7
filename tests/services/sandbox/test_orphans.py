"""No process of a sandboxed plugin outlives the kernel: not a child in the worker's
process group, not a daemon that double-forked into a session of its own, whether the
kernel stops (SIGTERM) or is killed (SIGKILL), at both isolation levels."""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.e2e.server import serve

HOSTILE = Path(__file__).parent / "hostile"


def marked(mark: int) -> list[int]:
    """Pids of the processes whose command line carries ``mark``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if f".{mark}\0".encode() in cmdline and cmdline.startswith(b"sleep\0"):
                found.append(int(entry))
    return found


@pytest.fixture
def base() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="xcore-orphans-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_no_process_of_a_plugin_outlives_the_kernel(
    base: Path, level: str, how: signal.Signals
) -> None:
    if level == "bwrap" and how == signal.SIGTERM:
        pytest.skip("a stop kills the worker's pid namespace: the SIGKILL case is the hard one")
    plugins = base / "plugins"
    plugins.mkdir()
    shutil.copytree(HOSTILE / "orphans", plugins / "orphans")
    mark = random.randrange(10**8, 10**9)
    env = {
        "XCORE_ADMIN_TOKEN": "orphans-admin-token-0123456789",
        "XCORE_RELOAD": "false",
        "XCORE_SERVICES__SANDBOX__LEVEL": level,
    }
    try:
        with serve(base, plugins_dir=plugins, env=env, timeout=60) as srv:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                r = await client.get("/app/orphans/attack", params={"mark": mark})
                assert r.status_code == 200, r.text
            # the double-forked daemon execs its sleep after the request has answered
            # (the handler waits only for the first fork): wait for both to show
            with anyio.fail_after(60):
                while len(marked(mark)) < 2:
                    await anyio.sleep(0.05)
            assert len(marked(mark)) == 2
            srv.process.send_signal(how)
            with anyio.fail_after(60):
                while srv.process.poll() is None:
                    await anyio.sleep(0.05)
                while left := marked(mark):
                    await anyio.sleep(0.05)
            assert left == []
    finally:
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)
