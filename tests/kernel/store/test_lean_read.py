"""A fold's lean records read exactly as full ones (kernel.events.LeanRecorded)."""

from __future__ import annotations

import gc
from pathlib import Path

import anyio
import pytest

from kernel.errors import StoreError
from kernel.events import LeanRecorded, Meta, NewEvent, Recorded
from kernel.projections import Projection, fold, handles
from kernel.store import SQLiteStore


def envelope(r: Recorded) -> tuple[object, ...]:
    return (r.position, r.stream, r.version, r.type, r.schema, r.data, r.meta, r.timestamp)


async def _log(path: Path, n: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        for i in range(n):
            meta = Meta(correlation_id=f"c{i}", actor="a") if i % 3 == 0 else None
            await store.append(
                [NewEvent.raw("Counted" if i % 2 else "Other", {"i": i}, meta)],
                stream=f"s-{i % 4}",
            )
    finally:
        await store.close()


async def test_lean_records_equal_full_ones_field_by_field(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path, 40)
        store = SQLiteStore(path, readonly=True)
        await store.open()
        try:
            full = await store.read()
            lean = await store.read_lean(limit=25)
            typed = await store.read_lean(after=3, types=["Counted"], limit=5)
            untouched = await store.read_lean(after=30)
        finally:
            await store.close()
    assert all(isinstance(r, LeanRecorded) for r in lean)
    assert [envelope(r) for r in lean] == [envelope(r) for r in full[:25]]
    assert [envelope(r) for r in typed] == [
        envelope(r) for r in full if r.position > 3 and r.type == "Counted"
    ][:5]
    # read after the store closed: the batch fetches its columns on its own
    assert [envelope(r) for r in untouched] == [envelope(r) for r in full[30:]]
    assert untouched[0].to_dict() == full[30].to_dict()
    with pytest.raises(AttributeError):
        untouched[0].no_such_attribute  # noqa: B018


async def test_a_fold_hands_its_handlers_every_column(tmp_path: Path) -> None:
    path = tmp_path / "log.db"

    class Seen(Projection):
        name = "seen"

        def reset(self) -> None:
            self.rows: list[tuple[object, ...]] = []

        @handles("Counted")
        def _counted(self, r: Recorded) -> None:
            self.rows.append((type(r), *envelope(r)))

    with anyio.fail_after(60):
        await _log(path, 30)
        store = SQLiteStore(path, readonly=True)
        await store.open()
        try:
            projection = Seen()
            await fold(store, projection, batch_size=7)
            full = [r for r in await store.read() if r.type == "Counted"]
        finally:
            await store.close()
    assert [row[1:] for row in projection.rows] == [envelope(r) for r in full]
    assert {row[0] for row in projection.rows} == {LeanRecorded}


async def test_a_log_gone_under_a_lean_batch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path, 3)
        store = SQLiteStore(path, readonly=True)
        await store.open()
        try:
            [r, *_] = await store.read_lean()
        finally:
            await store.close()
    path.unlink()
    with pytest.raises(StoreError, match=str(path.name)):
        r.stream  # noqa: B018


async def test_a_kept_lean_record_keeps_no_other_record_alive(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path, 20)
        store = SQLiteStore(path, readonly=True)
        await store.open()
        try:
            batch = await store.read_lean()  # no column loaded yet
        finally:
            await store.close()
    kept, other = batch[5], batch[9]
    del batch
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is LeanRecorded]
    assert sorted(r.position for r in alive) == [6, 10]
    assert (kept.stream, kept.version, other.meta.id) == ("s-1", 2, other.meta.id)


async def test_lean_reads_upcast_with_the_stored_schema(tmp_path: Path) -> None:
    """The schema is fetched with the batch only when a type read needs upcasting;
    otherwise it is loaded on access — both read as full records, upcast the same."""
    from kernel.events import Event, upcaster

    class LeanUpcastV2(Event):
        schema_version = 2
        n: int
        twice: int

    @upcaster("LeanUpcastV2", from_schema=1)
    def _twice(data: dict[str, object]) -> dict[str, object]:
        return {**data, "twice": 2 * int(data["n"])}  # type: ignore[call-overload]

    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.append(
                [NewEvent.raw("LeanUpcastV2", {"n": 1}, schema=1)], stream="u"
            )  # written by an older version
            await store.append([NewEvent.raw("Plain", {"n": 2})], stream="u")
            await store.append(
                [NewEvent.raw("LeanUpcastV2", {"n": 3, "twice": 6}, schema=2)], stream="u"
            )
        finally:
            await store.close()
        store = SQLiteStore(path, readonly=True)
        await store.open()
        try:
            full = await store.read()
            every = await store.read_lean()  # a versioned type may be read: schema fetched
            plain = await store.read_lean(types=["Plain"])  # schema loaded on access
            versioned = await store.read_lean(types=["LeanUpcastV2"])
        finally:
            await store.close()
    assert [r.data for r in full] == [{"n": 1, "twice": 2}, {"n": 2}, {"n": 3, "twice": 6}]
    assert [envelope(r) for r in every] == [envelope(r) for r in full]
    assert [envelope(r) for r in plain] == [envelope(full[1])]
    assert [envelope(r) for r in versioned] == [envelope(full[0]), envelope(full[2])]


def test_rows_without_their_schema_still_upcast_a_versioned_type() -> None:
    """A type registered past schema 1 after a lean read chose its columns: the record
    takes its schema from the batch's loaded columns."""
    from kernel.events import Event, upcaster

    class LeanLateV2(Event):
        schema_version = 2
        n: int
        tag: str

    @upcaster("LeanLateV2", from_schema=1)
    def _tag(data: dict[str, object]) -> dict[str, object]:
        return {**data, "tag": "old"}

    loaded: list[tuple[int, int]] = []

    def load(first: int, last: int) -> list[tuple[object, ...]]:
        loaded.append((first, last))
        return [(1, "s", 1, b'{"id":"a"}', 1.0, 1), (2, "s", 2, b'{"id":"b"}', 2.0, 2)]

    rows = [(1, "LeanLateV2", b'{"n":1}'), (2, "LeanLateV2", b'{"n":2,"tag":"new"}')]
    records = LeanRecorded.from_lean_rows(rows, load)
    assert [r.data for r in records] == [{"n": 1, "tag": "old"}, {"n": 2, "tag": "new"}]
    assert [(r.schema, r.stream, r.version, r.id) for r in records] == [
        (1, "s", 1, "a"),
        (2, "s", 2, "b"),
    ]
    assert loaded == [(1, 2)]  # once for the batch
    assert records[0].event == LeanLateV2(n=1, tag="old")
