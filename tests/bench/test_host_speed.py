"""The host's speed under the reload benchmark's phases (bench/host_speed.py).

- A window is slow only when every CPU's canary was slow in it (one CPU slow is the
  guest's own business: a program of ours, an interrupt), and only past the factor.
- The canaries of a watch run until the watch ends, then leave their pieces on disk.
- Each phase of the benchmark says how many slow windows it met and how much of its
  tail lay near one; the pairs that met none give a ratio of their own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import host_speed
from bench import reload as method


def _rows(start: float, seconds: float, slow: dict[int, float]) -> list[tuple[float, float]]:
    """A canary's pieces every 2 ms from ``start``, 50 µs each, ``slow`` times longer in
    the given 50 ms windows."""
    rows = []
    t = start
    while t < start + seconds:
        rows.append((t, 50e-6 * slow.get(int(t / host_speed.WINDOW_S), 1.0)))
        t += 0.002
    return rows


def test_a_window_is_slow_only_when_every_cpu_was_slow_in_it() -> None:
    # windows of 50 ms from t = 100 s: 2000 is t = 100.0
    cpu0 = _rows(100.0, 2.0, {2005: 3.0, 2010: 3.0, 2020: 1.2})
    cpu1 = _rows(100.0, 2.0, {2005: 2.5, 2015: 4.0, 2020: 1.2})
    assert host_speed.slow_windows([cpu0, cpu1]) == {2005}
    # one CPU alone: its own slow windows; 1.2x is under the factor
    assert host_speed.slow_windows([cpu0]) == {2005, 2010}
    assert host_speed.count_in({2005}, 100.0, 100.5) == 1
    assert host_speed.count_in({2005}, 100.3, 101.0) == 0
    # a request that left 60 ms after a slow window ended still met its backlog
    assert host_speed.near({2005}, 100.31, 100.32)
    assert not host_speed.near({2005}, 100.5, 100.51)


def test_the_watch_runs_its_canaries_until_it_ends(tmp_path: Path) -> None:
    folder = tmp_path
    # an hour at most: only the watch's end (its stop files) can end the canaries
    # before the watch gives up waiting and kills them (then they leave nothing)
    with host_speed.HostWatch(folder, seconds=3600) as watch:
        pieces_before = list(folder.glob("host_speed_*.txt"))
        time.sleep(1.0)
    files = sorted(folder.glob("host_speed_*.txt"))
    assert pieces_before == []
    assert len(files) == len(watch.cpus)
    for f in files:
        rows = host_speed.read(f)
        assert len(rows) > 10
        assert all(took > 0 for _, took in rows)
    assert isinstance(watch.slow, set)


def test_each_phase_reports_the_slow_windows_it_met() -> None:
    watch = host_speed.HostWatch.__new__(host_speed.HostWatch)
    watch.slow = {2005}  # 100.25-100.30 s
    watch.realtime = True
    watch.problem = None

    def phase(start: float, late_at: float | None) -> list[tuple[str, float, float, float, bool]]:
        # 200 requests 5 ms apart taking 1 ms, those from late_at on 30 ms
        rows = []
        for i in range(200):
            sent = (start + i * 0.005) * 1e6
            took = 30_000 if late_at is not None and start + i * 0.005 >= late_at else 1_000
            if late_at is not None and start + i * 0.005 > late_at + 0.02:
                took = 1_000
            rows.append((str(i), sent, sent, sent + took, False))
        return rows

    kept = {
        "quiet": [{"rows": phase(100.0, 100.28)}, {"rows": phase(110.0, None)}],
        "busy": [{"rows": phase(105.0, None)}, {"rows": phase(115.0, None)}],
    }
    quiet = [{"p99": 30.0}, {"p99": 1.0}]
    busy = [{"p99": 1.5}, {"p99": 1.8}]
    out = method._host_slowed(watch, kept, {}, busy, quiet)
    assert out["slow_windows_quiet"] == [1, 0]
    assert out["slow_windows_busy"] == [0, 0]
    assert out["tail_near_slow_quiet"][0] == 1.0
    assert out["tail_near_slow_quiet"][1] == 0.0
    # by chance: the share of all the phase's requests near a slow window
    assert 0.0 < out["all_near_slow_quiet"][0] < 0.2
    assert out["all_near_slow_quiet"][1] == 0.0
    # the requests away from the slow window: the 1 ms ones
    assert out["p99_away_from_slow_quiet"] == [1.0, 1.0]
    # one clean pair only: no ratio of its own
    assert out["host_clean_pairs"] == 1
    assert out["ratio_host_clean"] is None
    kept["quiet"].append({"rows": phase(120.0, None)})
    kept["busy"].append({"rows": phase(125.0, None)})
    out = method._host_slowed(watch, kept, {}, [*busy, {"p99": 2.0}], [*quiet, {"p99": 1.0}])
    assert out["host_clean_pairs"] == 2
    assert out["ratio_host_clean"] == pytest.approx((1.8 * 2.0) ** 0.5, rel=1e-3)
    # away from the slow window every request took 1 ms, busy and quiet alike
    assert out["ratio_away_from_slow"] == pytest.approx(1.0)


def test_the_cpu_benchmark_counts_the_slow_windows_of_each_phase() -> None:
    every = [(100.0 + i * 0.01, 100.001 + i * 0.01) for i in range(50)]
    log = [
        {
            "reload": False,
            "wall": (100.0, 100.5),
            "tail_walls": [(100.26, 100.27)],
            "all_walls": every,
        },
        {"reload": True, "wall": (101.0, 101.5), "tail_walls": [(101.2, 101.3)], "all_walls": []},
    ]
    out = method._cpu_host({2005}, log)
    # near 2005 (100.25-100.30): the requests from 100.25 to 100.39, 15 of 50
    assert out == {
        "slow_windows": [1, 0],
        "tail_near_slow": [1.0, 0.0],
        "all_near_slow": [0.3, 0.0],
    }
    # the raw spans are not kept in the result
    assert log == [{"reload": False}, {"reload": True}]


def test_a_canary_ends_when_the_process_that_started_it_is_gone(tmp_path: Path) -> None:
    out = tmp_path / "canary.txt"
    # a parent that starts a canary for an hour and exits at once
    starter = (
        "import os, subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-m', 'bench.host_speed', "
        f"{str(out)!r}, '3600', str(os.getpid())], stdout=subprocess.DEVNULL); "
        "print(p.pid, flush=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", starter], capture_output=True, text=True, check=True, timeout=60
    )
    pid = int(done.stdout.split()[0])
    # the orphan writes its pieces once it sees its parent gone (within ~100 pieces)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert out.exists(), f"canary {pid} still running without its parent"
    assert len(host_speed.read(out)) >= 100


def test_a_torn_canary_file_leaves_no_slow_window_and_says_why(tmp_path: Path) -> None:
    watch = host_speed.HostWatch(tmp_path)
    watch.cpus = [0, 1]
    (tmp_path / "host_speed_0.txt").write_text("100.0 0.00005\n100.002 0.00005\n")
    (tmp_path / "host_speed_1.txt").write_text("100.0 0.00005\n100.002")  # torn
    watch.collect()
    assert watch.slow == set()
    assert watch.problem is not None and "ValueError" in watch.problem
    (tmp_path / "host_speed_1.txt").unlink()
    watch.collect()
    assert watch.problem is not None and "FileNotFoundError" in watch.problem
