"""A node that was paused past stale_after_s (SIGSTOP, a long GC, a VM migration) and
resumes finds itself recorded lost and its runs failed and retried elsewhere."""

from __future__ import annotations

import time

import anyio
import pytest

from kernel import Kernel
from kernel.events import Meta, NewEvent, Recorded
from kernel.settings import Settings
from services.cluster.events import NodeLost, node_stream
from services.cluster.service import ClusterService
from services.scheduler.events import TaskFailed, TaskRunRequested
from services.scheduler.service import SchedulerService

pytestmark = pytest.mark.postgres


async def test_a_resumed_node_does_not_finish_the_runs_it_was_declared_to_have_lost(
    pg_dsn: str,
) -> None:
    from kernel.sdk import task

    release = anyio.Event()
    finished: list[str] = []

    async def slow() -> None:
        await release.wait()
        finished.append("slow")

    spec = task(every="1h")(slow).__xcore_task__
    settings = Settings(
        store="postgres",
        dsn=pg_dsn,
        node="a",
        services={"cluster": {"heartbeat_s": 0.2, "stale_after_s": 3600.0}},
    )
    async with Kernel(settings, services=[ClusterService(), SchedulerService()]) as a:
        scheduler = a.services["scheduler"]
        assert isinstance(scheduler, SchedulerService)
        await scheduler.register("p", [spec])
        with anyio.fail_after(90):
            await a.append(TaskRunRequested(task="p.slow"), stream="task-p.slow")
            while not (started := await a.read(types=["TaskStarted"])):
                await anyio.sleep(0.05)
            run = started[0].data
            # what a survivor records while this node is paused
            version = (await a.read(stream=node_stream("a")))[-1].version
            lost = NodeLost(
                node="a", boot=a.boot, last_heartbeat=time.time() - 60, by="b",
                runs_failed=[run["run_id"]],
            )  # fmt: skip
            await a.store.append(
                [NewEvent.of(lost, Meta(node="b", boot="b0"))],
                stream=node_stream("a"),
                expected_version=version,
            )
            failed = TaskFailed(
                task="p.slow", run_id=run["run_id"], attempt=1, error="node lost: a",
                kind="node_lost", scheduled_for=run["scheduled_for"],
            )  # fmt: skip
            await a.store.append(
                [NewEvent.of(failed, Meta(node="b", boot="b0"))], stream="task-p.slow"
            )

            # the node resumes and learns it was lost: its copy of the run must stop
            # (before, it ran on and recorded a success for a run already failed)
            def mine(r: Recorded) -> bool:
                return (
                    r.type in ("TaskSucceeded", "TaskFailed")
                    and r.data["run_id"] == run["run_id"]
                    and r.meta.node == "a"
                )

            while not (ended := [r for r in await a.read(stream="task-p.slow") if mine(r)]):
                await anyio.sleep(0.05)
            release.set()
            assert [(r.type, r.data["kind"]) for r in ended] == [("TaskFailed", "cancelled")]
            assert "recorded lost by b" in ended[0].data["error"]
            assert finished == []
