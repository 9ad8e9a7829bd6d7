"""Several schedules per function with arguments, coalescing policies, results and the
runs listing, run-now acceptance with ``--wait``, and cancelling a run (real server)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kernel import Kernel, Settings
from kernel.sdk import current_task, task
from services.scheduler.events import TaskScheduled, stream_of

from .helpers import make_kernel, spec, wait_events
from .test_admin import AUTH, TOKEN, server  # noqa: F401  (the fixture)


async def test_stacked_and_listed_schedules_each_have_an_id_and_arguments(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, str, int]] = []

    @task(after=0, args=["eu"], kwargs={"level": 1})
    @task(after=0, args=["us"], kwargs={"level": 2})
    async def report(region: str, level: int = 0) -> None:
        calls.append((current_task().task_id, region, level))

    async def sync(region: str) -> str:
        calls.append((current_task().task_id, region, 0))
        return region

    listed = spec(
        sync,
        name="sync",
        schedules=[{"after": 0, "args": ["a"]}, {"name": "sync-b", "after": 0, "args": ["b"]}],
    )
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register("p", [*report.__xcore_tasks__, listed])  # type: ignore[attr-defined]
        assert sorted(result.accepted) == ["p.report", "p.report-2", "p.sync-1", "p.sync-b"]
        await wait_events(kernel, "TaskSucceeded", 4)
        assert sorted(calls) == [
            ("p.report", "us", 2),
            ("p.report-2", "eu", 1),
            ("p.sync-1", "a", 0),
            ("p.sync-b", "b", 0),
        ]
        # arguments that do not fit the function are refused at registration
        bad = await service.register("q", [spec(sync, after=0, kwargs={"nope": 1})])
        assert "args/kwargs do not fit the function" in bad.refused["q.sync"]
        odd = await service.register("r", [spec(sync, after=0, args=[object()])])
        assert "JSON-serializable" in odd.refused["r.sync"]


async def _missed_log(tmp_path: Path, task_id: str, every: float, missed: int) -> float:
    """A log as a process down for ``missed`` periods left it; returns the first due."""
    first = time.time() - every * missed - every / 2
    async with Kernel(Settings(data_dir=tmp_path, node="test")) as kernel:
        await kernel.append(
            TaskScheduled(
                task=task_id,
                plugin=task_id.split(".")[0],
                generation=0,
                trigger=f"every {every:g}s",
                next_run=first,
            ),
            stream=stream_of(task_id),
        )
    return first


@pytest.mark.parametrize("policy", ["earliest", "latest", "all"])
async def test_coalescing_policies_after_downtime(tmp_path: Path, policy: str) -> None:
    due: list[float] = []

    async def work() -> None:
        due.append(current_task().scheduled_for.timestamp())

    first = await _missed_log(tmp_path, "p.work", 60, 5)  # 6 due times passed
    kernel, service = make_kernel(tmp_path, max_catch_up_runs=4)
    async with kernel:
        await service.register("p", [spec(work, every="60s", coalesce=policy)])
        expected = 4 if policy == "all" else 1
        await wait_events(kernel, "TaskSucceeded", expected)
        [missed] = await kernel.read(types=["TaskMissed"])
    assert missed.data["count"] == 6 - expected
    if policy == "earliest":
        expected_due = [first]
    elif policy == "latest":
        expected_due = [first + 5 * 60]
    else:  # the first four, in order, one after the other
        expected_due = [first + i * 60 for i in range(4)]
    assert due == pytest.approx(expected_due, abs=1e-5)


async def test_results_are_kept_size_limited_and_listed_with_pagination(
    server: Any,  # noqa: F811
) -> None:
    kernel, scheduler, url = server

    def answer() -> dict[str, Any]:
        return {"rows": 3, "ok": True}

    async def huge() -> str:
        return "x" * 100_000

    async def odd() -> object:
        return object()

    await scheduler.register(
        "res", [spec(answer, after=0), spec(huge, after=0), spec(odd, after=0)]
    )
    done = {r.data["task"]: r.data for r in await wait_events(kernel, "TaskSucceeded", 3)}
    assert done["res.answer"]["result"] == {"rows": 3, "ok": True}
    assert done["res.huge"]["result"] is None
    assert "too large" in done["res.huge"]["result_error"]
    assert "not JSON-serializable" in done["res.odd"]["result_error"]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(3):
            r = await client.post("/admin/tasks/res.answer/run", headers=AUTH)
            assert r.status_code == 202
        await wait_events(
            kernel, "TaskSucceeded", 4, where=lambda r: r.data["task"] == "res.answer"
        )
        page = (
            await client.get("/admin/tasks/res.answer/runs?limit=2&offset=0", headers=AUTH)
        ).json()
        assert page["total"] == 4 and len(page["runs"]) == 2
        rest = (
            await client.get("/admin/tasks/res.answer/runs?limit=2&offset=2", headers=AUTH)
        ).json()
        ids = [r["run_id"] for r in page["runs"] + rest["runs"]]
        assert len(set(ids)) == 4
        oldest = rest["runs"][-1]
        assert oldest["trigger"] == "schedule" and oldest["status"] == "succeeded"
        assert oldest["result"] == {"rows": 3, "ok": True}
        assert oldest["lateness_ms"] is not None and oldest["duration_ms"] is not None
        one = await client.get(f"/admin/tasks/res.answer/runs/{ids[0]}", headers=AUTH)
        assert one.json()["trigger"] == "request"
        assert (
            await client.get("/admin/tasks/res.answer/runs/nope", headers=AUTH)
        ).status_code == 404
        assert (await client.get("/admin/tasks/res.nope/runs", headers=AUTH)).status_code == 404


async def test_run_now_waits_in_the_queue_and_cli_wait_follows_it(
    server: Any,  # noqa: F811
) -> None:
    kernel, scheduler, url = server
    release = asyncio.Event()

    async def hog() -> None:
        await release.wait()

    async def quick() -> str:
        return "done"

    await scheduler.register("q", [spec(hog, every="1h", max_instances=1), spec(quick, every="1h")])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        first = await client.post("/admin/tasks/q.hog/run", headers=AUTH)
        assert first.status_code == 202 and first.json()["queue_position"] == 0
        await wait_events(kernel, "TaskStarted", where=lambda r: r.data["task"] == "q.hog")
        # the task's only instance is busy: the request is accepted, second in line
        second = await client.post("/admin/tasks/q.hog/run", headers=AUTH)
        assert second.status_code == 202 and second.json()["queue_position"] == 1
        run_id = second.json()["run_id"]
        listed = (await client.get(f"/admin/tasks/q.hog/runs/{run_id}", headers=AUTH)).json()
        assert listed["status"] == "queued"
        release.set()
        await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["run_id"] == run_id)

    env = {**os.environ, "XCORE_ADMIN_TOKEN": TOKEN}
    xcore = str(Path(sys.executable).with_name("xcore"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [xcore, "task", "--url", url, *args], capture_output=True, text=True, env=env,
            timeout=60,
        )  # fmt: skip

    waited = await anyio.to_thread.run_sync(cli, "run", "q.quick", "--wait", "--timeout", "30")
    assert waited.returncode == 0, waited.stderr
    assert '"status": "succeeded"' in waited.stdout and '"result": "done"' in waited.stdout
    runs = await anyio.to_thread.run_sync(cli, "runs", "q.quick")
    assert runs.returncode == 0 and "succeeded" in runs.stdout and "request" in runs.stdout


async def test_cancel_an_async_run_and_refuse_a_sync_one(server: Any) -> None:  # noqa: F811
    kernel, scheduler, url = server
    gate = threading.Event()

    async def forever() -> None:
        await asyncio.sleep(3600)

    def blocking() -> None:
        gate.wait(30)

    await scheduler.register("c", [spec(forever, after=0), spec(blocking, after=0)])
    try:
        started = {
            r.data["task"]: r.data["run_id"]
            for r in await wait_events(kernel, "TaskStarted", 2)
            if r.data["task"].startswith("c.")
        }
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            # a requested run waiting for the busy instance: cancelled before it started
            queued = (await client.post("/admin/tasks/c.forever/run", headers=AUTH)).json()
            assert queued["queue_position"] == 1
            r = await client.post(
                f"/admin/tasks/c.forever/runs/{queued['run_id']}/cancel", headers=AUTH
            )
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            await wait_events(
                kernel, "TaskSkipped", where=lambda e: e.data["run_id"] == queued["run_id"]
            )
            run = await client.get(f"/admin/tasks/c.forever/runs/{queued['run_id']}", headers=AUTH)
            assert run.json()["status"] == "skipped" and "before it started" in run.json()["error"]
            r = await client.post(
                f"/admin/tasks/c.forever/runs/{started['c.forever']}/cancel", headers=AUTH
            )
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            [failed] = await wait_events(
                kernel, "TaskFailed", where=lambda e: e.data["task"] == "c.forever"
            )
            assert (
                failed.data["kind"] == "cancelled" and "cancelled by admin" in failed.data["error"]
            )
            r = await client.post(
                f"/admin/tasks/c.blocking/runs/{started['c.blocking']}/cancel", headers=AUTH
            )
            assert r.status_code == 409 and r.json()["status"] == "not_cancellable"
            r = await client.post("/admin/tasks/c.forever/runs/nope/cancel", headers=AUTH)
            assert r.status_code == 409 and r.json()["status"] == "not_running"
    finally:
        gate.set()
    await wait_events(kernel, "TaskSucceeded", where=lambda e: e.data["task"] == "c.blocking")
