"""The admin routes and the ``xcore task`` CLI against a real uvicorn server."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import Header, HTTPException

from kernel import Kernel, Service, Settings, create_app
from services.scheduler.service import SchedulerService

from .helpers import spec, wait_events

TOKEN = "scheduler-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def bearer_guard(authorization: str | None = Header(default=None)) -> None:
    """Stand-in for the admin service's guard (same header), used only while it is absent."""
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(status_code=401, detail="missing or wrong admin token")


async def job() -> None:
    await asyncio.sleep(0)


async def hourly() -> None:
    pass


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Kernel, SchedulerService, str]]:
    scheduler = SchedulerService()
    services: list[Service] = [scheduler]
    try:
        from services.admin.service import AdminService

        services.append(AdminService())
    except ImportError:
        pass
    settings = Settings(data_dir=tmp_path, node="t", admin_token=TOKEN, reload=False)
    kernel = Kernel(settings, services=services)
    if len(services) == 1:
        kernel.http.set_admin_guard(bearer_guard)
    app = create_app(kernel)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    try:
        with anyio.fail_after(10):
            while not srv.started:
                assert not task.done(), "uvicorn stopped before it started"
                await anyio.sleep(0.01)
        await scheduler.register("web", [spec(job, every="1h"), spec(hourly, cron="0 * * * *")])
        yield kernel, scheduler, f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        with anyio.fail_after(10):
            await task
        sock.close()


async def test_admin_table_detail_run_pause_resume(server: Any) -> None:
    kernel, _, url = server
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        assert (await client.get("/admin/tasks")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.post("/admin/tasks/web.job/run", headers=wrong)).status_code == 401

        await kernel.settle()
        rows = (await client.get("/admin/tasks", headers=AUTH)).json()
        assert [r["id"] for r in rows] == ["web.hourly", "web.job"]
        job_row = rows[1]
        assert job_row["trigger"] == "every 3600s" and job_row["next_run"] is not None
        assert job_row["paused"] is False and job_row["successes"] == 0

        resp = await client.post("/admin/tasks/web.job/run", headers=AUTH)
        assert resp.status_code == 202 and resp.json()["outcome"] == "TaskRunAccepted"
        assert resp.json()["queue_position"] == 0
        run_id = resp.json()["run_id"]
        await wait_events(kernel, "TaskSucceeded")
        await kernel.settle()
        detail = (await client.get("/admin/tasks/web.job", headers=AUTH)).json()
        assert detail["successes"] == 1 and detail["last_outcome"] == "succeeded"
        assert detail["recent_runs"][0]["run_id"] == run_id
        assert detail["recent_runs"][0]["trigger"] == "request"
        assert detail["mean_duration_ms"] is not None

        resp = await client.post("/admin/tasks/web.job/pause", headers=AUTH)
        assert resp.json()["outcome"] == "TaskPaused"
        await kernel.settle()
        assert (await client.get("/admin/tasks/web.job", headers=AUTH)).json()["paused"] is True
        resp = await client.post("/admin/tasks/web.job/resume", headers=AUTH)
        assert resp.json()["outcome"] == "TaskResumed"

        # the requests are in the log, with who asked
        requests = await kernel.read(types=["TaskRunRequested", "TaskPauseRequested"])
        assert all(r.meta.actor and r.meta.actor.startswith("admin") for r in requests)

        before = await kernel.store.last_position()
        assert (await client.post("/admin/tasks/web.nope/run", headers=AUTH)).status_code == 404
        assert (await client.get("/admin/tasks/web.nope", headers=AUTH)).status_code == 404
        assert await kernel.store.last_position() == before  # bad input changes nothing


async def test_cli_list_and_run(server: Any) -> None:
    kernel, _, url = server
    env = {**os.environ, "XCORE_ADMIN_TOKEN": TOKEN}
    xcore = str(Path(sys.executable).with_name("xcore"))

    def cli(*args: str, token_env: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [xcore, "task", "--url", url, *args],
            capture_output=True,
            text=True,
            env=env if token_env else {k: v for k, v in env.items() if k != "XCORE_ADMIN_TOKEN"},
            timeout=30,
        )

    listed = await anyio.to_thread.run_sync(cli, "list")
    assert listed.returncode == 0, listed.stderr
    assert "web.job" in listed.stdout and "every 3600s" in listed.stdout
    ran = await anyio.to_thread.run_sync(cli, "run", "web.hourly")
    assert ran.returncode == 0, ran.stderr
    assert '"outcome": "TaskRunAccepted"' in ran.stdout
    await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "web.hourly")
    missing = await anyio.to_thread.run_sync(cli, "run", "web.nothing")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    no_token = await anyio.to_thread.run_sync(lambda: cli("list", token_env=False))
    assert no_token.returncode == 1 and "no admin token" in no_token.stderr
