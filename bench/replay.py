"""Replay tool benchmarks (issue 11): ``replay state`` throughput and memory, ``bisect``.

One log of ``XCORE_BENCH_REPLAY_EVENTS`` (1,000,000) events a busy kernel writes: runs
of 200 tasks (``TaskStarted`` then ``TaskSucceeded``, every 9th ``TaskFailed``), with
plugin loads and route mounts among them, so every installed projection has work.

- ``replay_state_events_per_s``: ``replay.fold`` of every installed projection over the
  whole log (what ``xcore replay state`` does, without printing), beside
  ``sqlite3_limit`` — raw ``sqlite3`` reading the same rows and decoding their JSON, no
  projection — and ``eventsourcing`` — its SQLite recorder reading and decoding the same
  number of events with the same payloads. Runs alternate (this machine is noisy).
- ``replay_state_peak_mb``: peak resident memory of a fresh process running that fold
  (``ru_maxrss``), and, in ``extra``, the same process's memory before folding.
- ``replay_bisect_s``: ``replay.bisect`` of a condition that turns true at ~70% of the
  log, with replay's snapshot cache warm, beside ``full_fold`` — one fold of the
  projection the condition reads over the whole log, the cost of a single probe without
  snapshots. ``extra`` has the cold bisect (no cache yet: one forward fold that saves
  the snapshots) for honesty.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from bench.common import Result, median, result
from kernel.events import Meta, NewEvent
from kernel.store.sqlite import SQLiteStore

EVENTS = int(os.environ.get("XCORE_BENCH_REPLAY_EVENTS", "1000000"))
PAIRS = max(3, int(os.environ.get("XCORE_BENCH_PAIRS", "7")) // 2)
TASKS = 200


def _events(n: int) -> list[tuple[str, NewEvent]]:
    """(stream, event) pairs of the benchmark log, in order."""
    out: list[tuple[str, NewEvent]] = []
    run = 0
    t = 1_800_000_000.0
    while len(out) < n:
        if run % 5000 == 0:
            gen = run // 5000 + 1
            out.append(
                (
                    "plugin-shop",
                    NewEvent.raw(
                        "PluginLoaded",
                        {"name": "shop", "version": "1.0", "generation": gen, "mode": "trusted",
                         "prefix": "/app/shop", "routes": ["/app/shop/x"], "tasks": [],
                         "digest": "d", "duration_ms": 1.0},
                        Meta(),
                    ),
                )
            )  # fmt: skip
            out.append(
                (
                    "routes-shop",
                    NewEvent.raw(
                        "RoutesMounted",
                        {
                            "plugin": "shop",
                            "generation": gen,
                            "prefix": "/app/shop",
                            "paths": ["/x"],
                        },
                        Meta(),
                    ),
                )
            )
        # runs come in blocks of 250 per task, so the log is built in few appends
        task = f"shop.t{(run // 250) % TASKS}"
        rid = f"r{run}"
        stream = f"task-{task}"
        out.append(
            (
                stream,
                NewEvent.raw(
                    "TaskStarted",
                    {"task": task, "run_id": rid, "scheduled_for": t, "next_run": t + 60},
                    Meta(),
                ),
            )
        )
        if run % 9 == 4:
            done = NewEvent.raw(
                "TaskFailed", {"task": task, "run_id": rid, "attempt": 1, "error": "boom"}, Meta()
            )
        else:
            done = NewEvent.raw(
                "TaskSucceeded",
                {"task": task, "run_id": rid, "attempt": 1, "duration_ms": 1.5},
                Meta(),
            )
        out.append((stream, done))
        run += 1
        t += 0.01
    return out[:n]


async def _build_log(path: Path, n: int) -> None:
    store = SQLiteStore(path, synchronous="NORMAL")
    await store.open()
    events = _events(n)
    i = 0
    while i < n:
        # group consecutive events of a stream into one append
        stream = events[i][0]
        j = i
        while j < n and events[j][0] == stream and j - i < 1000:
            j += 1
        await store.append([e for _, e in events[i:j]], stream=stream)
        i = j
    await store.close()


def _build_es(path: Path, n: int) -> None:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(str(path))
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    batch: list[StoredEvent] = []
    originators: dict[str, tuple[uuid.UUID, int]] = {}
    for stream, e in _events(n):
        oid, v = originators.get(stream, (uuid.uuid4(), 0))
        originators[stream] = (oid, v + 1)
        batch.append(StoredEvent(oid, v + 1, f"bench:{e.type}", e.data))
        if len(batch) >= 1000:
            recorder.insert_events(batch)
            batch = []
    if batch:
        recorder.insert_events(batch)
    datastore.close()


def _xcore_state(path: Path) -> tuple[float, int]:
    from replay import fold, open_log

    with open_log(path) as log:
        start = time.perf_counter()
        state = fold(log)
        elapsed = time.perf_counter() - start
    assert not state.defects, state.defects[:3]
    return state.folded / elapsed, state.folded


def _raw(path: Path) -> float:
    import sqlite3

    conn = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
    loads = orjson.loads
    count = 0
    start = time.perf_counter()
    for _position, _type, data in conn.execute(
        "SELECT position, type, data FROM events ORDER BY position"
    ):
        loads(data)
        count += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def _es(path: Path) -> float:
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(str(path))
    recorder = SQLiteApplicationRecorder(datastore)
    count = 0
    loads = orjson.loads
    position: int | None = None
    start = time.perf_counter()
    while True:
        notes = recorder.select_notifications(position, 10_000, inclusive_of_start=position is None)
        if not notes:
            break
        for note in notes:
            loads(note.state)
        count += len(notes)
        position = notes[-1].id
    elapsed = time.perf_counter() - start
    datastore.close()
    return count / elapsed


# VmHWM (the peak resident set of this process image), not ru_maxrss: Linux carries
# ru_maxrss over exec from the parent, which holds the whole benchmark log in memory.
PEAK_SCRIPT = """
import sys
from replay import fold, open_log

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

before = hwm()
with open_log(sys.argv[1]) as log:
    state = fold(log)
print(before, hwm(), state.folded)
"""


def _peak(path: Path) -> tuple[float, float]:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)],
        capture_output=True, text=True, check=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    before, after, _ = out.stdout.split()
    return int(before) / 1024, int(after) / 1024


_shared: dict[str, Path] = {}


def _log() -> Path:
    """The benchmark log, built once per run and removed when the process exits."""
    if "log" not in _shared:
        tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-replay11-"))
        atexit.register(shutil.rmtree, tmp, True)
        asyncio.run(_build_log(tmp / "events.db", EVENTS))
        _shared["log"] = tmp / "events.db"
    return _shared["log"]


def bench_replay_state() -> list[Result]:
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-replay11-es-"))
    try:
        xpath, epath = _log(), tmp / "es.db"
        _build_es(epath, EVENTS)
        xs, raws, ess = [], [], []
        folded = 0
        for _ in range(PAIRS):
            rate, folded = _xcore_state(xpath)
            xs.append(rate)
            raws.append(_raw(xpath))
            ess.append(_es(epath))
        before, peak = _peak(xpath)
        return [
            result(
                "replay_state_events_per_s",
                median(xs),
                "events/s",
                {"sqlite3_limit": median(raws), "eventsourcing": median(ess)},
                events=folded,
                min=min(xs),
                max=max(xs),
                pairs=PAIRS,
                pair_ratio_vs_limit=median([a / b for a, b in zip(xs, raws, strict=True)]),
            ),
            result("replay_state_peak_mb", peak, "MB", events=folded, rss_before_fold_mb=before),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_replay_bisect() -> list[Result]:
    from replay import SnapshotCache, bisect, fold, open_log

    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-bisect-"))
    try:
        xpath = _log()
        # the condition turns true at the last failure of one task within 70% of the log
        task = f"shop.t{(int(EVENTS * 0.7) // 500) % TASKS}"
        threshold = sum(
            1
            for _, e in _events(int(EVENTS * 0.7))
            if e.type == "TaskFailed" and orjson.loads(e.data)["task"] == task
        )
        expr = f'tasks.tasks["{task}"].failures >= {threshold}'
        with open_log(xpath) as log:
            cache = SnapshotCache(log, tmp / "cache")
            start = time.perf_counter()
            cold = bisect(log, expr, cache=cache)
            cold_s = time.perf_counter() - start
            warm, full = [], []
            found = None
            for _ in range(PAIRS):
                start = time.perf_counter()
                w = bisect(log, expr, cache=cache)
                warm.append(time.perf_counter() - start)
                found = w
                start = time.perf_counter()
                fold(log, ["scheduler.tasks"])
                full.append(time.perf_counter() - start)
            cache.close()
        assert found is not None and found.position == cold.position
        return [
            result(
                "replay_bisect_s",
                median(warm),
                "s",
                {"full_fold": median(full)},
                answer=found.position,
                last=found.last,
                probes=found.probes,
                folded_warm=found.folded,
                snapshots_used=found.snapshots_used,
                cold_bisect_s=cold_s,
                folded_cold=cold.folded,
                ratio_to_full_fold=median(warm) / median(full),
            )
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


BENCHMARKS = [("replay_state", bench_replay_state), ("replay_bisect", bench_replay_bisect)]
