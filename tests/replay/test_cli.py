"""``xcore replay ...`` end to end on a real log written by a real kernel.

Most tests run the command line in-process (``run``: the same ``main`` the ``xcore``
script calls, without a Python start-up each); the ones about the process itself (exit
codes, terminals, working directory) run real subprocesses (``xcore``)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from tests.replay.conftest import ROOT, run, xcore, xcore_many
from tests.replay.scenario import TASK, Story

pytestmark = pytest.mark.anyio


async def test_timeline_table_lists_every_event_with_its_fields(story: Story) -> None:
    out = run("replay", "timeline", story.path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == story.last  # no header and no colour: stdout is a pipe
    assert "\x1b[" not in out.stdout
    failed = lines[story.at["failed"] - 1]
    assert failed.split()[0] == str(story.at["failed"])
    assert "TaskFailed" in failed and "error=boom" in failed and "run_id=r0" in failed


async def test_timeline_colours_only_when_asked_or_on_a_terminal(
    story: Story, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run("replay", "timeline", story.path, "--color", "always")
    assert "\x1b[31m" in out.stdout  # failures in red
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[31m" in run("replay", "timeline", story.path, "--color", "always").stdout
    assert "\x1b[" not in run("replay", "timeline", story.path).stdout


async def test_timeline_json_lines_and_filters(story: Story) -> None:
    out = run("replay", "timeline", story.path, "--json", "--type", "TaskFailed")
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [r["position"] for r in rows] == [story.at["failed"]] + [
        story.at[f"failure{i}"] for i in range(1, 6)
    ]
    assert rows[0]["meta"]["causation_id"]

    out = run("replay", "timeline", story.path, "--json", "--plugin", "hello")
    types = {orjson.loads(line)["type"] for line in out.stdout.splitlines()}
    assert {"PluginLoaded", "RoutesMounted", "TaskFailed", "PluginReloaded"} <= types
    assert "KernelStarted" not in types

    out = run("replay", "timeline", story.path, "--json", "--task", TASK, "--to", "9")
    positions = [orjson.loads(line)["position"] for line in out.stdout.splitlines()]
    assert positions == [5, 6, 7, 8, 9]

    out = run("replay", "timeline", story.path, "--json", "--stream", "routes-hello")
    assert len(out.stdout.splitlines()) == 3


async def test_timeline_from_and_to_by_position_and_by_time(story: Story) -> None:
    out = run("replay", "timeline", story.path, "--json", "--from", "3", "--to", "5")
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [r["position"] for r in rows] == [3, 4, 5]
    t3 = rows[0]["recorded_at"]
    t5 = rows[-1]["recorded_at"]
    out = run("replay", "timeline", story.path, "--json", "--from", t3, "--to", t5)
    assert [orjson.loads(line)["position"] for line in out.stdout.splitlines()] == [3, 4, 5]
    # a time without a zone is UTC
    naive = datetime.fromisoformat(t5).astimezone(UTC).replace(tzinfo=None).isoformat()
    out = run("replay", "timeline", story.path, "--json", "--to", naive)
    assert orjson.loads(out.stdout.splitlines()[-1])["position"] == 5


async def test_state_at_a_position_shows_every_installed_projection(story: Story) -> None:
    out = run("replay", "state", story.path, "--at", str(story.at["failure3"]), "--json")
    assert out.returncode == 0, out.stderr
    state = orjson.loads(out.stdout)
    assert state["position"] == story.at["failure3"]
    p = state["projections"]
    assert set(p) >= {"loader.plugins", "router.mounts", "scheduler.tasks"}
    task = p["scheduler.tasks"]["tasks"][TASK]
    assert task["failures"] == 3 and task["failed_attempts"] == 4
    assert task["last"]["outcome"] == "failed" and task["next_run"] is not None
    assert p["loader.plugins"]["rows"]["hello"]["generation"] == 1
    assert p["router.mounts"]["mounts"]["hello"]["prefix"] == "/app/hello"

    out = run("replay", "state", story.path, "--json")  # the end of the log
    p = orjson.loads(out.stdout)["projections"]
    assert p["loader.plugins"]["rows"]["hello"]["generation"] == 2
    assert p["router.mounts"]["mounts"]["hello"]["generation"] == 2

    text = run("replay", "state", story.path, "--at", "4").stdout
    assert "scheduler.tasks" in text and "router.mounts" in text and "/app/hello" in text


async def test_state_at_a_time(story: Story) -> None:
    rows = run("replay", "timeline", story.path, "--json").stdout.splitlines()
    at = orjson.loads(rows[story.at["failure2"] - 1])["recorded_at"]
    out = run("replay", "state", story.path, "--at", at, "--json", "--projection", "tasks")
    state = orjson.loads(out.stdout)
    assert state["position"] >= story.at["failure2"]
    assert list(state["projections"]) == ["scheduler.tasks"]
    out = run("replay", "state", story.path, "--at", "2000-01-01T00:00:00Z", "--json")
    assert orjson.loads(out.stdout)["position"] == 0


async def test_state_of_a_users_projection_by_import_path(story: Story) -> None:
    out = run(
        "replay",
        "state",
        story.path,
        "--json",
        "--projection",
        "tests.replay.userproj:FailureCounter",
    )
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["projections"] == {"test.failures": {"failures": {TASK: 6}}}


async def test_a_projection_that_raises_is_reported_and_replay_goes_on(story: Story) -> None:
    out = run(
        "replay", "state", story.path, "--json",
        "--projection", "tests.replay.userproj:Exploding",
    )  # fmt: skip
    assert out.returncode == 0
    state = orjson.loads(out.stdout)
    assert state["projections"]["test.exploding"]["seen"] == 6  # went on past the failure
    [defect] = state["defects"]
    assert defect["kind"] == "handler" and defect["position"] == story.at["failure3"]
    assert f"position {story.at['failure3']}" in out.stderr and "projection bug" in out.stderr


async def test_diff_between_two_points(story: Story) -> None:
    out = run("replay", "diff", story.path, "--at", str(story.at["failure1"]), "--at", str(story.at["reloaded"]), "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    changes = {(c["projection"], c["path"]): c for c in orjson.loads(out.stdout)["changes"]}
    c = changes[("scheduler.tasks", f'tasks["{TASK}"].failures')]
    assert (c["before"], c["after"]) == (1, 5)
    assert changes[("loader.plugins", "rows.hello.generation")]["after"] == 2
    text = run("replay", "diff", story.path, "--at", "4", "--at", "6").stdout
    assert "scheduler.tasks:" in text and "+ tasks" in text
    same = run("replay", "diff", story.path, "--at", "4", "--at", "4").stdout
    assert "no change" in same


async def test_why_follows_causes_to_the_origin_and_effects_onward(story: Story) -> None:
    out = run("replay", "why", story.path, str(story.at["failed"]), "--json")
    assert out.returncode == 0, out.stderr
    w = orjson.loads(out.stdout)
    assert [r["type"] for r in w["chain"]] == ["TaskRunRequested", "TaskStarted", "TaskFailed"]
    assert w["chain"][0]["meta"]["actor"] == "admin"
    assert [e["type"] for e in w["effects"]] == ["TaskRetryScheduled"]

    # the file change that started a reload, and everything it caused, depth first
    out = run("replay", "why", story.path, str(story.at["reload_request"]), "--json")
    w = orjson.loads(out.stdout)
    assert w["chain"][0]["meta"]["actor"] == "watcher"
    effects = [(e["depth"], e["type"]) for e in w["effects"]]
    assert (1, "PluginLoaded") in effects and (2, "RoutesMounted") in effects
    assert (1, "PluginReloaded") in effects

    text = run("replay", "why", story.path, str(story.at["mounted2"])).stdout
    assert "origin: PluginReloadRequested" in text and "actor watcher" in text


async def test_bisect_finds_the_first_position_where_a_condition_holds(story: Story) -> None:
    expr = f'tasks.tasks["{TASK}"].failures > 3'
    out = run("replay", "bisect", story.path, "--until", expr, "--json")
    assert out.returncode == 0, out.stderr
    result = orjson.loads(out.stdout)
    assert result["position"] == story.at["failure4"]
    assert result["event"]["type"] == "TaskFailed"
    out = run("replay", "bisect", story.path, "--until", expr)
    assert f"first holds at position {story.at['failure4']}" in out.stdout
    never = run("replay", "bisect", story.path, "--until", f'tasks.tasks["{TASK}"].failures > 99')
    assert "never holds" in never.stdout and never.returncode == 0
    out = run(
        "replay", "bisect", story.path, "--json", "--projection", "tests.replay.userproj:FailureCounter",
        "--until", f'test.failures.failures["{TASK}"] >= 2',
    )  # fmt: skip
    assert orjson.loads(out.stdout)["position"] == story.at["failure1"]


async def test_verify_a_sound_log(story: Story) -> None:
    out = run("replay", "verify", story.path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verdict: the log is sound" in out.stdout
    report = orjson.loads(run("replay", "verify", story.path, "--json").stdout)
    assert report["ok"] and len(report["checks"]) == 7


async def test_export_then_import_a_slice(story: Story, tmp_path: Path) -> None:
    slice_path = tmp_path / "bug.jsonl"
    out = run("replay", "export", story.path, "--to", str(story.at["failure4"]), "-o", slice_path)
    assert out.returncode == 0, out.stderr
    lines = slice_path.read_text().splitlines()
    assert orjson.loads(lines[0])["xcore_slice"] == 1
    assert len(lines) == 1 + story.at["failure4"]
    # the slice replays by itself, like a log
    state = orjson.loads(run("replay", "state", slice_path, "--json").stdout)
    assert state["projections"]["scheduler.tasks"]["tasks"][TASK]["failures"] == 4
    # export never overwrites
    again = run("replay", "export", story.path, "-o", slice_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    # to stdout, filtered by type
    piped = run("replay", "export", story.path, "--type", "TaskFailed")
    assert len(piped.stdout.splitlines()) == 1 + 6

    target = tmp_path / "imported.db"
    out = run("replay", "import", slice_path, target)
    assert out.returncode == 0, out.stderr
    assert run("replay", "verify", target).returncode == 0
    same = run("replay", "timeline", target, "--json").stdout.splitlines()
    original = run("replay", "timeline", story.path, "--json", "--to", str(story.at["failure4"]))
    assert same == original.stdout.splitlines()  # positions, ids, data, times all kept
    refused = run("replay", "import", slice_path, target)
    assert refused.returncode == 2 and "never overwrites" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["state", "{log}", "--at", "9999"], "past the end"),
        (["state", "{log}", "--at", "tuesday"], "bad time"),
        (["timeline", "{log}", "--from", "2026-02-30"], "bad time"),
        (["bisect", "{log}", "--until", "__import__('os').system('true')"], "bad expression"),
        (["bisect", "{log}", "--until", "tasks.__class__"], "bad expression"),
        (["bisect", "{log}", "--until", "lambda: 1"], "bad expression"),
        (["bisect", "{log}", "--until", "unknown_thing > 1"], "unknown name"),
        (["why", "{log}", "0"], "not in"),
        (["state", "{other}"], "not an xcore event log"),
        (["state", "{dir}"], "directory"),
        (["state", "{missing}"], "no such file"),
        (["state", "postgresql://me@db/xcore"], "not supported"),
        (["state", "{log}", "--projection", "no.such.module:Thing"], "cannot import"),
    ],
)
async def test_bad_input_gets_one_line_and_exit_code_2(
    story: Story, tmp_path: Path, args: list[str], message: str
) -> None:
    other = tmp_path / "notes.db"
    other.write_text("hello, not a database\n" * 20)
    values = {"log": story.path, "other": other, "dir": tmp_path, "missing": tmp_path / "nope.db"}
    out = run("replay", *[a.format(**values) for a in args])
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xcore replay: error:") and message in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["timeline", "{log}", "--limit", "-1"], "argument --limit: -1 is less than 0"),
        (["timeline", "{log}", "--limit", "many"], "argument --limit: 'many' is not a whole"),
        (["bisect", "{log}", "--until", "1 > 0", "--every", "0"], "argument --every: 0 is less"),
    ],
)
async def test_counts_out_of_range_are_refused_before_reading_the_log(
    story: Story, args: list[str], message: str
) -> None:
    out = run("replay", *[a.format(log=story.path) for a in args])
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr.splitlines()[-1]


def test_another_sqlite_database_is_not_an_xcore_log(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    out = run("replay", "timeline", db)
    assert out.returncode == 2 and "not an xcore event log" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # nothing created


async def test_needs_no_plugin_folder_and_runs_no_plugin_code(story: Story, tmp_path: Path) -> None:
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {"PYTHONPATH": str(ROOT)}
    commands = [["state", story.path], ["verify", story.path], ["timeline", story.path]]
    for out in xcore_many([["replay", *c] for c in commands], cwd=empty, env=env):
        assert out.returncode == 0, out.stderr
    assert list(empty.iterdir()) == []
    code = (
        "import sys, replay; s = replay.state_at(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m == 'plugins' or m.startswith('plugins.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(story.path)], capture_output=True, text=True, cwd=empty,
        env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _run_in_pty(args: list[str], env: dict[str, str]) -> str:
    """Run ``xcore args`` with stdout and stderr on a terminal; return what it drew."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel.cli", *args],
        stdout=follower, stderr=follower, cwd=ROOT, env=env,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


async def test_progress_bar_on_a_terminal_and_never_in_a_pipe(story: Story) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XCORE_REPLAY_PROGRESS_DELAY": "0"}
    drawn = _run_in_pty(["replay", "verify", str(story.path)], env)
    assert "verify [" in drawn and "%" in drawn
    table = _run_in_pty(["replay", "timeline", str(story.path)], env)
    assert "POSITION" in table and "\x1b[31m" in table  # a header and colours on a terminal
    piped = xcore("replay", "verify", story.path, env={"XCORE_REPLAY_PROGRESS_DELAY": "0"})
    assert "[" not in piped.stderr and "%" not in piped.stdout + piped.stderr


async def test_bad_input_gets_one_line_and_exit_code_2_in_a_process(story: Story) -> None:
    out = xcore("replay", "state", story.path, "--at", "9999")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (
        f"xcore replay: error: position 9999 is past the end of {story.path} (last position {story.last})"
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
async def test_export_to_a_full_disk_fails_in_one_line_and_leaves_nothing(
    story: Story, tmp_path: Path
) -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "kernel.cli", "replay", "export", str(story.path)],
            stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == "xcore replay: error: No space left on device"
    out = run("replay", "export", story.path, "-o", tmp_path / "nope" / "x.jsonl")
    assert out.returncode == 2 and "no such directory" in out.stderr
    assert not (tmp_path / "nope").exists()


async def test_a_users_broken_projection_is_named_not_a_traceback(story: Story) -> None:
    out = run(
        "replay", "state", story.path, "--json", "--projection", "tests.replay.userproj:BrokenView"
    )
    assert out.returncode == 0, out.stderr
    shown = orjson.loads(out.stdout)["projections"]["test.broken_view"]
    assert shown == {"count": 6, "(view error)": "ValueError: view bug"}
    out = run("replay", "state", story.path, "--projection", "tests.replay.userproj:CannotStart")
    assert out.returncode == 2
    assert "'test.cannot_start'" in out.stderr and "reset bug" in out.stderr


async def test_from_after_to_and_a_damaged_slice_header(story: Story, tmp_path: Path) -> None:
    out = run("replay", "timeline", story.path, "--from", "9", "--to", "3")
    assert out.returncode == 2 and "comes after" in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"xcore_slice": "one"}\n')
    out = run("replay", "state", bad)
    assert out.returncode == 2 and "header is damaged" in out.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run("replay", "state", empty).returncode == 2


async def test_a_fifo_named_like_a_slice_is_refused_not_waited_on(tmp_path: Path) -> None:
    import anyio

    fifo = tmp_path / "incident.jsonl"
    os.mkfifo(fifo)
    with anyio.fail_after(60):
        for args in (("import", fifo, tmp_path / "copy.db"), ("timeline", fifo)):
            # in a thread: a blocking open() of the FIFO would hang the test otherwise
            result = await anyio.to_thread.run_sync(
                lambda a=args: run("replay", *a), abandon_on_cancel=True
            )
            assert result.returncode == 2, result
            assert "not a regular file" in result.stderr
    assert not (tmp_path / "copy.db").exists()


async def test_state_shows_escapes_in_event_data_keys_harmlessly(
    story: Story, tmp_path: Path
) -> None:
    """A plugin name is a key of the loader's table: a terminal escape in it must not
    reach the terminal raw (clearing the screen, retitling it, faking lines)."""
    exported = tmp_path / "all.jsonl"
    assert run("replay", "export", story.path, "-o", exported).returncode == 0
    lines = exported.read_bytes().splitlines()
    evil = "evil\x1b[2J\x1b]0;pwn\x07\r\nFAKE"
    for i, line in enumerate(lines[1:], 1):
        d = orjson.loads(line)
        if d["type"] == "PluginDiscovered":
            d["data"]["name"] = evil
            lines[i] = orjson.dumps(d)
            break
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_bytes(b"\n".join(lines) + b"\n")
    result = run("replay", "state", hostile, "--at", str(i), "--color", "always")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.replace("\x1b[1m", "").replace("\x1b[0m", "").replace("\x1b[2m", "")
    assert "\x1b[2J" not in shown and "\x07" not in shown and "\r" not in shown
    assert "\nFAKE" not in shown
    assert "evil" in shown


async def test_import_warns_about_the_lines_it_skips(story: Story, tmp_path: Path) -> None:
    """A garbage line in a slice is skipped by import; the new log would look sound, so
    import must say what it left out."""
    exported = tmp_path / "all.jsonl"
    assert run("replay", "export", story.path, "-o", exported).returncode == 0
    lines = exported.read_bytes().splitlines()
    lines.insert(3, b"\xff\xfe not json")
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(b"\n".join(lines) + b"\n")
    result = run("replay", "import", damaged, tmp_path / "copy.db")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "line 4" in result.stderr


async def test_import_warns_about_a_gap_in_the_slice(story: Story, tmp_path: Path) -> None:
    """A slice with a line removed imports as it is (positions are kept), and says so."""
    exported = tmp_path / "all.jsonl"
    assert run("replay", "export", story.path, "-o", exported).returncode == 0
    lines = exported.read_bytes().splitlines()
    del lines[5]  # the header is line 1: this is position 5
    holed = tmp_path / "holed.jsonl"
    holed.write_bytes(b"\n".join(lines) + b"\n")
    result = run("replay", "import", holed, tmp_path / "copy.db")
    assert result.returncode == 0, result.stderr
    assert "position 5: gap: position 5 is missing" in result.stderr
    # a slice exported with filters has gaps by design: no warning
    filtered = tmp_path / "failed.jsonl"
    assert (
        run("replay", "export", story.path, "--type", "TaskFailed", "-o", filtered).returncode == 0
    )
    quiet = run("replay", "import", filtered, tmp_path / "failed.db")
    assert quiet.returncode == 0 and "gap" not in quiet.stderr
