"""Hostile plugins against a real ``xcore serve``, at both isolation levels.

For each attack: the other plugins (one sandboxed, one trusted) keep answering over HTTP
while it runs, the right event is recorded, nothing of the kernel's is readable, and the
plugin serves again after a reload once its code is fixed. The plugins live in
``tests/services/sandbox/hostile/``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from services.sandbox.cgroup import pids_folders, pids_possible
from services.sandbox.isolation import bwrap_works, worker_user
from tests.e2e.server import Server, serve

HOSTILE = Path(__file__).parent / "hostile"
TOKEN = "hostile-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIXED = """
from fastapi import APIRouter

router = APIRouter()


@router.get("/ok")
async def ok() -> dict[str, bool]:
    return {"fixed": True}
"""


@pytest.fixture(scope="module", params=["rlimits", "bwrap"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Server, str, Path]]:
    level = str(request.param)
    if level == "bwrap" and (problem := bwrap_works()) is not None:
        if os.environ.get("XCORE_TEST_REQUIRE_BWRAP") == "1":
            pytest.fail(f"bubblewrap is required here: {problem}")
        pytest.skip(problem)
    base = Path(tempfile.mkdtemp(prefix="xcore-hostile-"))
    base.chmod(0o755)
    plugins = base / "plugins"
    plugins.mkdir()
    for name in ("calm", "plain"):
        shutil.copytree(HOSTILE / name, plugins / name)
    env = {
        "XCORE_ADMIN_TOKEN": TOKEN,
        "XCORE_RELOAD": "false",
        "XCORE_SERVICES__SANDBOX__LEVEL": level,
        "XCORE_SERVICES__SANDBOX__HEARTBEAT_TIMEOUT_S": "5",
        "XCORE_SERVICES__SANDBOX__RESTART_BACKOFF_S": "0.1",
        "XCORE_SERVICES__SANDBOX__CANCEL_GRACE_S": "0.5",
        "KERNEL_SECRET_CANARY": "canary-0123456789",
    }
    try:
        with serve(base, plugins_dir=plugins, env=env, timeout=60) as srv:
            yield srv, level, plugins
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def events(client: httpx.AsyncClient, type_: str, plugin: str) -> list[dict[str, Any]]:
    r = await client.get("/admin/events", params={"type": type_, "limit": 5000}, headers=AUTH)
    assert r.status_code == 200, r.text
    return [
        e
        for e in r.json()["events"]
        if plugin in (e["data"].get("plugin"), e["data"].get("name"))
        or str(e["data"].get("task", "")).startswith(plugin + ".")
    ]


async def wait_event(client: httpx.AsyncClient, type_: str, plugin: str) -> dict[str, Any]:
    with anyio.fail_after(60):
        while True:
            found = await events(client, type_, plugin)
            if found:
                return found[-1]
            await anyio.sleep(0.1)


async def attack(
    srv: Server, plugins: Path, name: str, trigger: Any, event: str
) -> tuple[dict[str, Any], Any]:
    """Install ``name``, run ``trigger`` while the others are polled, await ``event``,
    then fix the plugin, reload it and check it serves."""
    shutil.copytree(HOSTILE / name, plugins / name)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        loaded = await client.post(f"/admin/plugins/{name}/reload", headers=AUTH)
        assert loaded.status_code == 200, loaded.text
        outcome: dict[str, Any] = {}
        polled = 0
        async with anyio.create_task_group() as tg:

            async def hit() -> None:
                outcome["result"] = await trigger(client)

            tg.start_soon(hit)
            recorded = None
            with anyio.fail_after(60):
                while recorded is None or "result" not in outcome:
                    for other in ("/app/calm/ok", "/app/plain/ok"):
                        r = await client.get(other, timeout=10)
                        assert r.status_code == 200, (other, r.text)
                        polled += 1
                    if recorded is None:
                        found = await events(client, event, name)
                        recorded = found[-1] if found else None
                    await anyio.sleep(0.05)
        assert polled >= 2
        (plugins / name / "router.py").write_text(FIXED)
        fixed = await client.post(f"/admin/plugins/{name}/reload", headers=AUTH)
        assert fixed.status_code == 200, fixed.text
        again = await client.get(f"/app/{name}/ok")
        assert again.status_code == 200 and again.json() == {"fixed": True}
        return recorded, outcome["result"]


async def test_memory_hog(server: Any) -> None:
    srv, _, plugins = server
    recorded, result = await attack(
        srv, plugins, "hog", lambda c: c.get("/app/hog/attack"), "SandboxLimitExceeded"
    )
    assert recorded["data"]["limit"] == "memory"
    assert recorded["data"]["value"] == 600 * 1024 * 1024
    assert result.status_code in (500, 502)


def only_bwrap(level: str, why: str) -> None:
    """Keep the suite short: what the level does not change is tested once."""
    if level != "bwrap":
        pytest.skip(why)


async def test_endless_loop_in_a_route(server: Any) -> None:
    srv, level, plugins = server
    only_bwrap(level, "the rlimits level: test_supervision.py::test_a_wall_time_breach...")
    recorded, result = await attack(
        srv, plugins, "spin", lambda c: c.get("/app/spin/attack"), "SandboxLimitExceeded"
    )
    assert recorded["data"]["limit"] == "wall"
    assert recorded["data"]["value"] == 2
    assert result.status_code == 504


async def test_endless_loop_in_a_task(server: Any) -> None:
    srv, level, plugins = server
    only_bwrap(level, "the rlimits level: test_tasks.py::test_a_task_timeout...")

    async def run(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/admin/tasks/taskspin.attack/run", headers=AUTH)

    recorded, result = await attack(srv, plugins, "taskspin", run, "SandboxLimitExceeded")
    assert recorded["data"]["limit"] == "timeout"
    assert result.status_code in (200, 202), result.text
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        failed = await wait_event(client, "TaskFailed", "taskspin")
        assert failed["data"]["kind"] == "timeout"


async def test_fork_bomb(server: Any) -> None:
    srv, level, plugins = server
    root = os.getuid() == 0 and worker_user("auto", "rlimits") is None
    if level == "rlimits" and root and not pids_possible():
        pytest.skip("workers keep root here (Python is private to root) and no pids cgroup")
    recorded, _ = await attack(
        srv, plugins, "bomb", lambda c: c.get("/app/bomb/attack"), "SandboxLimitExceeded"
    )
    assert recorded["data"]["limit"] in ("processes", "wall")
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        [started, *_] = reversed(await events(client, "SandboxStarted", "bomb"))
    if pids_possible():
        # held by the cgroup even for a root worker (never past its allowance), and its
        # processes are gone with it
        assert started["data"]["process_limit"] == "pids-cgroup", started
        assert recorded["data"]["limit"] == "processes", recorded
        found = re.search(r"reached (\d+) processes, (\d+) threads", recorded["data"]["detail"])
        assert found is not None, recorded
        allowed = int(recorded["data"]["value"]) + 3
        assert int(found[1]) <= allowed and int(found[2]) <= allowed, recorded
        [folder] = [p for p in pids_folders() if p.name == f"xcore-sandbox-{srv.process.pid}"]
        assert not await anyio.Path(folder / f"w{recorded['data']['pid']}").exists()
    else:
        assert started["data"]["process_limit"] == ("watch" if root else "rlimit"), started


async def test_exit_at_import(server: Any) -> None:
    srv, _, plugins = server
    shutil.copytree(HOSTILE / "quitter", plugins / "quitter")
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        r = await client.post("/admin/plugins/quitter/reload", headers=AUTH)
        assert r.status_code == 422
        assert "exit code 1" in r.json()["detail"]
        assert (await client.get("/app/calm/ok")).status_code == 200
        (plugins / "quitter" / "run.py").write_text(
            "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/quitter', 'mode': 'sandboxed'}\n"
        )
        (plugins / "quitter" / "router.py").write_text(FIXED)
        assert (await client.post("/admin/plugins/quitter/reload", headers=AUTH)).status_code == 200
        assert (await client.get("/app/quitter/ok")).json() == {"fixed": True}


async def test_reading_the_kernels_environment_and_files(server: Any) -> None:
    srv, level, plugins = server
    data = srv.data_dir
    paths = [data / "admin-token.sha256", data / "events.db", srv.log]
    if level == "bwrap":
        paths.append(Path("/root/.bash_history"))
    query = {"kernel_pid": srv.process.pid, "paths": ",".join(str(p) for p in paths)}
    recorded, result = await attack(
        srv, plugins, "snoop", lambda c: c.get("/app/snoop/attack", params=query), "SandboxStarted"
    )
    body = result.json()
    assert result.status_code == 200, body
    assert "canary-0123456789" not in repr(body["env"])
    assert "XCORE_ADMIN_TOKEN" not in body["env"]
    assert TOKEN not in result.text
    files = body["files"]
    if body["uid"] == 0:
        # rlimits level where Python is private to root: the worker keeps root (the
        # kernel logs a warning saying so); only the environment is isolated
        assert level == "rlimits"
        return
    assert "canary-0123456789" not in result.text
    assert files[f"/proc/{srv.process.pid}/environ"].startswith("refused")
    assert files[str(data / "admin-token.sha256")].startswith("refused")
    if level == "bwrap":
        assert recorded["data"]["level"] == "bwrap"
        assert body["uid"] != 0
        for path in paths:
            assert files[str(path)].startswith("refused"), path


async def test_huge_file_write(server: Any) -> None:
    srv, _, plugins = server
    recorded, result = await attack(
        srv, plugins, "bigfile", lambda c: c.get("/app/bigfile/attack"), "SandboxLimitExceeded"
    )
    assert recorded["data"]["limit"] == "file_size"
    assert recorded["data"]["value"] == 8 * 1024 * 1024
    assert result.status_code == 502


async def test_socket_to_localhost_at_the_namespace_level(server: Any) -> None:
    srv, level, plugins = server
    if level != "bwrap":
        pytest.skip("the rlimits level has no network namespace")
    port = srv.url.rsplit(":", 1)[1]
    recorded, result = await attack(
        srv,
        plugins,
        "net",
        lambda c: c.get("/app/net/attack", params={"port": port}),
        "SandboxStarted",
    )
    assert recorded["data"]["network"] is False
    assert result.json()["result"].startswith("refused"), result.text


async def test_stdout_flood(server: Any) -> None:
    srv, level, plugins = server
    only_bwrap(level, "the flood goes through the same pipe at both levels")
    before = srv.log.stat().st_size
    recorded, result = await attack(
        srv, plugins, "flood", lambda c: c.get("/app/flood/attack"), "SandboxLimitExceeded"
    )
    assert recorded["data"]["limit"] == "wall"
    assert result.status_code == 504
    # the flood is rate-limited on its way to the kernel's log
    assert srv.log.stat().st_size - before < 2_000_000
