"""A task is known to the admin API as soon as the reload that declared it has answered.

The scheduler registers a plugin's tasks in its own subscription, a step after the
loader answers the reload. A plugin with thousands of schedules makes that step long
enough that a run asked right after the reload (a script, the CLI) came before it and
was refused as "no task".
"""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx

from tests.e2e.server import serve

TOKEN = "reload-then-run-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

RUN = """
from kernel.sdk import task

PLUGIN_INFO = {"version": "1.0.0", "author": "tests", "api_prefix": "/app/busy"}


@task(every="1h", schedules=[{"name": f"many-{i}"} for i in range(3000)])
async def many() -> None:
    pass


@task(every="1h")
async def target() -> str:
    return "ran"
"""


async def test_a_task_declared_by_a_reload_can_be_run_as_soon_as_the_reload_answers(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    with serve(tmp_path, plugins_dir=plugins, env={"XCORE_ADMIN_TOKEN": TOKEN}) as srv:
        folder = plugins / "busy"
        folder.mkdir()
        (folder / "run.py").write_text(RUN)
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=60) as client:
            with anyio.fail_after(120):
                loaded = await client.post("/admin/plugins/busy/reload")
                assert loaded.status_code == 200, loaded.text
                detail = await client.get("/admin/tasks/busy.target")
                assert detail.status_code == 200, detail.text
                ran = await client.post("/admin/tasks/busy.target/run")
                assert ran.status_code in (200, 202), ran.text
