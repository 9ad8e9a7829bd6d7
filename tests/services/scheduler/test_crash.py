"""A process killed with SIGKILL mid-run: the restart records the run as interrupted,
follows the misfire policy, and runs nothing twice (real subprocess, real SQLite log)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio

from kernel.sdk import current_task

from .helpers import make_kernel, spec, wait_events

ROOT = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from kernel import Kernel, Settings
    from kernel.sdk import current_task, task
    from services.scheduler.service import SchedulerService

    data, ticks, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    @task(every="0.05s", misfire="run_once")
    async def tick():
        with ticks.open("a") as f:
            f.write(repr(current_task().scheduled_for.timestamp()) + "\\n")

    @task(after=0)
    async def hang():
        marker.write_text(current_task().run_id)
        await asyncio.sleep(3600)

    async def main():
        service = SchedulerService()
        async with Kernel(Settings(data_dir=data, node="child"), services=[service]):
            await service.register("crash", [tick.__xcore_task__, hang.__xcore_task__])
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_sigkill_mid_run_then_restart(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ticks, marker = tmp_path / "ticks.txt", tmp_path / "hang.txt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(ticks), str(marker)],
        cwd=ROOT,
    )
    try:
        with anyio.fail_after(20):
            while not (marker.exists() and ticks.exists() and len(ticks.read_text().split()) >= 4):
                assert proc.poll() is None, "the child process died on its own"
                await anyio.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    hang_run = marker.read_text()
    await anyio.sleep(0.3)  # several ticks fall due while nothing runs

    async def tick() -> None:
        with ticks.open("a") as f:
            f.write(repr(current_task().scheduled_for.timestamp()) + "\n")

    async def hang() -> None:
        raise AssertionError("a one-shot run that already started must not run again")

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        failed = await kernel.read(types=["TaskFailed"])
        interrupted = [r.data for r in failed if r.data["kind"] == "interrupted"]
        assert [d["run_id"] for d in interrupted if d["task"] == "crash.hang"] == [hang_run]
        await service.register(
            "crash", [spec(tick, every="0.05s", misfire="run_once"), spec(hang, after=0)]
        )
        missed = await wait_events(kernel, "TaskMissed")
        assert missed[0].data["task"] == "crash.tick" and missed[0].data["count"] >= 2
        await wait_events(
            kernel, "TaskSucceeded", 3, where=lambda r: r.data["task"] == "crash.tick"
        )
        starts = await kernel.read(types=["TaskStarted"], stream="task-crash.hang")
        assert len(starts) == 1  # only the run the dead process started
        assert not service.is_scheduled("crash.hang") or (
            kernel_row_next(service, "crash.hang") is None
        )
    lines = ticks.read_text().split()
    assert len(lines) == len(set(lines)), "a scheduled time ran twice"


def kernel_row_next(service: object, task_id: str) -> float | None:
    from services.scheduler.service import SchedulerService

    assert isinstance(service, SchedulerService)
    return service._tasks[task_id].next_due
