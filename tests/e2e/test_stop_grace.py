"""A SIGTERM ends ``xcore serve`` within its stop grace, whatever plugin code is stuck.

A real ``xcore serve``: the plugin ``slow`` blocks its import while a file the test holds
exists (``import_timeout`` raised far beyond the test), so the loader's request in hand
never ends by itself. The stop gives it up after ``stop_grace`` and the process exits
while the import is still held; after a restart the request reads ``abandoned`` (it never
ran to its end, so it is never reported as succeeded).
"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import httpx

from .server import serve
from .test_reload_queue import AUTH, TOKEN, plugin, until

ENV = {
    "XCORE_ADMIN_TOKEN": TOKEN,
    "XCORE_SERVICES__LOADER__IMPORT_TIMEOUT": "600",
    "XCORE_SERVICES__LOADER__HOOK_TIMEOUT": "600",
    "XCORE_STOP_GRACE": "2",
}


def held(hold: Path) -> str:
    return f"""
    import pathlib, time
    while pathlib.Path({str(hold)!r}).exists():
        time.sleep(0.01)
    """


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
