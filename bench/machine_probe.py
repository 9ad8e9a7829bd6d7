"""How fast the machine itself runs, sampled beside a benchmark by a process of its own.

Guarantee: a benchmark that reports a tail latency can tell which of its late moments
the machine itself was slow in, whatever the code under test did. On the shared 2-core
VM these benchmarks run on, a fixed piece of pure-Python work that takes ~0.3 ms of CPU
sometimes takes 3-15 times as much CPU time for tens of milliseconds, in every process
at once (seen with the 10,000-schedule benchmark: each burst it ran late in as a whole
fell in such a window, on an otherwise idle machine with no steal time reported in
``/proc/stat``). The code under test cannot cause that: the probe shares no lock, no
file and no interpreter with it.

Mechanism: ``python -m bench.machine_probe OUT`` runs the same work every
:data:`EVERY` seconds and records, per sample, the wall-clock time it ended, its CPU
time, its wall time and the machine's steal ticks so far (``/proc/stat``), until SIGINT
or SIGTERM (or until the process that started it is gone); it then writes the
samples to ``OUT`` (JSON). :func:`probing` runs it around a block; :func:`slow_windows` reads the
samples: a window where the work took more than ``factor`` times its median CPU time
(the machine slowed: the probe's own CPU time grew, so it is not merely waiting for a
CPU the benchmark holds).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["EVERY", "Probe", "Sample", "probing", "slow_windows", "stolen"]

#: (end time, epoch seconds; CPU seconds; wall seconds; the machine's steal ticks so far)
Sample = tuple[float, float, float, int]

#: Seconds between two samples (the probe costs ~3% of one core).
EVERY = 0.01
#: Iterations of the unit of work (~0.3 ms of CPU on this machine).
UNIT = 4000


def _unit() -> int:
    total = 0
    for i in range(UNIT):
        total += i * i
    return total


def _steal_ticks() -> int:
    """The machine's stolen time so far (``/proc/stat``, in clock ticks; 0 if unknown):
    time the hypervisor ran something else while one of this VM's CPUs wanted to run."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


def main(out: str) -> None:
    samples: list[Sample] = []
    stop = False
    # the process that started the probe: if it dies (a benchmark killed, SIGKILL), the
    # probe stops too instead of sampling forever with nobody to stop it
    parent = os.getppid()

    def halt(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, halt)
    signal.signal(signal.SIGTERM, halt)
    while not stop and os.getppid() == parent:
        wall = time.perf_counter()
        cpu = time.thread_time()
        _unit()
        cpu = time.thread_time() - cpu
        wall = time.perf_counter() - wall
        samples.append((time.time(), cpu, wall, _steal_ticks()))
        time.sleep(EVERY)
    Path(out).write_text(json.dumps(samples))


class Probe:
    """The samples of one :func:`probing` block (filled when the block ends)."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        #: the probe process's exit status (0: it stopped and wrote its samples)
        self.returncode: int | None = None


@contextlib.contextmanager
def probing() -> Iterator[Probe]:
    """Sample the machine's speed while the block runs (in a process of its own)."""
    probe = Probe()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.json")
        proc = subprocess.Popen([sys.executable, "-m", "bench.machine_probe", out])
        try:
            yield probe
        finally:
            # SIGTERM, not SIGINT: a process started from a background shell inherits
            # SIGINT ignored, so one sent before the probe set its handler (a block that
            # ends or raises at once) was lost, and the block waited 10 s to kill it;
            # SIGTERM before the handler ends it at once (no samples yet to write)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except BaseException:  # interrupted while waiting (^C): leave no orphan
                proc.kill()
                proc.wait()
                raise
            probe.returncode = proc.returncode
        if os.path.exists(out):
            probe.samples = [
                (float(end), float(cpu), float(wall), int(steal))
                for end, cpu, wall, steal in json.loads(Path(out).read_text())
            ]


def slow_windows(samples: list[Sample], factor: float = 3.0) -> list[tuple[float, float]]:
    """The (start, end) epoch-second windows of the samples whose CPU time was more than
    ``factor`` times the median: the machine itself ran slow then."""
    if len(samples) < 10:
        return []
    cpus = sorted(s[1] for s in samples)
    typical = cpus[len(cpus) // 2]
    return [(s[0] - s[2], s[0]) for s in samples if s[1] > factor * typical]


def stolen(samples: list[Sample], windows: list[tuple[float, float]]) -> tuple[int, int]:
    """Steal ticks (``/proc/stat``) in all and inside ``windows``, over the samples."""
    total = inside = 0
    for before, after in itertools.pairwise(samples):
        ticks = after[3] - before[3]
        total += ticks
        if ticks and any(a < after[0] and b > before[0] for a, b in windows):
            inside += ticks
    return total, inside


if __name__ == "__main__":
    main(sys.argv[1])
