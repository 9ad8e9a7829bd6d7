"""``bisect`` gives the exact first position, folds the log at most once, and with the
snapshot cache warm folds only the one interval where the condition turns true."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kernel import Kernel, NewEvent, Settings
from replay import SnapshotCache, bisect, fold, open_log
from services.scheduler.events import TaskFailed, TaskStarted, TaskSucceeded
from tests.replay.conftest import run

pytestmark = pytest.mark.anyio

TASK = "shop.sync"


async def write_long_log(folder: Path, runs: int) -> Path:
    """Runs of ``shop.sync``; every 7th fails. Noise from another stream in between."""
    async with Kernel(Settings(data_dir=folder, node="n1"), services=[]) as kernel:
        batch: list[object] = []
        for i in range(runs):
            batch.append(TaskStarted(task=TASK, run_id=f"r{i}", scheduled_for=1.8e9 + i))
            if i % 7 == 3:
                batch.append(TaskFailed(task=TASK, run_id=f"r{i}", attempt=1, error="x"))
            else:
                batch.append(TaskSucceeded(task=TASK, run_id=f"r{i}", attempt=1, duration_ms=1.0))
            if len(batch) >= 400:
                await kernel.append(batch, stream=f"task-{TASK}")  # type: ignore[arg-type]
                await kernel.append(NewEvent.raw("Noise", {"i": i}), stream="noise")
                batch = []
        if batch:
            await kernel.append(batch, stream=f"task-{TASK}")  # type: ignore[arg-type]
    return folder / "events.db"


def truth(path: Path, failures: int) -> int:
    """The first position where the failure count exceeds ``failures``, event by event."""
    with open_log(path) as log:
        for count, r in enumerate(log.read(types={"TaskFailed"}), 1):
            if count > failures:
                return r.position
    raise AssertionError("never")


async def test_bisect_is_exact_and_uses_the_cache_when_warm(tmp_path: Path) -> None:
    path = await write_long_log(tmp_path / "var", 6000)
    expr = f'tasks.tasks["{TASK}"].failures > 500'
    expected = truth(path, 500)
    with open_log(path) as log:
        last = log.last_position()
        cache = SnapshotCache(log, tmp_path / "cache")
        cold = bisect(log, expr, cache=cache, every=1000)
        assert cold.position == expected
        assert cold.folded < last  # it stopped once the answer was found
        warm = bisect(log, expr, cache=cache, every=1000)
        assert warm.position == expected
        assert warm.snapshots_used >= 1
        assert warm.folded <= 1000  # one interval, not the log
        # another question on the same log: binary search over the saved states
        other = bisect(log, f'tasks.tasks["{TASK}"].failures > 100', cache=cache, every=1000)
        assert other.position == truth(path, 100)
        assert other.folded <= 1000
        cache.close()
    # the answer is exact: false one handled event before, true at it
    with open_log(path) as log:
        before = fold(log, ["scheduler.tasks"], until=expected - 1)["scheduler.tasks"]
        at = fold(log, ["scheduler.tasks"], until=expected)["scheduler.tasks"]
        assert before.tasks[TASK].failures == 500 and at.tasks[TASK].failures == 501


async def test_a_cached_state_from_another_log_is_never_used(tmp_path: Path) -> None:
    path = await write_long_log(tmp_path / "var", 1500)
    expr = f'tasks.tasks["{TASK}"].failures > 150'
    with open_log(path) as log:
        cache = SnapshotCache(log, tmp_path / "cache")
        bisect(log, expr, cache=cache, every=500)
        cache.close()
    # tamper: pretend every saved state belongs to other events
    [db] = (tmp_path / "cache").glob("*.sqlite")
    conn = sqlite3.connect(db)
    assert conn.execute("UPDATE snaps SET event_id = 'someone-else'").rowcount > 0
    conn.commit()
    conn.close()
    with open_log(path) as log:
        cache = SnapshotCache(log, tmp_path / "cache")
        again = bisect(log, expr, cache=cache, every=500)
        cache.close()
    assert again.snapshots_used == 0 and again.position == truth(path, 150)


async def test_bisect_from_the_command_line_with_and_without_cache(tmp_path: Path) -> None:
    path = await write_long_log(tmp_path / "var", 800)
    expr = f'tasks.tasks["{TASK}"].failures >= 10'
    for extra in ([], ["--no-cache"], []):
        out = run("replay", "bisect", path, "--until", expr, "--every", "100", *extra)
        assert out.returncode == 0, out.stderr
        assert f"first holds at position {truth(path, 9)} " in out.stdout
    out = run("replay", "bisect", path, "--until", "position > 5")
    assert "first holds at position 6 " in out.stdout
    out = run("replay", "bisect", path, "--until", "True")
    assert "already holds on the empty state" in out.stdout
