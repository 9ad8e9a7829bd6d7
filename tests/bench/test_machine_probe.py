"""The machine probe (bench/machine_probe.py) and how the 10,000-schedule benchmark uses it.

- The probe, a process of its own, samples until its block ends; :func:`slow_windows`
  finds the samples whose CPU time for the same work grew past 3x the median (a machine
  running slow; a CPU merely shared with another process makes the wall time grow, not
  the CPU time), and none on a machine at its usual speed.
- A burst of runs is counted as met by a slow machine only when a slow window overlaps
  its way (from ``max_lead_ms`` before its instant to its last start); the other
  bursts' runs make the p99 outside the slow windows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import machine_probe
from bench.scheduler import WAY_10K, _by_machine


def test_the_probe_samples_in_a_process_of_its_own_until_the_block_ends() -> None:
    with machine_probe.probing() as probe:
        time.sleep(0.5)
    # ~one sample per 10 ms (a loaded machine takes fewer: at least a few)
    assert len(probe.samples) >= 5
    ends = [end for end, *_ in probe.samples]
    assert ends == sorted(ends)
    assert all(cpu > 0 and wall >= cpu * 0.5 for _, cpu, wall, _ in probe.samples)


def test_slow_windows_are_the_samples_whose_cpu_time_grew() -> None:
    steady = [(100.0 + i * 0.01, 0.0003, 0.0003, 7) for i in range(50)]
    assert machine_probe.slow_windows(steady) == []
    # 8x the usual CPU for the same work at 100.2, the machine's steal 2 ticks more since
    slowed = [
        (end, cpu, wall, steal + 2 * (i >= 20)) for i, (end, cpu, wall, steal) in enumerate(steady)
    ]
    slowed[20] = (100.2, 0.0025, 0.0026, 9)
    slowed[30] = (100.3, 0.0008, 0.0008, 9)  # under 3x: not counted
    assert machine_probe.slow_windows(slowed) == [(100.2 - 0.0026, 100.2)]
    assert machine_probe.slow_windows(steady[:5]) == []  # too few to know the usual
    # the 2 steal ticks counted by the slow sample fall in its window
    windows = machine_probe.slow_windows(slowed)
    assert machine_probe.stolen(slowed, windows) == (2, 2)
    assert machine_probe.stolen(steady, windows) == (0, 0)


def test_a_burst_is_met_by_a_slow_machine_only_when_the_window_overlaps_its_way() -> None:
    # bursts of 100 runs due at 10.0, 11.0 and 12.0; the one at 11.0 late as a whole
    late = [(10.0, 0.001 + i * 1e-5) for i in range(100)]
    late += [(11.0, 0.030 + i * 1e-5) for i in range(100)]
    late += [(12.0, 0.002 + i * 1e-5) for i in range(100)]
    # a slow window inside the way of the burst at 11.0 (before its instant)
    out = _by_machine(late, [(11.0 - WAY_10K / 2, 11.0 - WAY_10K / 4)])
    assert out["late_bursts"] == 1
    assert out["bursts_in_slow_machine"] == 1
    assert out["late_bursts_in_slow_machine"] == 1
    assert out["p99_outside_slow_machine_ms"] < 3
    # a window before any burst's way meets none: the late burst counts in the p99
    out = _by_machine(late, [(10.5, 10.6)])
    assert out["bursts_in_slow_machine"] == 0
    assert out["late_bursts_in_slow_machine"] == 0
    assert out["p99_outside_slow_machine_ms"] > 29


def test_a_block_that_raises_at_once_stops_the_probe_with_sigint_ignored() -> None:
    # started from a background shell, a process inherits SIGINT ignored: the SIGINT
    # that stopped the probe was lost when the block ended before the probe set its
    # handler, and the probe was killed only after 10 s (its samples never written)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(RuntimeError), machine_probe.probing() as probe:
            raise RuntimeError("the benchmark failed at once")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert probe.returncode != -signal.SIGKILL  # it stopped on its own, not killed


def test_the_probe_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    # a benchmark SIGKILLed (or its probing() block never left) leaves no probe
    # sampling forever: it stops once its parent is gone, and writes its samples
    out = tmp_path / "probe.json"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-m', 'bench.machine_probe', sys.argv[1]])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(3600)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    pid = int(starter.stdout.readline())
    time.sleep(0.5)  # (the probe is sampling)
    starter.kill()
    starter.wait()
    starter.stdout.close()
    try:
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists(), f"probe {pid} still running after its parent was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # (not to leave one behind if this failed)
