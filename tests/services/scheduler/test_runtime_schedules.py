"""Schedules added, changed and removed at runtime: admin API and CLI on a real server,
kept across restarts, and a changed declaration wins over a runtime change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx

from services.scheduler.events import ScheduleApplied, TaskRequestRefused, stream_of
from services.scheduler.service import SchedulerService

from .helpers import make_kernel, spec, wait_events
from .test_admin import AUTH, TOKEN, server  # noqa: F401  (the fixture)


async def test_add_change_remove_through_the_api_and_the_cli(server: Any) -> None:  # noqa: F811
    kernel, scheduler, url = server
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post(
            "/admin/tasks",
            headers=AUTH,
            json={"id": "web.fast", "function": "job", "trigger": {"every": "0.05s"}},
        )
        assert r.status_code == 201, r.text
        assert r.json()["outcome"] == "ScheduleApplied" and r.json()["scheduled"]
        await wait_events(kernel, "TaskSucceeded", where=lambda e: e.data["task"] == "web.fast")
        await kernel.settle()
        rows = {x["id"]: x for x in (await client.get("/admin/tasks", headers=AUTH)).json()}
        assert rows["web.fast"]["source"] == "runtime" and rows["web.job"]["source"] == "declared"

        bad = [
            ({"id": "web.never", "function": "job", "trigger": {"cron": "0 0 30 2 *"}}, 400),
            ({"id": "web.x", "function": "nothing", "trigger": {"every": "1h"}}, 400),
            ({"id": "web.x", "function": "job", "trigger": "every hour"}, 400),
            ({"id": "web.x", "function": "job", "trigger": {"every": "1h"}, "args": [1]}, 400),
            ({"id": "web.fast", "function": "job", "trigger": {"every": "1h"}}, 409),
            ({"id": "nope.x", "function": "job", "trigger": {"every": "1h"}}, 404),
        ]
        for body, status in bad:
            r = await client.post("/admin/tasks", headers=AUTH, json=body)
            assert r.status_code == status, (body, r.text)
        assert (
            "never fires"
            in (await client.post("/admin/tasks", headers=AUTH, json=bad[0][0])).json()["detail"]
        )
        # refusals record nothing (web.fast keeps running meanwhile, so count by type)
        assert len(await kernel.read(types=["ScheduleAdded"])) == 1
        assert not await kernel.read(types=["TaskRejected", "TaskRequestRefused"])

        r = await client.patch(
            "/admin/tasks/web.job", headers=AUTH, json={"trigger": {"every": "2h"}}
        )
        assert r.status_code == 200, r.text
        await kernel.settle()
        assert scheduler.table.tasks["web.job"].trigger == "every 7200s"
        r = await client.delete("/admin/tasks/web.job", headers=AUTH)
        assert r.status_code == 409 and "declared in its plugin" in r.json()["detail"]
        r = await client.delete("/admin/tasks/web.fast", headers=AUTH)
        assert r.status_code == 200 and r.json()["scheduled"] is False
        assert not scheduler.is_scheduled("web.fast")
        # the changes are events in the log, with who made them
        changes = await kernel.read(types=["ScheduleAdded", "ScheduleChanged", "ScheduleRemoved"])
        assert [c.type for c in changes] == ["ScheduleAdded", "ScheduleChanged", "ScheduleRemoved"]
        assert all(c.meta.actor and c.meta.actor.startswith("admin") for c in changes)

    env = {**os.environ, "XCORE_ADMIN_TOKEN": TOKEN}
    xcore = str(Path(sys.executable).with_name("xcore"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [xcore, "task", "--url", url, *args], capture_output=True, text=True, env=env,
            timeout=60,
        )  # fmt: skip

    added = await anyio.to_thread.run_sync(
        cli, "add", "web.cli", "--function", "job", "--cron", "@hourly", "--tz", "Europe/Paris"
    )
    assert added.returncode == 0, added.stderr
    assert scheduler.is_scheduled("web.cli")
    changed = await anyio.to_thread.run_sync(cli, "change", "web.cli", "--every", "30m")
    assert changed.returncode == 0, changed.stderr
    removed = await anyio.to_thread.run_sync(cli, "remove", "web.cli")
    assert removed.returncode == 0 and not scheduler.is_scheduled("web.cli")
    wrong = await anyio.to_thread.run_sync(cli, "add", "web.y", "--function", "job", "--every", "x")
    assert wrong.returncode == 1 and "HTTP 400" in wrong.stderr


async def _ask(service: SchedulerService, kind: str, tid: str, body: dict[str, Any]) -> None:
    kernel = service._kernel()
    event = service.check_change(kind, tid, body)
    outcome = await kernel.request(
        event, stream=stream_of(tid), outcomes=[ScheduleApplied, TaskRequestRefused]
    )
    assert outcome.type == "ScheduleApplied", outcome.data


async def test_runtime_changes_survive_restarts_and_a_new_declaration_wins(
    tmp_path: Path,
) -> None:
    async def job(who: str = "declared") -> str:
        return who

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(job, every="1h")])
        await _ask(service, "change", "p.job", {"trigger": {"every": "2h"}})
        await _ask(
            service,
            "add",
            "p.extra",
            {"function": "job", "trigger": {"cron": "0 3 * * *"}, "kwargs": {"who": "x"}},
        )
        assert service._tasks["p.job"].task.trigger_description == "every 7200s"

    # restart, same declaration: the runtime change and schedule are still there
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(job, every="1h")])
        assert service._tasks["p.job"].task.trigger_description == "every 7200s"
        extra = service._tasks["p.extra"].task
        assert extra.trigger_description == "cron '0 3 * * *' UTC"
        assert extra.kwargs == {"who": "x"} and extra.source == "runtime"
        assert not await kernel.read(types=["ScheduleConflict"])

    # the plugin now declares another schedule: the declaration wins, reported
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(job, every="3h")])
        assert service._tasks["p.job"].task.trigger_description == "every 10800s"
        [conflict] = await kernel.read(types=["ScheduleConflict"])
        assert conflict.data["task"] == "p.job"
        assert conflict.data["runtime"]["trigger"] == {"every": "2h"}
        assert service.is_scheduled("p.extra")  # a runtime schedule is not in conflict

    # and it stays dropped after one more restart (the conflict is in the log)
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(job, every="3h")])
        assert service._tasks["p.job"].task.trigger_description == "every 10800s"
        assert len(await kernel.read(types=["ScheduleConflict"])) == 1


async def test_a_schedules_item_is_changed_by_its_own_name(tmp_path: Path) -> None:
    async def job(kind: str) -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        listed = spec(
            job,
            schedules=[{"every": "1h", "args": ["a"]}, {"name": "b", "every": "2h", "args": ["b"]}],
        )
        result = await service.register("p", [listed])
        assert sorted(result.accepted) == ["p.b", "p.job-1"]
        await _ask(service, "change", "p.job-1", {"trigger": {"every": "3h"}})
        assert service._tasks["p.job-1"].task.trigger_description == "every 10800s"
        assert service._tasks["p.job-1"].task.args == ("a",)
        assert service._tasks["p.b"].task.trigger_description == "every 7200s"
