"""The build window (services/loader/priority.py): while a generation is built the
interpreter's switch interval is lowered and full GC collections are deferred, and both
are put back when the last build ends — whatever the build's outcome."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kernel.collector import collector
from services.loader import priority
from services.loader.priority import MAX_DEFERRED, SENTINEL, building

from .conftest import AUTH, write_plugin


@pytest.fixture(autouse=True)
def _clean_window() -> Iterator[None]:
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    assert priority.window.active == 0
    yield
    assert priority.window.active == 0
    sys.setswitchinterval(interval)
    gc.set_threshold(*threshold)


def full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def test_the_window_lowers_the_interval_and_defers_full_collections() -> None:
    before_interval, (t0, t1, t2) = sys.getswitchinterval(), gc.get_threshold()
    with building(0.25, True):
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        assert gc.get_threshold() == (t0, t1, SENTINEL)
    assert sys.getswitchinterval() == before_interval
    assert gc.get_threshold() == (t0, t1, t2)


def test_nested_windows_end_with_the_last_one() -> None:
    before = sys.getswitchinterval(), gc.get_threshold()
    outer = building(0.25, True)
    inner = building(0.25, True)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # builds end in any order (boot waves)
    assert sys.getswitchinterval() == pytest.approx(0.00025)
    assert gc.get_threshold()[2] == SENTINEL
    inner.__exit__(None, None, None)
    assert (sys.getswitchinterval(), gc.get_threshold()) == before


def test_a_failing_build_puts_everything_back() -> None:
    before = sys.getswitchinterval(), gc.get_threshold()
    with pytest.raises(RuntimeError), building(0.25, True):
        raise RuntimeError("the build failed")
    assert (sys.getswitchinterval(), gc.get_threshold()) == before


def test_other_threshold_changes_during_the_window_are_kept() -> None:
    _, t1, t2 = gc.get_threshold()
    with building(0.25, True):
        gc.set_threshold(10_000, t1, SENTINEL)  # the scheduler's GC policy freezing
    assert gc.get_threshold() == (10_000, t1, t2)


def test_settings_can_turn_each_part_off() -> None:
    before = sys.getswitchinterval(), gc.get_threshold()
    with building(0, False):
        assert (sys.getswitchinterval(), gc.get_threshold()) == before
    # an interval above the interpreter's never raises it
    with building(50.0, True):
        assert sys.getswitchinterval() == before[0]
    # nor does a tiny one stop the interpreter doing anything but switching
    with building(1e-9, True):
        assert sys.getswitchinterval() == pytest.approx(0.00001)


def test_a_full_collection_runs_every_few_replaced_generations() -> None:
    """Deferral is bounded: replaced generations' garbage is freed by a full collection."""
    window = priority.window
    gc.collect()
    with building(0.25, True):  # one long window, as in a loop of reloads
        gc.collect()  # a full collection of another source restarts the count
        start = full_collections()
        for _ in range(MAX_DEFERRED - 1):
            with building(0.25, True):
                pass
            window.note_unloaded()
        with building(0.25, True):
            pass
        assert full_collections() == start
        window.note_unloaded()
        with building(0.25, True):
            pass
        assert full_collections() == start + 1


def test_no_collection_is_forced_where_nothing_was_replaced() -> None:
    """Builds that replace nothing (a boot of many plugins) force no collection, and
    without deferral the interpreter's own policy decides."""
    gc.disable()  # (none of the interpreter's own meanwhile)
    try:
        gc.collect()
        start = full_collections()
        for _ in range(MAX_DEFERRED * 3):
            with building(0.25, True):
                pass
        assert full_collections() == start
        for _ in range(MAX_DEFERRED * 2):
            with building(0.25, False):
                pass
            priority.window.note_unloaded()
        assert full_collections() == start
    finally:
        gc.enable()
        gc.collect()


PROBE_RUN = """
import gc, sys
from pathlib import Path

def on_load(ctx):
    with (Path(__file__).parent.parent / "probe.log").open("a") as f:
        f.write(f"on_load {sys.getswitchinterval()} {gc.get_threshold()[2]}\\n")
"""

PROBE_ROUTER = """
    import gc, sys
    from pathlib import Path
    from fastapi import APIRouter

    def note():
        with (Path(__file__).parent.parent / "probe.log").open("a") as f:
            f.write(f"mount {sys.getswitchinterval()} {gc.get_threshold()[2]}\\n")

    router = APIRouter(on_startup=[note])

    @router.get("/x")
    async def x():
        return {}
    """


def probes(plugins: Path) -> list[tuple[str, float, int]]:
    out = []
    for line in (plugins / "probe.log").read_text().splitlines():
        what, interval, t2 = line.split()
        out.append((what, float(interval), int(t2)))
    return out


async def test_a_real_build_and_mount_run_in_the_window(harness_factory, plugins: Path) -> None:
    """The plugin's import/hooks and the router's app build (its startup handler runs
    right after) see the window; the server after the build does not (full collections
    stay the collector's while the loader owns it: kernel/collector.py)."""
    write_plugin(plugins, "probe", run=PROBE_RUN, router=PROBE_ROUTER)
    before = sys.getswitchinterval(), gc.get_threshold()
    owned = sys.getswitchinterval(), (*before[1][:2], SENTINEL)
    h = await harness_factory()
    assert (sys.getswitchinterval(), gc.get_threshold()) == owned
    r = await h.client.post("/admin/plugins/probe/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert (sys.getswitchinterval(), gc.get_threshold()) == owned
    seen = probes(plugins)
    # (FastAPI runs a router's on_startup twice when it is included, bare apps too)
    kinds = [w for w, _, _ in seen]
    assert kinds.count("on_load") == 2 and kinds.count("mount") >= 2, seen
    assert all(i == pytest.approx(0.00025) and t2 == SENTINEL for _, i, t2 in seen)
    # a build that fails (on_load raises after the probe) puts everything back too
    run = PROBE_RUN + "    raise RuntimeError('no')\n"
    (plugins / "probe" / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/probe'}\n" + run
    )
    r = await h.client.post("/admin/plugins/probe/reload", headers=AUTH)
    assert r.status_code != 200
    assert (sys.getswitchinterval(), gc.get_threshold()) == owned
    assert probes(plugins)[-1][0] == "on_load"
    await h.stop()  # the collector is given back
    assert (sys.getswitchinterval(), gc.get_threshold()) == before


async def test_the_window_can_be_turned_off(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "probe", run=PROBE_RUN, router=PROBE_ROUTER)
    before = sys.getswitchinterval(), gc.get_threshold()
    await harness_factory(loader={"build_switch_interval_ms": 0, "defer_full_gc": False})
    assert all(i == before[0] and t2 == before[1][2] for _, i, t2 in probes(plugins))


async def test_reloads_free_replaced_generations_once_settled(
    harness_factory, plugins: Path
) -> None:
    """Through the real loader: each reload unloads a generation, and the collector
    frees its garbage with a full collection of its own once the reloads settle."""
    write_plugin(plugins, "probe", router=PROBE_ROUTER)
    h = await harness_factory()
    assert collector.held
    start = collector.collections
    for _ in range(MAX_DEFERRED + 1):
        r = await h.client.post("/admin/plugins/probe/reload", headers=AUTH)
        assert r.status_code == 200, r.text
    with anyio.fail_after(30):
        while collector.pending() or collector.collections == start:
            await anyio.sleep(0.05)
    assert collector.unloaded_since_full == 0


PACED_ROUTER = """
    from pathlib import Path
    from fastapi import APIRouter
    from kernel import pacing

    (Path(__file__).parent.parent / "share.log").write_text(str(pacing.share()))
    router = APIRouter()
    for i in range(200):
        router.add_api_route(f"/r{i}", lambda q: {}, methods=["GET"])
    """


async def test_a_build_paces_its_route_threads(harness_factory, plugins: Path) -> None:
    """While a generation is built, threads declaring its routes pause between them
    (kernel/pacing.py); not at boot (nothing is served yet), and the window closes
    pacing when the build ends."""
    from kernel import pacing

    def share() -> float:
        return float((plugins / "share.log").read_text())

    write_plugin(plugins, "paced", router=PACED_ROUTER)
    h = await harness_factory()
    assert share() == 1.0  # the boot's build
    before = pacing.slept
    r = await h.client.post("/admin/plugins/paced/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert share() == pytest.approx(0.3)
    assert pacing.slept > before and pacing.share() == 1.0
    await h.stop()
    h = await harness_factory(loader={"build_cpu_share": 1})  # turned off
    r = await h.client.post("/admin/plugins/paced/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert share() == 1.0
