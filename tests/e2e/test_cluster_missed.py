"""In a cluster, a node that was paused does not record as missed the runs another node
ran for it meanwhile.

Found by an attack: two nodes, tasks every second, node a stopped (SIGSTOP) for a few
seconds then continued. Node b took over every run a was first for, each once, yet a
recorded ``TaskMissed`` for all of them (its timers fired before its view had read b's
claims), inflating the missed counters and firing missed-run alerts where nothing was
missed.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.e2e.test_cluster import cluster_dsn, events, start_nodes, wait_for

pytestmark = pytest.mark.postgres

TASKS = 10

RUN = f"""
from kernel.sdk import task

PLUGIN_INFO = {{"version": "1.0.0", "author": "tests", "api_prefix": "/app/ticker"}}


@task(every="1s", misfire="run_once", schedules=[{{"name": f"t{{i}}"}} for i in range({TASKS})])
async def tick() -> None:
    pass
"""


@pytest.mark.timeout(300)
def test_a_paused_node_records_no_miss_for_runs_another_node_ran(tmp_path: Path) -> None:
    folders = {name: tmp_path / f"plugins-{name}" for name in ("a", "b")}
    for folder in folders.values():
        (folder / "ticker").mkdir(parents=True)
        (folder / "ticker" / "run.py").write_text(RUN)
    with cluster_dsn() as dsn, ExitStack() as stack:
        # stale_after 30 s: the pause is short of a loss, so b takes runs over, one by one
        nodes = start_nodes(stack, tmp_path, dsn, folders, stale_after=30)
        a, b = nodes["a"], nodes["b"]

        def started() -> list[dict[str, object]]:
            return events(b, type="TaskStarted")

        wait_for(lambda: len(started()) >= 4 * TASKS, 90, "both nodes running the ticks")
        os.kill(a.process.pid, signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
        time.sleep(8)  # long enough for any TaskMissed of a to be decided and recorded
        runs = started()
        slots = Counter((r["data"]["task"], r["data"]["scheduled_for"]) for r in runs)
        assert max(slots.values()) == 1, "a run started twice"
        takeovers = [r for r in runs if r["data"].get("takeover")]
        assert takeovers, "b took nothing over while a was stopped"
        missed = [r for r in events(b, type="TaskMissed") if r["meta"]["node"] == "a"]
        assert missed == [], missed
