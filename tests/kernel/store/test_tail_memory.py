"""The kernel's tail of recent events holds each event in about its own size.

orjson returns its output in a buffer of at least 4 KiB: kept as is, each stored row of
the tail (8,192 of them) held 4 KiB of metadata and 4 KiB of data whatever their length,
so a server's memory grew by ~24 KiB per plugin reload until the tail was full.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import anyio

from kernel.events import Meta, NewEvent
from kernel.store import SQLiteStore

EVENTS = 2000


def _held(make: object) -> int:
    """Bytes still allocated after building EVENTS values with ``make`` and keeping them."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(EVENTS)]  # type: ignore[operator]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == EVENTS
    return after - before


def test_the_stored_forms_of_meta_and_raw_data_are_about_their_own_size() -> None:
    meta = Meta(correlation_id="r" * 36, causation_id="c" * 36, actor="loader", node="n")
    per_meta = _held(meta.to_json) / EVENTS
    per_data = _held(lambda: NewEvent.raw("A", {"name": "hello", "n": 1}).data) / EVENTS
    assert per_meta < 1024, per_meta
    assert per_data < 1024, per_data


async def test_a_full_tail_holds_each_event_in_less_than_a_kib(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db", tail_size=EVENTS)
    with anyio.fail_after(60):
        await store.open()
        try:
            meta = dict(correlation_id="r" * 36, actor="loader", node="n", boot="b")
            await store.append([NewEvent.raw("Warm", {}, Meta(**meta))], stream="s")
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(EVENTS // 100):
                    batch = [
                        NewEvent.raw("A", {"name": "plugin", "i": i}, Meta(**meta))
                        for _ in range(100)
                    ]
                    await store.append(batch, stream=f"s{i}")
                    del batch
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert len(await store.read(after=EVENTS - 10)) >= 1
        finally:
            await store.close()
    assert held / EVENTS < 1024, held / EVENTS
