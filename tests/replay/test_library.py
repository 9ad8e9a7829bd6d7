"""The library face: ``from replay import ...``, and the README's example test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import replay
from replay import ReplayError, open_log, state_at
from services.scheduler.projection import TaskTable
from tests.replay.conftest import ROOT
from tests.replay.scenario import TASK, Story

pytestmark = pytest.mark.anyio


def test_public_names() -> None:
    for name in replay.__all__:
        assert hasattr(replay, name), name
    assert sorted(replay.__all__) == replay.__all__


def test_the_readme_example_runs_and_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- replay-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its replay example"
    namespace: dict[str, object] = {}
    monkeypatch.chdir(ROOT)
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert tests
    for test in tests:
        test()


async def test_state_at_by_position_time_and_class(story: Story) -> None:
    with open_log(story.path) as log:
        s = state_at(log, story.at["failure2"], TaskTable)
        assert list(s.projections) == ["scheduler.tasks"]
        assert s[TaskTable].tasks[TASK].failures == 2 and s.position == story.at["failure2"]
        r = log.get(story.at["failure3"])
        assert r is not None
        at_time = state_at(log, r.recorded_at.isoformat(), "tasks")
        assert at_time["scheduler.tasks"].tasks[TASK].failures == 3
        everything = state_at(log)
        assert {"loader.plugins", "router.mounts", "scheduler.tasks"} <= set(everything.projections)
        with pytest.raises(ReplayError, match="past the end"):
            state_at(log, story.last + 1)
    # a path works too, and the log is closed afterwards
    assert state_at(story.path, 4, "mounts")["router.mounts"].mounts["hello"].generation == 1


async def test_diff_why_and_verify_as_functions(story: Story) -> None:
    with open_log(story.path) as log:
        changes = replay.diff(log, story.at["failure1"], story.at["failure2"], "tasks")
        assert any(c.path == f'tasks["{TASK}"].failures' and c.after == 2 for c in changes)
        w = replay.why(log, story.at["mounted2"])
        assert w.chain[0].type == "PluginReloadRequested"
        assert replay.verify(log).ok


def test_the_slice_in_the_repository_is_a_sound_filtered_slice() -> None:
    with open_log(Path(ROOT, "tests/replay/data/incident-42.jsonl")) as log:
        assert log.filtered and log.last_position() == 21
        assert replay.verify(log).ok


async def test_fold_continues_a_state_and_refuses_to_go_back(story: Story) -> None:
    with open_log(story.path) as log:
        early = replay.fold(log, ["tasks"], until=story.at["failure1"])
        later = replay.fold(log, list(early.projections.values()), until=story.at["failure3"])
        assert later["scheduler.tasks"].tasks[TASK].failures == 3
        assert later.folded == 4  # only the events in between were read
        with pytest.raises(ReplayError, match="only moves forward"):
            replay.fold(log, list(later.projections.values()), until=story.at["failure2"])
