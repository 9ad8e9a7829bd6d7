"""``verify`` finds each kind of defect, names its position, and exits 1; the other
commands report the same defects and still replay as far as they can."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import orjson
import pytest

from kernel import Event, Kernel, Settings, upcaster
from services.loader.projection import PluginTable
from tests.replay.conftest import run
from tests.replay.scenario import TASK, Story, loaded, write_story

pytestmark = pytest.mark.anyio


def insert(path: Path, position: int, stream: str, version: int, type_: str, data: bytes) -> None:
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO events (position, stream, version, type, schema, data, meta, id, recorded_at)"
        " VALUES (?, ?, ?, ?, 1, ?, ?, ?, 1800000000.0)",
        (
            position,
            stream,
            version,
            type_,
            data,
            orjson.dumps({"id": f"id-{position}"}),
            f"id-{position}",
        ),
    )
    conn.commit()
    conn.close()


def report(path: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    out = run("replay", "verify", path, "--json", *extra)
    data = orjson.loads(out.stdout)
    data["exit"] = out.returncode
    return data


def defects(rep: dict, check: str) -> list[tuple[str, int]]:  # type: ignore[type-arg]
    [c] = [c for c in rep["checks"] if c["name"].startswith(check)]
    return [(d["kind"], d["position"]) for d in c["defects"]]


async def test_a_gap_in_positions(story: Story) -> None:
    insert(story.path, story.last + 4, "kernel", 99, "KernelStopped", b'{"node":"n1","boot":"b"}')
    rep = report(story.path)
    assert rep["exit"] == 1 and not rep["ok"]
    assert defects(rep, "positions") == [("gap", story.last + 1)]
    assert "positions 29..31 missing" in run("replay", "verify", story.path).stdout
    # state still replays, and warns with the position
    out = run("replay", "state", story.path, "--json")
    assert out.returncode == 0
    assert f"position {story.last + 1}: gap" in out.stderr


async def test_stream_versions_that_skip(story: Story) -> None:
    insert(
        story.path, story.last + 1, f"task-{TASK}", 40, "TaskPaused", orjson.dumps({"task": TASK})
    )
    rep = report(story.path)
    assert defects(rep, "stream versions") == [("version", story.last + 1)]
    assert rep["exit"] == 1


async def test_a_corrupted_row_is_reported_and_skipped(story: Story) -> None:
    insert(story.path, story.last + 1, f"task-{TASK}", 22, "TaskFailed", b"{not json")
    more = orjson.dumps({"task": TASK, "run_id": "z", "attempt": 1, "error": "after"})
    insert(story.path, story.last + 2, f"task-{TASK}", 23, "TaskFailed", more)
    rep = report(story.path)
    assert ("corrupt", story.last + 1) in defects(rep, "every event decodes")
    assert rep["exit"] == 1
    # replay goes on past the bad row: the failure after it is counted
    out = run("replay", "state", story.path, "--json", "--projection", "tasks")
    assert out.returncode == 0
    assert (
        orjson.loads(out.stdout)["projections"]["scheduler.tasks"]["tasks"][TASK]["failures"] == 6
    )
    assert f"position {story.last + 1}: corrupt" in out.stderr
    out = run("replay", "timeline", story.path, "--json")
    positions = [orjson.loads(line)["position"] for line in out.stdout.splitlines()]
    assert story.last + 1 not in positions and story.last + 2 in positions
    assert f"position {story.last + 1}: corrupt" in out.stderr


async def test_an_event_that_does_not_match_its_schema(story: Story) -> None:
    insert(
        story.path, story.last + 1, f"task-{TASK}", 22, "TaskFailed", orjson.dumps({"task": TASK})
    )
    rep = report(story.path)
    kinds = defects(rep, "every event decodes")
    assert kinds == [("schema", story.last + 1)]
    # the scheduler's projection reads run_id from it: a handler defect, same position
    assert defects(rep, "every projection rebuilds") == [("handler", story.last + 1)]


async def test_unknown_types_are_warnings_unless_strict(story: Story) -> None:
    insert(story.path, story.last + 1, "shop", 1, "CartOpened", b'{"cart":"c1"}')
    rep = report(story.path)
    assert rep["ok"] and rep["exit"] == 0
    assert any("'CartOpened'" in w and str(story.last + 1) in w for w in rep["warnings"])
    assert report(story.path, "--strict")["exit"] == 1
    out = run("replay", "timeline", story.path)
    assert "(unknown type)" in out.stdout.splitlines()[-1]


async def test_saved_snapshots_are_compared_with_a_fresh_rebuild(tmp_path: Path) -> None:
    story = await write_story(tmp_path / "var")
    # a kernel running the loader's projection saves its snapshot when it stops
    async with Kernel(Settings(data_dir=tmp_path / "var", node="n1"), services=[]) as kernel:
        await kernel.add_projection(PluginTable())
        await kernel.append(loaded(3), stream="plugin-hello")
    rep = report(story.path)
    assert rep["ok"], rep
    [c] = [c for c in rep["checks"] if c["name"].startswith("saved snapshots")]
    assert "loader.plugins at" in c["detail"]

    # a snapshot that says something the log does not
    conn = sqlite3.connect(story.path)
    [(position, state)] = conn.execute(
        "SELECT position, state FROM snapshots WHERE name = 'loader.plugins'"
    ).fetchall()
    data = orjson.loads(state)
    data["rows"]["hello"]["reloads"] = 42
    conn.execute(
        "UPDATE snapshots SET state = ? WHERE name = 'loader.plugins'", (orjson.dumps(data),)
    )
    conn.commit()
    conn.close()
    rep = report(story.path)
    assert rep["exit"] == 1
    [d] = [
        d for c in rep["checks"] if c["name"].startswith("saved snapshots") for d in c["defects"]
    ]
    assert d["position"] == position and "rows.hello.reloads" in d["message"]


async def test_hostile_event_data_cannot_drive_the_terminal(story: Story) -> None:
    evil = orjson.dumps({"task": "x\x1b[2J\x1b]0;pwned\x07", "error": "line1\nline2\r"})
    insert(story.path, story.last + 1, "task-\x1b[31mevil", 1, "TaskFailed\x1b[0m", evil)
    out = run("replay", "timeline", story.path, "--from", str(story.last + 1))
    assert out.returncode == 0
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\r" not in out.stdout
    assert "\\x1b[2J" in out.stdout  # shown, escaped
    for args in (
        ["state", story.path],
        ["verify", story.path],
        ["why", story.path, str(story.last + 1)],
    ):
        out = run("replay", *args)
        assert "\x1b" not in out.stdout + out.stderr and "\x07" not in out.stdout + out.stderr, args


async def test_corrupt_metadata_is_reported_not_a_crash(story: Story) -> None:
    conn = sqlite3.connect(story.path)
    conn.execute(
        "INSERT INTO events (position, stream, version, type, schema, data, meta, id, recorded_at)"
        " VALUES (?, 'kernel', 99, 'KernelStopped', 1, '{\"node\":\"n\",\"boot\":\"b\"}', '{oops', 'bad', 1.0)",
        (story.last + 1,),
    )
    conn.commit()
    conn.close()
    out = run("replay", "timeline", story.path, "--json")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == story.last
    assert f"position {story.last + 1}: corrupt" in out.stderr
    out = run("replay", "why", story.path, str(story.last + 1))
    assert out.returncode == 2 and "metadata is corrupt" in out.stderr
    assert run("replay", "why", story.path, "8").returncode == 0  # the scan skips the bad row
    rep = report(story.path)
    assert ("corrupt", story.last + 1) in defects(rep, "every event decodes")


class Gadget(Event):
    """Schema 2 added ``size``; the upcaster fills it for schema-1 rows."""

    schema_version = 2
    name: str
    size: int


@upcaster("Gadget", 1)
def _gadget_1_to_2(data: dict) -> dict:  # type: ignore[type-arg]
    return {**data, "size": 0}


class Gizmo(Event):
    """At schema 3 with no upcaster from 2: schema-2 rows cannot be read as it is now."""

    schema_version = 3
    name: str


@upcaster("Gizmo", 1)
def _gizmo_1_to_2(data: dict) -> dict:  # type: ignore[type-arg]
    return data


async def test_events_decode_after_upcasting_and_a_missing_upcaster_is_a_defect(
    story: Story,
) -> None:
    conn = sqlite3.connect(story.path)
    rows = [
        (story.last + 1, "gadgets", 1, "Gadget", 1, b'{"name":"g"}'),
        (story.last + 2, "gizmos", 1, "Gizmo", 2, b'{"name":"z"}'),
    ]
    for pos, stream, version, type_, schema, data in rows:
        conn.execute(
            "INSERT INTO events (position, stream, version, type, schema, data, meta, id,"
            " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1800000000.0)",
            (pos, stream, version, type_, schema, data, orjson.dumps({"id": f"u{pos}"}), f"u{pos}"),
        )
    conn.commit()
    conn.close()
    out = run("replay", "timeline", story.path, "--json", "--type", "Gadget")
    assert orjson.loads(out.stdout)["data"] == {"name": "g", "size": 0}
    rep = report(story.path)
    assert defects(rep, "every event decodes") == [("upcast", story.last + 2)]


@pytest.mark.parametrize("keep", [4096, 0.5])
async def test_a_truncated_copy_is_a_defect_to_verify_and_bad_input_elsewhere(
    story: Story, tmp_path: Path, keep: float
) -> None:
    data = await anyio.Path(story.path).read_bytes()
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: int(keep if keep >= 1 else len(data) * keep)])
    out = run("replay", "verify", cut)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.startswith("DAMAGED ") and str(cut) in out.stdout
    found = orjson.loads(run("replay", "verify", cut, "--json").stdout)
    assert found["ok"] is False and "damaged" in found
    other = run("replay", "state", cut)
    assert other.returncode == 2 and other.stderr.startswith("xcore replay: error:")
