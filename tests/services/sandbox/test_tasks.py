"""Sandboxed @task functions run in the worker with the scheduler's events and context."""

from __future__ import annotations

import logging
from typing import Any

import anyio

from tests.services.sandbox.conftest import AUTH, sandboxed, write_plugin

TASKS = """
    import os, time
    from kernel.sdk import task, current_task

    @task(cron="0 0 1 1 *")
    def report():
        ctx = current_task()
        ctx.logger.info("sandboxed run %s attempt %s pid %s", ctx.run_id, ctx.attempt, os.getpid())
        with open(os.path.join(os.environ["HOME"], "ran.txt"), "a") as f:
            f.write(f"{ctx.run_id} {ctx.attempt} {os.getpid()}\\n")

    @task(cron="0 0 1 1 *", retries=1, retry_delay=0.05)
    async def fails():
        raise ValueError("bad input " + current_task().run_id)

    @task(cron="0 0 1 1 *", timeout=0.5)
    def stuck():
        while True:
            time.sleep(0.01)
"""


async def run_now(h: Any, task_id: str) -> None:
    r = await h.client.post(f"/admin/tasks/{task_id}/run", headers=AUTH)
    assert r.status_code in (200, 202), r.text


async def test_tasks_run_in_the_worker_with_events_retries_and_context(
    harness: Any, level: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    h = await harness(level)
    folder = write_plugin(h.plugins, "jobs", info=sandboxed("jobs"), run=TASKS)
    assert (await h.reload("jobs")).status_code == 200
    # the scheduler takes the tasks from PluginLoaded in its own subscription, which may
    # lag the reload's answer on a loaded machine ("no task 'jobs.report'")
    await h.wait_for("TaskScheduled", "jobs", count=3)
    await run_now(h, "jobs.report")
    ok = await h.wait_for("TaskSucceeded", "jobs")
    assert ok
    ran = (h.base / "var" / "plugins" / "jobs" / "ran.txt").read_text().split()
    started = await h.events("TaskStarted")
    assert ran[0] == started[0].data["run_id"]
    assert int(ran[2]) != __import__("os").getpid()
    await run_now(h, "jobs.fails")
    with anyio.fail_after(30):
        while len([e for e in await h.events("TaskFailed") if e.data["task"] == "jobs.fails"]) < 2:
            await anyio.sleep(0.02)
    failed = [e for e in await h.events("TaskFailed") if e.data["task"] == "jobs.fails"]
    assert "ValueError: bad input" in failed[0].data["error"]
    assert failed[0].data["will_retry"] is True
    assert "in the sandbox worker" in failed[0].data["traceback"]
    assert await h.events("TaskRetryScheduled")
    assert any(
        "sandboxed run" in r.getMessage() and getattr(r, "run_id", None) for r in caplog.records
    )
    del folder


async def test_a_task_timeout_the_worker_cannot_honour_kills_it(harness: Any) -> None:
    h = await harness("rlimits", sandbox={"cancel_grace_s": 0.5})
    write_plugin(h.plugins, "jobs", info=sandboxed("jobs"), run=TASKS)
    assert (await h.reload("jobs")).status_code == 200
    await run_now(h, "jobs.stuck")
    breach = await h.wait_for("SandboxLimitExceeded", "jobs")
    assert breach[0].data["limit"] == "timeout"
    assert "stuck" in breach[0].data["detail"]
    with anyio.fail_after(30):
        while not [e for e in await h.events("TaskFailed") if e.data["task"] == "jobs.stuck"]:
            await anyio.sleep(0.02)
    failed = [e for e in await h.events("TaskFailed") if e.data["task"] == "jobs.stuck"]
    assert failed[0].data["kind"] == "timeout"
    await h.wait_for("SandboxRestarted", "jobs")
