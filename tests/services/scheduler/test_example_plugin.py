"""The example plugin ``plugins/jobs``: its three declarations are accepted and run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kernel.runtime import PluginRuntime
from kernel.sdk import TaskSpec
from services.loader.events import PluginLoaded
from services.scheduler.events import TaskRunRequested

from .helpers import make_kernel, wait_events

RUN = Path(__file__).resolve().parents[3] / "plugins" / "jobs" / "run.py"


def load_tasks() -> dict[str, TaskSpec]:
    module_spec = importlib.util.spec_from_file_location("scheduler_test_jobs_run", RUN)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return {
        v.__xcore_task__.name: v.__xcore_task__
        for v in vars(module).values()
        if hasattr(v, "__xcore_task__")
    }


async def test_jobs_plugin_tasks_are_scheduled_and_chain(tmp_path: Path) -> None:
    tasks = load_tasks()
    assert sorted(tasks) == ["collect", "heartbeat", "report"]
    kernel, _ = make_kernel(tmp_path)
    async with kernel:
        kernel.plugins.put(
            PluginRuntime(
                name="jobs", generation=1, version="1.0.0", mode="trusted",
                prefix="/app/jobs", router=None, tasks=tasks,
            )
        )  # fmt: skip
        await kernel.append(
            PluginLoaded(
                name="jobs", version="1.0.0", generation=1, mode="trusted", prefix="/app/jobs",
                routes=[], tasks=sorted(tasks), digest="x", duration_ms=1.0,
            ),
            stream="plugin-jobs",
        )  # fmt: skip
        scheduled = await wait_events(kernel, "TaskScheduled", 3)
        assert {r.data["task"] for r in scheduled} == {
            "jobs.collect",
            "jobs.heartbeat",
            "jobs.report",
        }
        assert not await kernel.read(types=["TaskRejected"])
        # run collect now: the sync task runs in a thread, then report follows it
        await kernel.append(
            TaskRunRequested(task="jobs.collect"),
            stream="task-jobs.collect",
        )
        await wait_events(
            kernel, "TaskSucceeded", 1, where=lambda r: r.data["task"] == "jobs.report"
        )
