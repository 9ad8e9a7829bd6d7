"""Metadata is stored with the fields that are set, and every field reads back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import orjson

from kernel.events import Meta, NewEvent
from kernel.store import SQLiteStore


def test_an_id_alone_is_stored_alone_and_reads_back_with_the_rest_none() -> None:
    meta = Meta(id="abc")
    assert orjson.loads(meta.to_json()) == {"id": "abc"}
    assert Meta.from_json(meta.to_json()) == meta


def test_every_field_set_round_trips_odd_values() -> None:
    meta = Meta(
        id='q"\\\n\u2028',
        correlation_id="",
        causation_id="c",
        actor="\x00a",
        node="n",
        boot="b",
    )
    assert Meta.from_json(meta.to_json()) == meta
    assert set(orjson.loads(meta.to_json())) == {
        "id",
        "correlation_id",
        "causation_id",
        "actor",
        "node",
        "boot",
    }


async def test_a_log_holds_compact_and_full_metadata_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    full = Meta(id="full", correlation_id="r", causation_id="c", actor="a", node="n", boot="b")
    with anyio.fail_after(30):
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.append([NewEvent.raw("A", {}), NewEvent.raw("B", {}, full)], stream="s")
        finally:
            await store.close()
        conn = sqlite3.connect(path)
        try:
            stored = [orjson.loads(m) for (m,) in conn.execute("SELECT meta FROM events")]
        finally:
            conn.close()
        assert list(stored[0]) == ["id"]
        again = SQLiteStore(path, readonly=True)
        await again.open()
        try:
            a, b = await again.read()
        finally:
            await again.close()
    assert (a.meta.correlation_id, a.meta.actor, a.meta.boot) == (None, None, None)
    assert b.meta == full


def test_meta_and_new_event_stay_frozen_dataclasses() -> None:
    """Their hand-written __init__ (cheaper than the generated one) keeps what the
    dataclass promised: a fresh id by default, keywords, equality, replace, frozen."""
    import dataclasses
    import pickle

    import pytest

    a, b = Meta(), Meta()
    assert a.id != b.id and len(a.id) == 32
    assert Meta(id=None).id is None  # type: ignore[arg-type]  # explicit, kept as given
    m = Meta(id="x", actor="me")
    assert m == Meta(id="x", actor="me") and hash(m) == hash(Meta(id="x", actor="me"))
    assert dataclasses.replace(m, node="n") == Meta(id="x", actor="me", node="n")
    assert pickle.loads(pickle.dumps(m)) == m
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.actor = "other"  # type: ignore[misc]
    e = NewEvent("T", b"{}", m)
    assert (e.type, e.data, e.meta, e.schema, e.explicit_id) == ("T", b"{}", m, 1, False)
    assert NewEvent("T", b"{}", m, 2, explicit_id=True) == dataclasses.replace(
        e, schema=2, explicit_id=True
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.schema = 3  # type: ignore[misc]
