"""Replay computes the state the live kernel had: a property test over random logs.

Hypothesis draws a random history (plugins loading, unloading and conflicting, tasks
scheduled, started, failing, retried, skipped, paused; kernel restarts; events of a type
nobody knows). A real kernel folds it live into every installed projection, and at
random points the test records the live state and its position. Replay then folds the
same log to each recorded position — from zero, and from its own cached snapshots — and
must give exactly the recorded state.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import Kernel, KernelStarted, NewEvent, Settings
from replay import SnapshotCache, discover, fold, open_log
from replay.projections import view
from services.loader.events import (
    PluginDisabled,
    PluginEnabled,
    PluginLoaded,
    PluginLoadFailed,
    PluginUnloaded,
)
from services.router.events import RouteConflict, RoutesMounted, RoutesUnmounted
from services.scheduler.events import (
    TaskFailed,
    TaskMissed,
    TaskPaused,
    TaskResumed,
    TaskRetryScheduled,
    TaskScheduled,
    TaskSkipped,
    TaskStarted,
    TaskSucceeded,
)

PLUGINS = ["alpha", "beta"]
TASKS = ["alpha.sweep", "alpha.mail", "beta.sync"]

op = st.one_of(
    st.tuples(st.sampled_from(["load", "unload", "fail_load", "enable", "disable", "conflict"]), st.sampled_from(PLUGINS)),
    st.tuples(
        st.sampled_from(["schedule", "start", "succeed", "fail", "fail_retry", "retry", "skip", "miss", "pause", "resume"]),
        st.sampled_from(TASKS),
    ),
    st.tuples(st.sampled_from(["boot", "unknown", "checkpoint"]), st.just("")),
)  # fmt: skip


def events_for(kind: str, name: str, world: dict[str, Any]) -> list[tuple[Any, str]]:
    """The events (and their stream) one random operation appends."""
    t = 1_800_000_000.0 + world["clock"]
    world["clock"] += 1
    gens: dict[str, int] = world["gens"]
    runs: dict[str, int] = world["runs"]
    if kind == "load":
        gens[name] = gens.get(name, 0) + 1
        g = gens[name]
        return [
            (PluginLoaded(name=name, version=f"1.{g}", generation=g, mode="trusted", prefix=f"/app/{name}", routes=[f"/app/{name}/x"], tasks=[], digest="d", duration_ms=1.0), f"plugin-{name}"),
            (RoutesMounted(plugin=name, generation=g, prefix=f"/app/{name}", paths=["/x"]), f"routes-{name}"),
        ]  # fmt: skip
    if kind == "unload":
        g = gens.get(name, 1)
        return [
            (PluginUnloaded(name=name, generation=g), f"plugin-{name}"),
            (RoutesUnmounted(plugin=name, generation=g, prefix=f"/app/{name}"), f"routes-{name}"),
        ]
    if kind == "fail_load":
        return [(PluginLoadFailed(name=name, stage="import", error="boom", generation=gens.get(name, 0) + 1), f"plugin-{name}")]  # fmt: skip
    if kind == "enable":
        return [(PluginEnabled(name=name), f"plugin-{name}")]
    if kind == "disable":
        return [(PluginDisabled(name=name), f"plugin-{name}")]
    if kind == "conflict":
        return [(RouteConflict(plugin=name, generation=gens.get(name, 1), prefix="/app", conflicts_with="other", paths=["/app"], reason="overlap"), f"routes-{name}")]  # fmt: skip
    stream = f"task-{name}"
    run = f"{name}-{runs.get(name, 0)}"
    if kind == "schedule":
        return [(TaskScheduled(task=name, plugin=name.split(".")[0], generation=1, trigger="every 5s", next_run=t + 5), stream)]  # fmt: skip
    if kind == "start":
        runs[name] = runs.get(name, 0) + 1
        run = f"{name}-{runs[name]}"
        return [(TaskStarted(task=name, run_id=run, scheduled_for=t, next_run=t + 5), stream)]
    if kind == "succeed":
        return [(TaskSucceeded(task=name, run_id=run, attempt=1, duration_ms=2.5), stream)]
    if kind in ("fail", "fail_retry"):
        return [(TaskFailed(task=name, run_id=run, attempt=1, error="x", duration_ms=1.0, will_retry=kind == "fail_retry"), stream)]  # fmt: skip
    if kind == "retry":
        return [(TaskRetryScheduled(task=name, run_id=run, attempt=2, delay_s=1, retry_at=t + 1, scheduled_for=t), stream)]  # fmt: skip
    if kind == "skip":
        return [(TaskSkipped(task=name, scheduled_for=t, reason="busy", next_run=t + 5, run_id=run), stream)]  # fmt: skip
    if kind == "miss":
        return [(TaskMissed(task=name, count=2, first=t - 10, last=t - 5, policy="skip", next_run=t + 5), stream)]  # fmt: skip
    if kind == "pause":
        return [(TaskPaused(task=name), stream)]
    if kind == "resume":
        return [(TaskResumed(task=name, next_run=t + 5), stream)]
    if kind == "boot":
        return [(KernelStarted(node="n1", boot=f"b{t}", version="0", pid=1), "kernel")]
    if kind == "unknown":
        return [(NewEvent.raw("WidgetFrobbed", {"task": TASKS[0], "plugin": "alpha"}), "widgets")]
    return []


async def live_run(folder: Path, ops: list[tuple[str, str]]) -> list[tuple[int, dict[str, Any]]]:
    """Append the history to a real kernel folding every installed projection live;
    return (position, views) at each checkpoint and at the end."""
    classes = discover()
    seen: list[tuple[int, dict[str, Any]]] = []
    world: dict[str, Any] = {"clock": 0, "gens": {}, "runs": {}}
    async with Kernel(Settings(data_dir=folder, node="n1"), services=[]) as kernel:
        live = [await kernel.add_projection(cls()) for cls in classes.values()]

        async def checkpoint() -> None:
            with anyio.fail_after(30):
                await kernel.settle()
            position = await kernel.store.last_position()
            seen.append((position, {p.name: view(p) for p in live}))

        for kind, name in ops:
            if kind == "checkpoint":
                await checkpoint()
                continue
            for event, stream in events_for(kind, name, world):
                await kernel.append(event, stream=stream)
        await checkpoint()
    return seen


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_replay_state_equals_the_live_state_at_every_position(ops: list[tuple[str, str]]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="xcore-replay-eq-"))
    try:
        seen = anyio.run(live_run, folder, ops)
        with open_log(folder / "events.db") as log:
            for position, live_views in seen:
                state = fold(log, until=position)
                assert state.defects == []
                assert state.view() == live_views, f"state differs at position {position}"
            # from replay's own snapshots: save at each checkpoint, then fold onward
            cache = SnapshotCache(log, folder / "cache")
            assert cache.enabled, cache.problem
            for position, _ in seen:
                for p in fold(log, until=position).projections.values():
                    cache.save(p, position)
            cache.commit()
            for (start, _), (position, live_views) in itertools.pairwise(seen):
                restored = [cache.load(cls, start) for cls in discover().values()]
                assert all(p is not None for p in restored)
                state = fold(log, restored, until=position)
                assert state.view() == live_views
            cache.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
