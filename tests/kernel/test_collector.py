"""The process's garbage-collector owner (kernel/collector.py): the boot layer is frozen
once and never thawed while held, full collections are the collector's own — never
during a build, only in a gap every gap check agrees to — and everything is put back
when the owner releases it."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import anyio
import pytest

from kernel.collector import MAX_DEFERRED_HELD, MAX_FREED, SENTINEL, Collector


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def fresh() -> Iterator[Collector]:
    threshold = gc.get_threshold()
    c = Collector()
    c.settle = 0.05
    c.tick = 0.01
    yield c
    assert c.owners == 0
    gc.set_threshold(*threshold)


async def test_the_boot_layer_is_frozen_and_later_objects_stay_collectable(
    fresh: Collector,
) -> None:
    booted = Cycle()
    fresh.acquire()
    try:
        assert fresh.held and fresh.boot_frozen > 0
        assert gc.get_threshold()[2] == SENTINEL  # full collections are ours
        later = Cycle()
        tracked = {id(o) for o in gc.get_objects()}
        assert id(booted) not in tracked  # frozen: no collection walks it
        assert id(later) in tracked  # a plugin's object: every collection can free it
        # an unloaded generation's cyclic garbage is freed without thawing the boot layer
        ref = weakref.ref(later)
        del later
        fresh.note_unloaded()
        with anyio.fail_after(30):
            while ref() is not None:
                await anyio.sleep(0.01)
        assert fresh.collections == 1 and not fresh.pending()
        assert gc.get_freeze_count() >= fresh.boot_frozen // 2
        assert id(booted) not in {id(o) for o in gc.get_objects()}
    finally:
        await fresh.release()
    assert gc.get_freeze_count() == 0 and not fresh.held
    assert gc.get_threshold()[2] != SENTINEL


async def test_no_collection_of_ours_during_a_build_or_outside_a_gap(fresh: Collector) -> None:
    gap = [False]
    fresh.add_gap_check(lambda: gap[0])
    fresh.max_wait = 60
    fresh.acquire()
    try:
        Cycle()
        fresh.note_unloaded()
        fresh.build_started()
        gap[0] = True
        await anyio.sleep(0.3)  # a build runs: nothing
        assert fresh.collections == 0 and fresh.pending()
        fresh.build_ended()
        gap[0] = False
        await anyio.sleep(0.3)  # no gap: nothing
        assert fresh.collections == 0 and fresh.pending()
        gap[0] = True
        with anyio.fail_after(30):
            while fresh.collections == 0:
                await anyio.sleep(0.01)
        assert not fresh.pending() and fresh.last_pause_ms is not None
    finally:
        await fresh.release()


async def test_a_collection_waits_for_a_gap_at_most_max_wait(fresh: Collector) -> None:
    fresh.add_gap_check(lambda: False)  # never a gap (a busy scheduler)
    fresh.max_wait = 0.2
    fresh.acquire()
    try:
        fresh.note_unloaded()
        with anyio.fail_after(30):
            while fresh.collections == 0:
                await anyio.sleep(0.01)
    finally:
        await fresh.release()


async def test_a_failing_gap_check_is_logged_and_ignored(
    fresh: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    fresh.add_gap_check(broken)
    fresh.acquire()
    try:
        fresh.note_unloaded()
        with anyio.fail_after(30):
            while fresh.collections == 0:
                await anyio.sleep(0.01)
    finally:
        await fresh.release()
    assert "a gap check failed" in caplog.text


async def test_owners_nest(fresh: Collector) -> None:
    fresh.acquire()
    fresh.acquire()
    frozen = gc.get_freeze_count()
    await fresh.release()
    assert fresh.held and gc.get_freeze_count() == frozen
    await fresh.release()
    assert not fresh.held and gc.get_freeze_count() == 0


async def test_a_failed_task_gives_full_collections_back_to_the_interpreter(
    fresh: Collector, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(generation: int = 2) -> int:
        raise RuntimeError("collector broke")

    fresh.acquire()
    try:
        assert gc.get_threshold()[2] == SENTINEL
        with monkeypatch.context() as m:
            m.setattr(gc, "collect", broken)
            fresh.note_unloaded()
            with anyio.fail_after(30):
                while gc.get_threshold()[2] == SENTINEL:
                    await anyio.sleep(0.01)
        assert "the collector's task failed" in caplog.text
    finally:
        await fresh.release()
    assert gc.get_threshold()[2] != SENTINEL and fresh._deferring == 0


async def test_reloads_back_to_back_still_collect_every_few_unloads(fresh: Collector) -> None:
    """A tight loop of reloads never leaves the owner's task a gap: the build that ends
    collects once MAX_DEFERRED_HELD generations wait, so memory stays bounded."""
    fresh.add_gap_check(lambda: False)
    fresh.max_wait = 600
    fresh.acquire()
    try:
        for _ in range(MAX_DEFERRED_HELD - 1):
            fresh.build_started()
            fresh.note_unloaded()
            fresh.build_ended()
        assert fresh.forced == 0
        fresh.build_started()
        fresh.note_unloaded()
        fresh.build_ended()
        assert fresh.forced == 1 and fresh.unloaded_since_full == 0
    finally:
        await fresh.release()


def test_the_heap_rule_waits_for_the_settle_after_a_build(fresh: Collector) -> None:
    """The interpreter's rule (young collections, a heap grown by a quarter) is not
    applied within ``settle`` of a build: a reload's heap holds both generations until
    the old one is freed by refcounting, and a collection then would free nothing."""
    for _ in range(12):
        gc.collect(1)  # each counts as a young collection towards a full one
    fresh._blocks = 1  # the heap grew by far more than a quarter since "our last"
    fresh._last_build_end = time.monotonic()
    assert fresh._due() is None
    fresh._last_build_end = time.monotonic() - fresh.settle - 0.01
    assert fresh._due() == "young collections"


async def test_reloads_back_to_back_collect_the_remains_of_freed_generations(
    fresh: Collector,
) -> None:
    """Generations freed by refcounting leave small remains; a loop of reloads that never
    leaves a gap still collects them, at the build ending after 2 x MAX_FREED."""
    fresh.add_gap_check(lambda: False)
    fresh.max_wait = 600
    fresh.acquire()
    try:
        for _ in range(2 * MAX_FREED - 1):
            fresh.build_started()
            fresh.note_unloaded()
            fresh.note_freed()
            fresh.build_ended()
        assert fresh.forced == 0 and fresh.freed_since_full == 2 * MAX_FREED - 1
        fresh.build_started()
        fresh.note_unloaded()
        fresh.note_freed()
        fresh.build_ended()
        assert fresh.forced == 1 and fresh.freed_since_full == 0
    finally:
        await fresh.release()


@pytest.mark.parametrize("huge", [2**28, 2**31 - 1])
def test_a_huge_young_threshold_is_raised_no_further_than_the_interpreter_takes(
    fresh: Collector, huge: int
) -> None:
    """A host or plugin that all but turns young collections off with a huge threshold
    (``gc.set_threshold(2**30)``): raising it :data:`YOUNG_SLACK` times passed the C int the
    interpreter keeps it in, and ``young_paced`` raised OverflowError as a paced build
    started (the loader's build window then never closed). The raise stops at the
    largest threshold, and the host's is back afterwards."""
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(huge, t1, t2)
    fresh.young_paced(True)
    assert gc.get_threshold()[0] >= huge
    assert fresh.young_due() is None
    fresh.young_paced(False)
    assert gc.get_threshold() == (huge, t1, t2)
