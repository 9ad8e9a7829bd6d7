"""A fold over SQLite builds each record from its row as it applies it
(kernel.events.LeanRows, kernel.projections._apply_rows), and hands its handlers records
that read exactly as full ones."""

from __future__ import annotations

import copy
import gc
import pickle
from pathlib import Path

import anyio
import pytest

from kernel.errors import StoreError, XcoreError
from kernel.events import Event, LeanRecorded, LoadedRecorded, NewEvent, Recorded, upcaster
from kernel.projections import Projection, fold, handles, state_at
from kernel.store import SQLiteStore


class LeanFoldV2(Event):
    schema_version = 2
    n: int
    twice: int


@upcaster("LeanFoldV2", from_schema=1)
def _twice(data: dict[str, object]) -> dict[str, object]:
    return {**data, "twice": 2 * int(data["n"])}  # type: ignore[call-overload]


def envelope(r: Recorded) -> tuple[object, ...]:
    return (r.position, r.stream, r.version, r.type, r.schema, r.data, r.meta, r.timestamp)


async def _log(path: Path) -> None:
    """A, B, A, B... with a LeanFoldV2 every 5th event (schema 1 and 2 in turn)."""
    store = SQLiteStore(path)
    await store.open()
    try:
        for i in range(1, 41):
            if i % 5 == 0:
                new = (
                    NewEvent.raw("LeanFoldV2", {"n": i}, schema=1)
                    if i % 10
                    else NewEvent.raw("LeanFoldV2", {"n": i, "twice": -i}, schema=2)
                )
            else:
                new = NewEvent.raw("FoldA" if i % 2 else "FoldB", {"i": i})
            await store.append([new], stream=f"s-{i % 3}")
    finally:
        await store.close()


async def _readonly(path: Path) -> SQLiteStore:
    store = SQLiteStore(path, readonly=True)
    await store.open()
    return store


class Everything(Projection):
    name = "lean-fold-everything"

    def reset(self) -> None:
        self.seen: list[tuple[str, object]] = []

    @handles("FoldA")
    def _a(self, r: Recorded) -> None:
        self.seen.append(("a", envelope(r)))

    @handles("FoldB")
    def _b(self, r: Recorded) -> None:
        self.seen.append(("b", envelope(r)))

    @handles("LeanFoldV2")
    def _v(self, r: Recorded) -> None:
        self.seen.append(("v", envelope(r)))


class Plain(Projection):
    """Reads no versioned type: its rows come without their schema."""

    name = "lean-fold-plain"

    def reset(self) -> None:
        self.seen: list[tuple[str, object]] = []

    @handles("FoldA")
    def _a(self, r: Recorded) -> None:
        self.seen.append(("a", envelope(r)))

    @handles("FoldB")
    def _b(self, r: Recorded) -> None:
        self.seen.append(("b", envelope(r)))


async def test_alternating_and_upcast_types_reach_their_own_handler_as_full_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            full = await store.read()
            every, plain = Everything(), Plain()
            for batch_size in (1, 3, 7, 1000):
                every.reset()
                every.position = 0
                plain.reset()
                plain.position = 0
                assert await fold(store, every, batch_size=batch_size) == 40
                assert await fold(store, plain, batch_size=batch_size) == 32
                kind = {"FoldA": "a", "FoldB": "b", "LeanFoldV2": "v"}
                assert every.seen == [(kind[r.type], envelope(r)) for r in full]
                assert plain.seen == [
                    (kind[r.type], envelope(r)) for r in full if r.type != "LeanFoldV2"
                ]
                assert every.position == plain.position == 40
        finally:
            await store.close()
    assert [r.data["twice"] for r in full if r.type == "LeanFoldV2"] == [
        10,
        -10,
        30,
        -20,
        50,
        -30,
        70,
        -40,
    ]


class LiveRecords(Projection):
    """Counts the lean records alive while each handler runs (it keeps none)."""

    name = "lean-fold-live"

    def reset(self) -> None:
        self.alive: list[int] = []

    @handles("FoldA", "FoldB")
    def _count(self, r: Recorded) -> None:
        self.alive.append(sum(1 for o in gc.get_objects() if isinstance(o, LeanRecorded)))


async def test_a_fold_holds_one_record_at_a_time(tmp_path: Path) -> None:
    """Each record is built as it is applied and freed before the next: no list of a
    batch's records (the memory of a record is reused while still in the CPU's cache)."""
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            p = LiveRecords()
            await fold(store, p, batch_size=10)
        finally:
            await store.close()
    assert p.alive == [1] * 32


async def test_a_failing_handler_leaves_the_position_at_the_last_row_applied(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"

    class FailsOnce(Projection):
        name = "lean-fold-fails-once"

        def reset(self) -> None:
            self.applied: list[int] = []
            self.fail_at: int | None = None

        @handles("FoldA", "FoldB")
        def _ab(self, r: Recorded) -> None:
            if r.position == self.fail_at:
                self.fail_at = None
                raise RuntimeError("a handler failed once")
            self.applied.append(r.position)

    expected = [i for i in range(1, 41) if i % 5]
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            for fail_at, before in ((7, 6), (1, 0), (11, 9)):  # mid-batch, first, after a gap
                p = FailsOnce()
                p.fail_at = fail_at
                with pytest.raises(RuntimeError, match="failed once"):
                    await fold(store, p, batch_size=4)
                assert p.applied == [i for i in expected if i < fail_at]
                assert p.position == before
                await fold(store, p, batch_size=4)
                assert p.applied == expected
                assert p.position == 40
        finally:
            await store.close()


async def test_state_at_reads_no_row_past_its_position(tmp_path: Path) -> None:
    """``until`` is part of the read (a batch is not cut after it is built)."""
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            for position in (1, 4, 5, 13, 39, 40):
                p = await state_at(store, Everything, position)
                assert p.position == position
                assert [e[1][0] for e in p.seen] == list(range(1, position + 1))  # type: ignore[index]
            p = Plain()
            assert await fold(store, p, until=12, batch_size=4) == 10
            assert p.position == 12
        finally:
            await store.close()


async def test_lean_records_read_unread_columns_through_properties(tmp_path: Path) -> None:
    """No ``__getattr__`` (it would put every attribute read on the interpreter's slow
    path): the unread columns are properties; once loaded the record is a
    :class:`LoadedRecorded` whose columns are plain slots, and reads the same."""
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            full = await store.read(types=["FoldA"])
            lean = await store.read_lean(types=["FoldA"])
        finally:
            await store.close()
    assert not any("__getattr__" in vars(k) for k in LeanRecorded.__mro__[:-1])
    assert {type(r) for r in lean} == {LeanRecorded}
    assert lean[0].event is None  # an unknown type: no typed event, nothing loaded
    assert type(lean[0]) is LeanRecorded
    assert lean[1].meta == full[1].meta  # the first column read loads the batch
    assert type(lean[1]) is LoadedRecorded
    assert isinstance(lean[1], LeanRecorded)
    for slot in ("stream", "version", "schema", "timestamp", "_meta", "_event"):
        assert vars(LoadedRecorded)[slot] is vars(Recorded)[slot]
    assert [envelope(r) for r in lean] == [envelope(r) for r in full]
    assert {type(r) for r in lean} == {LoadedRecorded}
    with pytest.raises(TypeError):
        LeanRecorded(1, "s", 1, "t", 1, {}, b"{}", 0.0)  # type: ignore[call-arg]
    bare = LeanRecorded()
    with pytest.raises(AttributeError, match="batch"):
        bare.stream  # noqa: B018


async def test_lean_records_pickle_and_copy_as_the_full_records_they_read_as(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            full = await store.read()
            lean = await store.read_lean()
        finally:
            await store.close()
    lean[3].meta  # noqa: B018  (decoded metadata is carried as such)
    for i, copied in enumerate(
        [pickle.loads(pickle.dumps(lean[0])), copy.copy(lean[3]), copy.deepcopy(lean[9])]
    ):
        assert type(copied) is Recorded
        assert envelope(copied) == envelope(full[(0, 3, 9)[i]])


async def test_a_position_that_is_not_an_int_is_refused_not_compared_as_sqlite_would(
    tmp_path: Path,
) -> None:
    """SQLite orders every integer before any text: ``position <= '5'`` holds for every
    row. The fold refused such a bound in Python before it was part of the read; a
    float still reads as the number it is."""
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            for bad in ("5", b"5"):
                with pytest.raises(StoreError, match="until must be a position"):
                    await state_at(store, Everything, bad)  # type: ignore[arg-type]
                with pytest.raises(StoreError, match="until must be a position"):
                    await store.read_lean_rows(until=bad)  # type: ignore[arg-type]
            p = await state_at(store, Everything, 4.5)  # type: ignore[arg-type]
            assert len(p.seen) == 4
        finally:
            await store.close()


async def test_a_batch_size_below_one_is_refused_not_an_endless_fold(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with anyio.fail_after(60):
        await _log(path)
        store = await _readonly(path)
        try:
            for bad in (0, -1, 2.5):
                with pytest.raises(XcoreError, match="batch_size"):
                    await fold(store, Plain(), batch_size=bad)  # type: ignore[arg-type]
        finally:
            await store.close()


class KeepsOnePerBatch(Projection):
    """Keeps the first record of each batch untouched; another record of the batch reads
    its stream (so the batch's columns are loaded while the fold is on it)."""

    name = "keeps-one-per-batch"

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Recorded] = []
        self.streams: list[str] = []

    @handles("FoldA", "FoldB", "LeanFoldV2")
    def on(self, r: Recorded) -> None:
        if r.position % 8 == 1:
            self.kept.append(r)
        elif r.position % 8 == 2:
            self.streams.append(r.stream)


class KeepsWithItsOwnApply(KeepsOnePerBatch):
    """An apply() of its own: the fold builds each batch's records first."""

    name = "keeps-with-its-own-apply"

    def apply(self, record: Recorded) -> None:
        super().apply(record)


@pytest.mark.parametrize("fast", [True, False])
async def test_a_kept_record_keeps_no_other_row_of_its_batch_alive(
    tmp_path: Path, fast: bool
) -> None:
    """Once the fold is past a batch, a record the projection kept holds none of the
    batch's loaded columns (it held all 20,000 rows' by default); read later, its own
    columns are still right, after the store closed too."""
    path = tmp_path / "log.db"
    await _log(path)
    store = await _readonly(path)
    projection = KeepsOnePerBatch() if fast else KeepsWithItsOwnApply()
    try:
        with anyio.fail_after(30):
            await fold(store, projection, batch_size=8)
            full = {r.position: envelope(r) for r in await store.read()}
    finally:
        await store.close()
    assert len(projection.kept) == 5 and len(projection.streams) == 5
    for r in projection.kept:
        assert isinstance(r, LeanRecorded) and not isinstance(r, LoadedRecorded)
        batch = r._batch
        assert batch is not None and batch.released and batch._rows is None
    assert [envelope(r) for r in projection.kept] == [full[p] for p in (1, 9, 17, 25, 33)]
    assert all(r._batch is None for r in projection.kept)  # each loaded its own row


@pytest.mark.parametrize("until", [float("nan"), float("inf"), True, "3"])
async def test_an_until_that_is_not_a_position_is_refused_and_a_float_leaves_a_whole_one(
    tmp_path: Path, until: object
) -> None:
    """NaN folded every event, past any bound, and 2.5 became the projection's
    position (between two events): NaN, infinity, a bool, text are refused by name, the
    projection untouched; a finite float folds up to the position below it."""
    path = tmp_path / "log.db"
    await _log(path)
    store = await _readonly(path)
    projection = Plain()
    try:
        with anyio.fail_after(30), pytest.raises(StoreError, match="until must be a position"):
            await fold(store, projection, until=until)  # type: ignore[arg-type]
        assert projection.position == 0
        with anyio.fail_after(30):
            await fold(store, projection, until=2.5)  # type: ignore[arg-type]
        assert projection.position == 2 and type(projection.position) is int
        assert [e[1][0] for e in projection.seen] == [1, 2]
    finally:
        await store.close()
