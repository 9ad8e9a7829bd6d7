"""The store contract: every backend (memory, SQLite; PostgreSQL later) passes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import orjson
import pytest

from kernel.errors import ConcurrencyError, StoreClosed, StoreError
from kernel.events import Event, Meta, NewEvent, registry, upcaster
from kernel.store import (
    ANY,
    NO_STREAM,
    EventStore,
    MemoryStore,
    Snapshot,
    SQLiteStore,
    StreamWrite,
)
from kernel.store.postgres import PostgresStore
from tests.pg import pg_schema


class Noted(Event):
    text: str


def note(text: str, meta: Meta | None = None) -> NewEvent:
    return NewEvent.of(Noted(text=text), meta)


def _make(kind: str, tmp_path: Path) -> EventStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite-index-every-3":  # the stream index flushed every few events
        return SQLiteStore(tmp_path / "log.db", index_every=3)
    return SQLiteStore(tmp_path / "log.db")


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "sqlite-index-every-3",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    async with AsyncExitStack() as stack:
        s: EventStore
        if request.param == "postgres":
            s = PostgresStore(await stack.enter_async_context(pg_schema()))
        else:
            s = _make(request.param, tmp_path)
        await s.open()
        yield s
        await s.close()


async def test_positions_are_gapless_and_versions_count_per_stream(store: EventStore) -> None:
    a = await store.append([note("a1"), note("a2")], stream="a")
    b = await store.append([note("b1")], stream="b")
    c = await store.append([note("a3")], stream="a")
    assert [r.position for r in a + b + c] == [1, 2, 3, 4]
    assert [(r.stream, r.version) for r in a + b + c] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert await store.last_position() == 4
    assert await store.stream_version("a") == 3
    assert await store.stream_version("nobody") == 0


async def test_recorded_envelope_carries_data_meta_and_time(store: EventStore) -> None:
    meta = Meta(correlation_id="c1", causation_id="x", actor="ada", node="n", boot="b")
    [r] = await store.append([note("hi", meta)], stream="s")
    [back] = await store.read()
    for rec in (r, back):
        assert rec.type == "Noted"
        assert rec.schema == 1
        assert rec.data == {"text": "hi"}
        assert rec.event == Noted(text="hi")
        assert rec.meta == meta
        assert rec.recorded_at.tzinfo is not None
    assert back.to_dict()["meta"]["actor"] == "ada"


async def test_expected_version_any_no_stream_and_exact(store: EventStore) -> None:
    await store.append([note("1")], stream="s", expected_version=NO_STREAM)
    await store.append([note("2")], stream="s", expected_version=1)
    await store.append([note("3")], stream="s", expected_version=ANY)
    with pytest.raises(ConcurrencyError) as err:
        await store.append([note("x")], stream="s", expected_version=NO_STREAM)
    assert "'s'" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ConcurrencyError, match="expected version 2"):
        await store.append([note("x"), note("y")], stream="s", expected_version=2)
    # a refused append writes nothing
    assert await store.last_position() == 3
    assert [r.data["text"] for r in await store.read(stream="s")] == ["1", "2", "3"]


async def test_an_event_id_appended_twice_is_stored_once(store: EventStore) -> None:
    meta = Meta(id="0123456789abcdef0123456789abcdef")
    first = await store.append([note("once", meta)], stream="s")
    again = await store.append([note("once", meta)], stream="s", expected_version=NO_STREAM)
    assert [r.position for r in again] == [r.position for r in first]
    assert await store.last_position() == 1
    # duplicates inside one call are dropped as well
    twin = Meta(id="ffffffffffffffffffffffffffffffff")
    await store.append([note("t", twin), note("t", twin)], stream="s")
    assert await store.last_position() == 2


async def test_reads_filter_by_position_type_stream_and_limit(store: EventStore) -> None:
    for i in range(10):
        await store.append([note(f"n{i}"), NewEvent.raw("Other", {"i": i})], stream=f"s{i % 2}")
    assert [r.position for r in await store.read(after=15)] == [16, 17, 18, 19, 20]
    noted = await store.read(types=["Noted"])
    assert [r.data["text"] for r in noted] == [f"n{i}" for i in range(10)]
    s1 = await store.read(stream="s1", types={"Other"})
    assert [r.data["i"] for r in s1] == [1, 3, 5, 7, 9]
    assert len(await store.read(limit=3)) == 3
    assert [r.position for r in await store.read(after=4, limit=2)] == [5, 6]
    assert await store.read(types=[]) == []


async def test_unknown_event_types_are_kept_as_raw_data(store: EventStore) -> None:
    await store.append([NewEvent.raw("WrittenByANewerVersion", {"x": [1, 2]})], stream="s")
    [r] = await store.read()
    assert r.type == "WrittenByANewerVersion"
    assert r.data == {"x": [1, 2]}
    assert r.known is False
    assert r.event is None


async def test_old_schemas_are_upcast_on_read(store: EventStore) -> None:
    class Renamed(Event):
        type_name = "ContractRenamed"
        schema_version = 2
        full_name: str

    @upcaster("ContractRenamed", from_schema=1)
    def _v1_to_v2(data: dict[str, object]) -> dict[str, object]:
        return {"full_name": data["name"]}

    try:
        await store.append([NewEvent.raw("ContractRenamed", {"name": "ada"}, schema=1)], stream="s")
        await store.append([NewEvent.of(Renamed(full_name="bob"))], stream="s")
        old, new = await store.read()
        assert old.schema == 1 and old.data == {"full_name": "ada"}
        assert old.event == Renamed(full_name="ada")
        assert new.schema == 2 and new.data == {"full_name": "bob"}
    finally:
        registry._types.pop("ContractRenamed", None)
        registry._upcasters.pop(("ContractRenamed", 1), None)
        registry.versioned.discard("ContractRenamed")


async def test_concurrent_appenders_lose_nothing(store: EventStore) -> None:
    async def producer(i: int) -> None:
        for j in range(20):
            await store.append([note(f"{i}-{j}")], stream=f"p{i}")

    with anyio.fail_after(30):
        await asyncio.gather(*(producer(i) for i in range(50)))
    records = await store.read()
    assert [r.position for r in records] == list(range(1, 1001))
    for i in range(50):
        versions = [r.version for r in records if r.stream == f"p{i}"]
        assert versions == list(range(1, 21))


async def test_wait_returns_on_commit_or_timeout(store: EventStore) -> None:
    with anyio.fail_after(5):
        assert await store.wait(0, timeout=0.01) == 0

        async def later() -> None:
            await asyncio.sleep(0.02)
            await store.append([note("x")], stream="s")

        task = asyncio.create_task(later())
        assert await store.wait(0) == 1
        await task
        assert await store.wait(0) == 1  # already past: returns at once


async def test_checkpoints_and_snapshots(store: EventStore) -> None:
    assert await store.load_checkpoint("sub") is None
    await store.save_checkpoint("sub", 5)
    await store.save_checkpoint("sub", 7)
    assert await store.load_checkpoint("sub") == 7
    assert await store.load_snapshot("proj") is None
    await store.save_snapshot(Snapshot("proj", 3, 1, orjson.dumps({"n": 3})))
    await store.save_snapshot(Snapshot("proj", 9, 2, orjson.dumps({"n": 9})))
    snap = await store.load_snapshot("proj")
    assert snap is not None and snap.position == 9 and snap.schema == 2
    assert orjson.loads(snap.state) == {"n": 9}


async def test_a_closed_store_refuses_work(store: EventStore) -> None:
    await store.close()
    with pytest.raises(StoreClosed):
        await store.append([note("late")], stream="s")
    with pytest.raises(StoreClosed):
        await store.read()
    await store.open()  # the fixture closes it again


async def test_a_refused_append_does_not_claim_its_ids(store: EventStore) -> None:
    # both calls land in one group commit; the first is refused for its version
    meta = Meta(id="abababababababababababababababab")
    refused, stored = await asyncio.gather(
        store.append([note("a", meta)], stream="s", expected_version=5),
        store.append([note("a", meta)], stream="s"),
        return_exceptions=True,
    )
    assert isinstance(refused, ConcurrencyError)
    assert not isinstance(stored, BaseException)
    assert [r.position for r in stored] == [1]
    assert [r.meta.id for r in await store.read()] == [meta.id]


async def test_what_a_reader_gets_is_its_own(store: EventStore) -> None:
    [appended] = await store.append([NewEvent.raw("Listed", {"items": [1]})], stream="s")
    [first] = await store.read()
    first.data["items"].append(2)
    appended.data["x"] = 1
    [second] = await store.read()
    assert second.data == {"items": [1]}


async def test_a_payload_that_is_not_json_fails_only_its_own_append(store: EventStore) -> None:
    broken = NewEvent(type="Noted", data=b"{oops", meta=Meta())
    good, bad = await asyncio.gather(
        store.append([note("fine")], stream="a"),
        store.append([broken], stream="b"),
        return_exceptions=True,
    )
    assert isinstance(bad, StoreError)
    assert not isinstance(good, BaseException)
    assert [r.data["text"] for r in await store.read()] == ["fine"]


async def test_health_reports_an_open_store_and_a_closed_one(store: EventStore) -> None:
    ok, details = store.health()
    assert ok and details["location"] == store.location
    await store.close()
    ok, _ = store.health()
    assert not ok
    with pytest.raises(StoreClosed):
        await store.append([note("late")], stream="s")
    await store.open()


async def test_a_limit_of_zero_reads_nothing_and_a_negative_one_is_refused(
    store: EventStore,
) -> None:
    await store.append([note(f"n{i}") for i in range(5)], stream="s")
    # from the in-memory tail and from the log itself alike
    for after in (0, -1):
        assert await store.read(after=after, limit=0) == []
        assert await store.read(after=after, stream="s", limit=0) == []
        with pytest.raises(StoreError, match="limit"):
            await store.read(after=after, limit=-1)
    assert [r.position for r in await store.read(limit=2)] == [1, 2]


async def test_a_single_type_name_given_as_types_is_refused(store: EventStore) -> None:
    await store.append([note("n")], stream="s")
    # a string is a collection of characters: it would silently match nothing
    for after in (0, -1):
        with pytest.raises(StoreError, match="types"):
            await store.read(after=after, types="Note")


async def test_the_largest_schema_number_is_kept_and_a_larger_one_refused(
    store: EventStore,
) -> None:
    """Schema numbers run from 1 to MAX_SCHEMA on every store (PostgreSQL's INTEGER);
    past it the event is refused when it is built, naming its type, instead of failing
    in PostgreSQL's driver ("invalid input for query argument $11")."""
    from kernel.errors import EventError
    from kernel.events import MAX_SCHEMA

    [r] = await store.append([NewEvent.raw("Big", {}, schema=MAX_SCHEMA)], stream="s")
    [back] = await store.read(after=0)
    assert r.schema == back.schema == MAX_SCHEMA
    for bad in (MAX_SCHEMA + 1, 0, -1):
        with pytest.raises(EventError, match=r"event type 'Big': schema must be .* got"):
            NewEvent.raw("Big", {}, schema=bad)
    with pytest.raises(EventError, match="event class .*TooNew: schema must be"):

        class TooNew(Event):
            schema_version = MAX_SCHEMA + 1


async def test_append_many_writes_each_stream_and_decides_each_write_alone(
    store: EventStore,
) -> None:
    await store.append([note("old")], stream="b")
    taken = Meta(id="cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd")
    await store.append([note("claimed", taken)], stream="c")
    broken = NewEvent(type="Noted", data=b"{oops", meta=Meta())
    answers = await store.append_many(
        [
            StreamWrite("a", [note("a1"), note("a2")], NO_STREAM),
            StreamWrite("b", [note("lost")], NO_STREAM),  # b is at 1: refused alone
            StreamWrite("c", [note("again", taken)], 0),  # its id is stored: answered
            StreamWrite("d", [broken]),  # not JSON: refused alone
            StreamWrite("e", []),
            StreamWrite("b", [note("b2")], 1),
        ]
    )
    a, b, c, d, e, b2 = answers
    assert isinstance(b, ConcurrencyError) and "'b'" in str(b)
    assert isinstance(d, StoreError)
    assert not isinstance(a, StoreError) and [(r.stream, r.version) for r in a] == [
        ("a", 1),
        ("a", 2),
    ]
    assert not isinstance(c, StoreError) and [r.position for r in c] == [2]
    assert e == []
    assert not isinstance(b2, StoreError) and [(r.stream, r.version) for r in b2] == [("b", 2)]
    stored = await store.read()
    assert [r.position for r in stored] == [1, 2, 3, 4, 5]  # gapless, nothing refused
    assert [r.data["text"] for r in stored] == ["old", "claimed", "a1", "a2", "b2"]
    assert await store.append_many([]) == []


async def test_a_malformed_write_is_refused_alone_and_nothing_of_it_is_written(
    store: EventStore,
) -> None:
    """A stream name that is not a string, an item that is not an event, a write that
    is not a StreamWrite: each gets its StoreError in its place, the writes around it
    (and another caller's append in the same batch) are stored, the log goes on."""
    hostile: list[object] = [
        StreamWrite("a", [note("a1")]),
        StreamWrite(None, [note("lost")]),  # type: ignore[arg-type]
        StreamWrite("b", [note("b1"), {"text": "not an event"}]),  # type: ignore[list-item]
        ("c", [note("lost")]),
        StreamWrite("d", note("lost")),  # type: ignore[arg-type]
        StreamWrite("e", [note("e1")]),
    ]
    with anyio.fail_after(30):
        innocent, answers = await asyncio.gather(
            store.append([note("i1")], stream="i"),
            store.append_many(hostile),  # type: ignore[arg-type]
        )
        a, none, b, c, d, e = answers
        for refused, culprit in ((none, "None"), (b, "'b'"), (c, "tuple"), (d, "'d'")):
            assert isinstance(refused, StoreError) and culprit in str(refused)
        assert not isinstance(a, StoreError) and [r.stream for r in a] == ["a"]
        assert not isinstance(e, StoreError) and [r.stream for r in e] == ["e"]
        assert [r.stream for r in innocent] == ["i"]
        with pytest.raises(StoreError, match="is not a NewEvent"):
            await store.append([note("x1"), "not an event"], stream="x")  # type: ignore[list-item]
        with pytest.raises(StoreError, match="stream name must be a string"):
            await store.append([note("x1")], stream=b"x")  # type: ignore[arg-type]
        stored = await store.read()
        assert sorted(r.stream for r in stored) == ["a", "e", "i"]
        assert [r.position for r in stored] == [1, 2, 3]
        [after] = await store.append([note("i2")], stream="i")
        assert (after.position, after.version) == (4, 2)


@pytest.mark.parametrize("expected", ["1", 1.0, True])
async def test_an_expected_version_that_is_not_a_whole_number_is_refused_by_name(
    store: EventStore, expected: object
) -> None:
    """ "1" was refused as a conflict naming the very version the stream was at, and
    True passed as version 1: refused by name, nothing written, in append_many alone."""
    await store.append([note("first")], stream="v")
    with anyio.fail_after(30):
        with pytest.raises(StoreError, match="expected_version must be a whole number"):
            await store.append([note("x")], stream="v", expected_version=expected)  # type: ignore[arg-type]
        bad, good = await store.append_many(
            [StreamWrite("v", [note("x")], expected), StreamWrite("v", [note("y")], 1)]  # type: ignore[arg-type]
        )
        assert isinstance(bad, StoreError) and "expected_version" in str(bad)
        assert not isinstance(good, StoreError) and [r.version for r in good] == [2]
        assert [r.data["text"] for r in await store.read(stream="v")] == ["first", "y"]


async def test_events_given_as_an_iterator_are_appended(store: EventStore) -> None:
    with anyio.fail_after(30):
        [only] = await store.append_many([StreamWrite("g", (n for n in [note("g1")]))])
        assert not isinstance(only, StoreError) and [r.version for r in only] == [1]
        got = await store.append((n for n in [note("g2"), note("g3")]), stream="g")
        assert [r.version for r in got] == [2, 3]
        assert [r.data["text"] for r in await store.read(stream="g")] == ["g1", "g2", "g3"]


async def test_append_many_on_a_closed_store_raises(store: EventStore) -> None:
    await store.close()
    with pytest.raises(StoreClosed):
        await store.append_many([StreamWrite("s", [note("x")])])
    await store.open()  # the fixture closes it again
