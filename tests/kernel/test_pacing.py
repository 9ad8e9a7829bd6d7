"""Build threads are paced (kernel/pacing.py): while pacing is open a thread that calls
``pace()`` between units of work pauses to keep its share; the event loop's thread, and
every thread once pacing is closed, never pause."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kernel import pacing
from tests.building import watched_loop


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    yield
    pacing.set_share(1.0)


def burn(units: int) -> None:
    for _ in range(units):
        end = time.thread_time() + 0.001  # a unit of CPU work
        while time.thread_time() < end:
            pass
        pacing.pace()


def in_thread(fn: object) -> None:
    t = threading.Thread(target=fn)  # type: ignore[arg-type]
    t.start()
    t.join(60)
    assert not t.is_alive()


def test_a_build_thread_pauses_while_pacing_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    real = time.sleep
    monkeypatch.setattr(pacing.time, "sleep", lambda s: (pauses.append(s), real(s)))
    pacing.set_share(0.5)
    before = pacing.slept
    in_thread(lambda: burn(20))
    # it slept (releasing the interpreter) as often as its CPU went past each quantum
    assert pauses and all(0 < p <= pacing.max_pause for p in pauses)
    assert pacing.slept - before == pytest.approx(sum(pauses))


def test_no_pause_when_closed_or_on_the_main_thread() -> None:
    before = pacing.slept
    in_thread(lambda: burn(20))  # closed
    pacing.set_share(0.5)
    burn(20)  # the main thread (the event loop's) is never paced
    assert pacing.slept == before


def test_the_share_is_bounded() -> None:
    pacing.set_share(0.0)
    assert pacing.share() == 0.05
    pacing.set_share(7)
    assert pacing.share() == 1.0


def test_a_build_thread_waits_for_the_requests_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests first: while the dispatcher counts a request in flight, a build thread
    waits at its next unit (at most ``yield_max``), and goes on as soon as it ends."""
    pacing.set_share(0.5, yield_s=60.0)
    monkeypatch.setattr(pacing, "serving", 1)
    passed = threading.Event()

    def build() -> None:
        pacing.pace()
        passed.set()

    t = threading.Thread(target=build)
    t.start()
    try:
        assert not passed.wait(0.3)  # held while the request is served
        pacing.serving = 0
        pacing.request_ended()
        assert passed.wait(30)  # woken by the end of the request, not by yield_max
    finally:
        pacing.serving = 0
        pacing.request_ended()
        t.join(60)
    assert pacing.yield_max == 60.0
    pacing.set_share(1.0)
    assert pacing.yield_max == 0.0  # closed: no build waits


def test_the_waits_for_requests_add_up_to_at_most_the_builds_cpu_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests that never stop (long polls never start their response) cannot stretch
    a build without end: within one window a thread's waits add up to at most twice the
    CPU time it computed plus 50 ms, plus one wait (0.27 s here). 100 units of 1 ms under
    a request that never ends would otherwise wait 100 x 20 ms = 2 s."""
    pacing.set_share(0.99, yield_s=0.02)
    monkeypatch.setattr(pacing, "serving", 1)
    spent = pacing.Account()

    def build() -> None:
        pacing.account(spent)
        try:
            burn(100)
        finally:
            pacing.account(None)

    in_thread(build)
    assert spent.paused < 1.0, spent.paused


def test_young_collections_of_a_paced_build_run_between_its_units_not_on_the_loop() -> None:
    """While a paced build runs, the young threshold is raised and the build thread runs
    the young passes itself at its units' ends (kernel/collector.py ``young_due``): the
    event loop's thread, allocating a little between, no longer collects the build's
    survivors. The threshold is back once the window closes."""
    from services.loader.priority import building

    threshold = gc.get_threshold()
    passes: dict[str, int] = {"main": 0, "build": 0}

    def counted(phase: Any, info: Any) -> None:
        if phase == "start":
            main = threading.current_thread() is threading.main_thread()
            passes["main" if main else "build"] += 1

    keep: list[object] = []
    gc.collect()
    gc.callbacks.append(counted)
    try:
        with building(cpu_share=0.99, defer_full_gc=True, yield_ms=0):
            assert gc.get_threshold()[0] > threshold[0]
            stop = threading.Event()

            def build() -> None:
                while not stop.is_set():
                    keep.append([[] for _ in range(2_000)])  # a unit: survivors
                    pacing.pace()

            t = threading.Thread(target=build)
            t.start()
            try:
                for _ in range(300):  # the loop: a request's worth of objects at a time
                    keep.append([[] for _ in range(300)])
                    time.sleep(0.001)
            finally:
                stop.set()
                t.join(60)
    finally:
        gc.callbacks.remove(counted)
        keep.clear()
    assert gc.get_threshold() == threshold
    assert passes["build"] > 10 and passes["main"] == 0, passes


def build_thread_passes(
    units: int, first: Callable[[], None] = lambda: None, survivors: int = 2_000
) -> list[int]:
    """The generations of the collections build threads ran during a paced build of
    ``units`` units, each leaving ``survivors`` (2,000 objects: more than a young pass's
    threshold); ``first`` runs in the window before the build starts."""
    from services.loader.priority import building

    passes: list[int] = []

    def counted(phase: Any, info: Any) -> None:
        if phase == "start" and threading.current_thread() is not threading.main_thread():
            passes.append(info["generation"])

    def build() -> None:
        for _ in range(units):
            keep.append([[] for _ in range(survivors)])
            pacing.pace()

    keep: list[object] = []
    gc.collect()
    try:
        with building(cpu_share=0.99, defer_full_gc=True, yield_ms=0):
            first()
            gc.callbacks.append(counted)
            try:
                in_thread(build)
            finally:
                gc.callbacks.remove(counted)
    finally:
        keep.clear()
    return passes


def test_a_paced_builds_young_passes_take_generation_1_each_time() -> None:
    """A build thread's young pass collects generations 0 and 1 together, every time:
    its survivors never pile up in generation 1 for the interpreter's tenth pass to walk
    them all at once, the event loop waiting behind it (kernel/collector.py
    ``young_due``)."""
    generations = build_thread_passes(60)  # one young pass due after each unit
    # more passes than the interpreter's generation-1 period, every one of them gen 1
    assert len(generations) > gc.get_threshold()[1], generations
    assert set(generations) == {1}, generations


def test_a_paced_builds_young_pass_is_due_at_a_fraction_of_the_threshold() -> None:
    """A build thread runs its young pass once a quarter of the interpreter's threshold is
    pending, not the whole of it: the count is net of frees, and under traffic the young
    list held several times the count (kernel/collector.py ``YOUNG_SPLIT``), each pass
    walking it all while holding the interpreter."""
    from kernel.collector import YOUNG_SPLIT

    threshold = gc.get_threshold()[0]
    # each unit leaves a third of the threshold: due after every unit, not every third
    survivors = threshold // 3
    assert survivors >= threshold // YOUNG_SPLIT + 20
    passes = build_thread_passes(60, survivors=survivors)
    assert len(passes) >= 50, passes


def test_a_build_thread_gives_way_while_the_event_loop_is_awake() -> None:
    """The loop first: with the loop watched, a paced build thread waits while the loop
    runs (no plugin request counted: uvicorn's own work, a task) and goes on once the loop
    goes back to sleep in its selector."""
    times: dict[str, float] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert pacing.watch_loop(loop)
        try:
            pacing.set_share(0.99, yield_s=60.0)
            passed = threading.Event()

            def build() -> None:
                pacing.pace()
                times["passed"] = time.monotonic()
                passed.set()

            t = threading.Thread(target=build)
            t.start()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:  # the loop at work, never in its selector
                pass
            times["slept"] = time.monotonic()
            await asyncio.sleep(0.5)  # the loop sleeps: the build goes on
            assert passed.is_set()
            t.join(60)
        finally:
            pacing.unwatch_loop(loop)

    asyncio.run(main())
    assert times["passed"] >= times["slept"]
    assert pacing.stats()["watching_loop"] is False


def test_a_sleeping_loop_with_events_ready_counts_as_busy() -> None:
    """While the loop is in its selector, a readable selector descriptor means it is
    waking up (taking the interpreter back): builds give way then too."""
    loop = asyncio.new_event_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    a, b = socket.socketpair()
    try:
        assert pacing.watch_loop(loop)
        watch = pacing._watch
        assert watch is not None
        loop.add_reader(a.fileno(), lambda: None)
        watch.asleep = True
        assert not pacing.loop_busy()
        b.send(b"x")
        assert pacing.loop_busy()
        watch.asleep = False
        a.recv(1)
        assert pacing.loop_busy()  # awake: at work
    finally:
        pacing.unwatch_loop(loop)
        loop.remove_reader(a.fileno())
        loop.close()
        a.close()
        b.close()
    assert "select" not in vars(selector)  # unwrapped


@pytest.mark.parametrize("theirs", [0, 100_000], ids=["off", "higher"])
def test_a_threshold_the_application_sets_during_a_paced_build_governs_its_passes(
    theirs: int,
) -> None:
    """The application sets the young threshold while a paced build runs (0: no automatic
    collections; higher: fewer): build threads no longer run young passes at the
    threshold saved when the build started, and the application's threshold is kept."""
    threshold = gc.get_threshold()
    try:
        passes = build_thread_passes(
            20, lambda: gc.set_threshold(theirs, threshold[1], gc.get_threshold()[2])
        )
        assert gc.get_threshold()[0] == theirs
        assert passes == []
    finally:
        gc.set_threshold(*threshold)


def calls(n: int) -> int:
    """Pure Python work made of function calls (what the profile hook sees), no pace()."""

    def one(i: int) -> int:
        return i + 1

    total = 0
    for i in range(n):
        total += one(i)
    return total


@pytest.mark.parametrize("fine", [True, False], ids=["fine", "units-only"])
def test_a_paced_build_thread_gives_way_inside_a_unit_with_fine_yield(fine: bool) -> None:
    """With ``fine``, a paced build thread looks for the loop between two function calls
    of a unit (its profile hook), not only at pace(): while the watched loop is awake it
    waits inside the unit. Without it, the unit runs to its end (no wait inside)."""
    seen: dict[str, Any] = {}
    with watched_loop() as watch:
        pacing.set_share(0.99, yield_s=0.002, fine=fine)
        before = pacing.fine_waits

        def build() -> None:
            watch.asleep = True  # the loop asleep: the first unit installs the hook
            watch.woken += 1  # ...as it woke up for a request since the last unit
            pacing.pace()
            seen["hook"] = sys.getprofile()
            watch.asleep = False  # the loop at work from here on
            calls(200_000)  # one unit: no pace() inside
            seen["waits"] = pacing.fine_waits - before

        in_thread(build)
    if fine:
        assert getattr(seen["hook"], "xcore_pacing", False)
        assert seen["waits"] > 0
    else:
        assert seen["hook"] is None
        assert seen["waits"] == 0


def test_the_fine_hook_is_left_out_while_the_loop_has_no_work_and_removes_itself() -> None:
    """No request and no wake-up of the loop since the last unit: the next unit runs
    without the hook (and its cost). Once the window closes, a thread that kept the hook
    (a pooled executor thread) drops it at its next function call."""
    seen: dict[str, Any] = {}
    with watched_loop() as watch:
        watch.asleep = True
        pacing.set_share(0.99, yield_s=0.002, fine=True)

        def build() -> None:
            pacing.pace()  # first unit of this thread: counts as woken
            seen["first"] = sys.getprofile()
            pacing.pace()  # nothing reached the loop since
            seen["idle"] = sys.getprofile()
            watch.woken += 1
            pacing.pace()
            seen["woken"] = sys.getprofile()
            pacing.set_share(1.0)  # the window closes
            calls(10)
            seen["closed"] = sys.getprofile()

        in_thread(build)
    assert getattr(seen["first"], "xcore_pacing", False)
    assert seen["idle"] is None
    assert getattr(seen["woken"], "xcore_pacing", False)
    assert seen["closed"] is None


def test_the_fine_hook_leaves_another_profiler_alone() -> None:
    """A profiler the thread runs under (a plugin author's cProfile) is kept."""
    pacing.set_share(0.99, yield_s=0.002, fine=True)
    seen: dict[str, Any] = {}

    def theirs(frame: Any, event: str, arg: Any) -> None:
        pass

    def build() -> None:
        sys.setprofile(theirs)
        try:
            pacing.pace()
            seen["profile"] = sys.getprofile()
        finally:
            sys.setprofile(None)

    in_thread(build)
    assert seen["profile"] is theirs


def test_the_fine_hook_is_off_inside_pacings_own_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """pace() takes its own hook off while it waits (its lock, its event): a hook that
    ran inside them would wait for the event's lock its own thread holds (found as a
    reload that never ended under load: the thread blocked in ``Event.clear``)."""
    loop = asyncio.new_event_loop()
    inside: list[Any] = []
    original = pacing._wait_for_requests

    def observed() -> float:
        if sys._getframe(1).f_code.co_name == "_pace":  # (not the hook's own calls)
            inside.append(sys.getprofile())
        return original()

    monkeypatch.setattr(pacing, "_wait_for_requests", observed)
    try:
        assert pacing.watch_loop(loop)
        watch = pacing._watch
        assert watch is not None
        watch.asleep = False  # the loop at work: every look says wait
        pacing.set_share(0.99, yield_s=0.001, fine=True)

        def build() -> None:
            for _ in range(5):
                watch.woken += 1  # a wake-up per unit: the hook stays on between them
                pacing.pace()
                calls(20_000)

        in_thread(build)
    finally:
        pacing.unwatch_loop(loop)
        loop.close()
    assert len(inside) == 5
    assert inside == [None] * 5


def test_a_wait_the_loop_never_ended_is_not_repeated_at_the_next_calls() -> None:
    """A wait of the hook that ran out (the loop neither slept nor ended its requests in
    ``yield_max``) is not made again at the next function call: the loop may be blocked on
    a lock the build thread holds (a logging handler's: the thread logs while the loop
    writes its access log), and each such wait stalled the loop ``yield_max`` more, one
    per function call of the build, up to the thread's whole wait budget."""
    seen: dict[str, Any] = {}
    held = threading.Lock()
    with watched_loop() as watch:
        pacing.set_share(0.99, yield_s=0.001, fine=True)

        def build() -> None:
            watch.asleep = True
            watch.woken += 1
            pacing.pace()  # the hook on
            watch.asleep = False  # the loop "awake": blocked on ``held``, never sleeps
            before = pacing.fine_waits
            with held:  # (a handler's lock the loop waits for)
                calls(500)
            seen["waits"] = pacing.fine_waits - before

        in_thread(build)
    assert seen["waits"] == 1


def test_a_loop_outside_the_main_thread_never_waits_for_itself() -> None:
    """Routes declared on the watched loop's own thread during a paced window (a loop
    run outside the main thread, as Starlette's TestClient does) neither pause nor wait
    for that loop, nor get the profile hook."""
    seen: dict[str, Any] = {}
    slept_before = pacing.slept

    def run() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            assert pacing.watch_loop(loop)
            try:
                pacing.set_share(0.05, yield_s=1.0, fine=True)
                waits = pacing.gave_way
                for _ in range(20):
                    end = time.thread_time() + 0.002
                    while time.thread_time() < end:
                        pass
                    pacing.pace()  # the loop is awake: any other thread would wait
                seen["waits"] = pacing.gave_way - waits
                seen["profile"] = sys.getprofile()
            finally:
                pacing.unwatch_loop(loop)

        asyncio.run(main())

    in_thread(run)
    assert seen["waits"] == 0
    assert seen["profile"] is None
    assert pacing.slept == slept_before  # nor sleeps for its share
