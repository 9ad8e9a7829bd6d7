"""Replay never writes to the log it reads, and never blocks a kernel writing it.

Checked three ways: on a read-only copy (as an unprivileged user when the tests run as
root, since root ignores file modes), on a copy carrying its WAL but not its index, and
beside a running kernel that keeps appending.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import orjson
import pytest

from kernel import Kernel, Settings
from replay import open_log, state_at, verify
from services.scheduler.events import TaskFailed, TaskStarted
from tests.replay.conftest import ROOT, run, xcore, xcore_many
from tests.replay.scenario import TASK, Story

pytestmark = pytest.mark.anyio

NOBODY = 65534


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of ``folder``: its hash and modification time."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


def can_run_as_nobody() -> bool:
    """Root ignores file modes: run as an unprivileged user when this interpreter can."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    probe = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", "pass"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """A folder an unprivileged user can enter (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="xcore-replay-ro-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(d, ignore_errors=True)


def copy_log(story: Story, dest: Path, *, with_wal: bool = False) -> Path:
    """A copy of the story's log as taken from another machine (checkpointed first)."""
    import sqlite3

    dest.mkdir()
    target = dest / "events.db"
    # the kernel has stopped, so a plain backup gives the whole log in one file
    src = sqlite3.connect(f"file:{story.path}?mode=ro", uri=True)
    out = sqlite3.connect(target)
    src.backup(out)
    out.execute("PRAGMA journal_mode=WAL")
    out.close()
    src.close()
    for extra in ("-wal", "-shm"):
        Path(f"{target}{extra}").unlink(missing_ok=True)
    return target


async def test_a_read_only_copy_is_read_and_left_exactly_as_it_was(
    story: Story, world_readable_tmp: Path
) -> None:
    folder = world_readable_tmp / "copy"
    log = copy_log(story, folder)
    log.chmod(0o444)
    folder.chmod(0o555)
    before = digest(folder)
    user = NOBODY if can_run_as_nobody() else None
    env = {"XCORE_REPLAY_CACHE": str(world_readable_tmp / "no-cache-here")}
    commands = [
        ["timeline", log, "--json"],
        ["state", log, "--json"],
        ["diff", log, "--at", "3", "--at", "20"],
        ["why", log, "8"],
        ["bisect", log, "--no-cache", "--until", f'tasks.tasks["{TASK}"].failures > 3'],
        ["verify", log],
        ["export", log],
    ]
    results = xcore_many([["replay", *args] for args in commands], env=env, user=user)
    for args, out in zip(commands, results, strict=True):
        assert out.returncode == 0, (args, out.stderr)
    assert digest(folder) == before  # same files (no -wal, no -shm), same bytes, same times
    state = orjson.loads(results[1].stdout)
    assert state["projections"]["scheduler.tasks"]["tasks"][TASK]["failures"] == 5


async def test_a_copy_with_its_wal_but_no_index_is_read_from_a_private_copy(
    story: Story, tmp_path: Path
) -> None:
    import sqlite3

    source = copy_log(story, tmp_path / "source")
    conn = sqlite3.connect(source)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(
        "INSERT INTO events (position, stream, version, type, schema, data, meta, id, recorded_at)"
        " VALUES (?, 'x', 1, 'Later', 1, '{}', ?, 'later-id', 1.0)",
        (story.last + 1, orjson.dumps({"id": "later-id"})),
    )
    conn.commit()
    # copied while the writer is open: the new row is only in the WAL, and no index
    folder = tmp_path / "copy"
    folder.mkdir()
    log = folder / "events.db"
    shutil.copyfile(source, log)
    shutil.copyfile(f"{source}-wal", f"{log}-wal")
    conn.close()
    before = digest(folder)
    with open_log(log) as opened:
        assert opened.last_position() == story.last + 1
    assert digest(folder) == before


async def test_replay_beside_a_kernel_that_keeps_appending(tmp_path: Path) -> None:
    """The kernel's appends never fail or wait on replay; replay sees a sound prefix."""
    settings = Settings(data_dir=tmp_path, node="live")
    stop = anyio.Event()
    appended = 0

    async with Kernel(settings, services=[]) as kernel:

        async def producer() -> None:
            nonlocal appended
            i = 0
            while not stop.is_set():
                await kernel.append(
                    [
                        TaskStarted(task=TASK, run_id=f"r{i}", scheduled_for=time.time()),
                        TaskFailed(task=TASK, run_id=f"r{i}", attempt=1, error="x"),
                    ],
                    stream=f"task-{TASK}",
                )
                appended += 2
                i += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            with anyio.fail_after(120):
                while appended < 200:
                    await anyio.sleep(0.01)
                # a separate process, and this process's library, read while it appends
                follow = subprocess.Popen(
                    [sys.executable, "-m", "kernel.cli", "replay", "timeline", str(kernel.store.location), "--json", "--follow", "--type", "TaskFailed"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
                out = await anyio.to_thread.run_sync(
                    lambda: xcore("replay", "verify", kernel.store.location)
                )
                assert out.returncode == 0, out.stdout + out.stderr
                for _ in range(3):
                    with open_log(kernel.store.location) as log:
                        report = verify(log)
                        assert report.ok, report.render()
                        s = state_at(log, None, "scheduler.tasks")
                        # appends are atomic pairs: a reader never sees half of one
                        assert s.position % 2 == 1
                        assert s["scheduler.tasks"].tasks[TASK].failures == (s.position - 1) // 2
                mark = appended
                while appended < mark + 100:
                    await anyio.sleep(0.01)
                stop.set()
        last = await kernel.store.last_position()
    # --follow printed events appended after it started, up to the end
    seen: list[int] = []
    deadline = time.monotonic() + 60
    assert follow.stdout is not None
    os.set_blocking(follow.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        chunk = follow.stdout.read()
        if chunk:
            buf += chunk
            seen = [orjson.loads(line)["position"] for line in buf.splitlines() if line.strip()]
            if seen and seen[-1] >= last:
                break
        await anyio.sleep(0.05)
    follow.terminate()
    follow.wait(timeout=30)
    follow.stdout.close()
    assert seen == list(range(3, last + 1, 2))
    assert run("replay", "verify", tmp_path / "events.db").returncode == 0
