"""A SIGTERM ends ``xcore serve`` within its stop grace, whatever plugin code is stuck.

A real ``xcore serve``: the plugin ``slow`` blocks its import while a file the test holds
exists (``import_timeout`` raised far beyond the test), so the loader's request in hand
never ends by itself. The stop gives it up after ``stop_grace`` and the process exits
while the import is still held; after a restart the request reads ``abandoned`` (it never
ran to its end, so it is never reported as succeeded).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import httpx

from .server import free_port, serve
from .test_reload_queue import AUTH, TOKEN, held, plugin, until

ENV = {
    "XCORE_ADMIN_TOKEN": TOKEN,
    "XCORE_SERVICES__LOADER__IMPORT_TIMEOUT": "600",
    "XCORE_SERVICES__LOADER__HOOK_TIMEOUT": "600",
    "XCORE_STOP_GRACE": "2",
}


async def test_sigterm_ends_the_server_while_a_reload_import_is_stuck(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    plugin(plugins, "slow", run=held(hold))
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(120):
                hold.touch()
                r = await client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
                assert r.status_code == 202, r.text
                request = r.json()
                await until(client, request["url"], "running")
                server.process.send_signal(signal.SIGTERM)
                # the import is still held (and would be for 600 s): the stop does not wait
                code = await anyio.to_thread.run_sync(server.process.wait)
                assert hold.exists()
                assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    hold.unlink()
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(60):
                body = (await client.get(request["url"], headers=AUTH)).json()
                assert (body["status"], body["stage"]) == ("failed", "abandoned"), body


async def test_sigterm_ends_the_server_while_an_unload_hook_is_stuck(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    plugin(
        plugins,
        "sticky",
        run=f"""
        import pathlib, time

        def on_unload(ctx):
            pathlib.Path({str(tmp_path / "unloading")!r}).touch()
            while pathlib.Path({str(hold)!r}).exists():
                time.sleep(0.01)
        """,
    )
    hold.touch()
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        with anyio.fail_after(120):
            server.process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(server.process.wait)
            assert (tmp_path / "unloading").exists(), server.output()
            assert hold.exists()
            assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), server.output()
    hold.unlink()


async def test_sigterm_ends_the_server_while_its_boot_import_is_stuck(tmp_path: Path) -> None:
    """uvicorn acts on a signal only once the start is over: the watchdog ends a start
    still held by a plugin's import ``stop_grace`` after the signal."""
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    importing = tmp_path / "importing"
    plugin(plugins, "slow", run=f"import pathlib\npathlib.Path({str(importing)!r}).touch()\n")
    (plugins / "slow" / "run.py").write_text(
        (plugins / "slow" / "run.py").read_text() + textwrap.dedent(held(hold))
    )
    hold.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
    env.update(ENV)
    with (tmp_path / "serve.log").open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kernel.cli",
                "serve",
                "--port",
                str(free_port()),
                "--data-dir",
                str(tmp_path / "var"),
                "--plugins-dir",
                str(plugins),
                "--no-reload",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    try:
        with anyio.fail_after(120):
            while not importing.exists():
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                await anyio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(proc.wait)
        assert hold.exists()
        assert code == 128 + signal.SIGTERM, (tmp_path / "serve.log").read_text()
        assert "the start is still under way" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hold.unlink()
