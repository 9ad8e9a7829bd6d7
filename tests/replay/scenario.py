"""A realistic log for the replay tests, written by a real kernel (SQLite, no services).

The story: plugin ``hello`` is discovered, loaded and mounted; its task
``hello.cleanup`` is scheduled; an admin asks to run it, it fails and is retried, and
later scheduled runs keep failing until the failure count passes 3; then the plugin is
reloaded (generation 2) from a file change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kernel import Kernel, Recorded, Settings
from services.loader.events import (
    PluginDiscovered,
    PluginLoaded,
    PluginReloaded,
    PluginReloadRequested,
    PluginUnloaded,
)
from services.router.events import RoutesMounted, RoutesUnmounted
from services.scheduler.events import (
    TaskFailed,
    TaskRetryScheduled,
    TaskRunRequested,
    TaskScheduled,
    TaskStarted,
    TaskSucceeded,
)

TASK = "hello.cleanup"


@dataclass
class Story:
    path: Path
    #: name -> position of the notable events
    at: dict[str, int] = field(default_factory=dict)
    last: int = 0


def loaded(gen: int) -> PluginLoaded:
    return PluginLoaded(
        name="hello",
        version=f"1.{gen}",
        generation=gen,
        mode="trusted",
        prefix="/app/hello",
        routes=["/app/hello/status"],
        tasks=[TASK],
        digest=f"d{gen}",
        duration_ms=3.0,
    )


async def write_story(data_dir: Path, *, failing_runs: int = 5) -> Story:
    story = Story(data_dir / "events.db")
    async with Kernel(Settings(data_dir=data_dir, node="n1"), services=[]) as k:

        async def one(
            event: object, stream: str, name: str | None = None, **kw: object
        ) -> Recorded:
            [r] = await k.append(event, stream=stream, **kw)  # type: ignore[arg-type]
            if name:
                story.at[name] = r.position
            return r

        await one(
            PluginDiscovered(name="hello", version="1.1", path="plugins/hello"), "plugin-hello"
        )
        load = await one(loaded(1), "plugin-hello", "loaded", actor="loader")
        await one(
            RoutesMounted(plugin="hello", generation=1, prefix="/app/hello", paths=["/status"]),
            "routes-hello",
            "mounted",
            cause=load,
        )
        now = time.time()
        await one(
            TaskScheduled(
                task=TASK, plugin="hello", generation=1, trigger="every 60s", next_run=now + 60
            ),
            f"task-{TASK}",
            cause=load,
        )
        request = await one(TaskRunRequested(task=TASK), f"task-{TASK}", "request", actor="admin")
        started = await one(
            TaskStarted(
                task=TASK, run_id="r0", scheduled_for=now, trigger="request", next_run=now + 60
            ),
            f"task-{TASK}",
            "started",
            cause=request,
        )
        failed = await one(
            TaskFailed(task=TASK, run_id="r0", attempt=1, error="boom", will_retry=True),
            f"task-{TASK}",
            "failed",
            cause=started,
        )
        await one(
            TaskRetryScheduled(
                task=TASK, run_id="r0", attempt=2, delay_s=1, retry_at=now + 1, scheduled_for=now
            ),
            f"task-{TASK}",
            "retry",
            cause=failed,
        )
        for i in range(1, failing_runs + 1):
            s = await one(
                TaskStarted(
                    task=TASK, run_id=f"r{i}", scheduled_for=now + i, next_run=now + 60 * (i + 1)
                ),
                f"task-{TASK}",
            )
            await one(
                TaskFailed(
                    task=TASK, run_id=f"r{i}", attempt=1, error=f"boom {i}", duration_ms=2.0
                ),
                f"task-{TASK}",
                f"failure{i}",
                cause=s,
            )
        s = await one(TaskStarted(task=TASK, run_id="ok", scheduled_for=now + 99), f"task-{TASK}")
        await one(
            TaskSucceeded(task=TASK, run_id="ok", attempt=1, duration_ms=1.5),
            f"task-{TASK}",
            cause=s,
        )
        change = await one(
            PluginReloadRequested(name="hello", reason="file changed: plugins/hello/run.py"),
            "plugin-hello",
            "reload_request",
            actor="watcher",
        )
        l2 = await one(loaded(2), "plugin-hello", "loaded2", cause=change)
        await one(
            PluginUnloaded(name="hello", generation=1, reason="reload"),
            "plugin-hello",
            cause=change,
        )
        await one(
            RoutesUnmounted(plugin="hello", generation=1, prefix="/app/hello"),
            "routes-hello",
            cause=l2,
        )
        await one(
            RoutesMounted(plugin="hello", generation=2, prefix="/app/hello", paths=["/status"]),
            "routes-hello",
            "mounted2",
            cause=l2,
        )
        await one(
            PluginReloaded(
                name="hello", version="1.2", old_generation=1, generation=2, duration_ms=4.0
            ),
            "plugin-hello",
            "reloaded",
            cause=change,
        )
    story.last = story.at["reloaded"] + 1  # KernelStopped follows
    return story
