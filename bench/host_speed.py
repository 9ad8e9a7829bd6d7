"""How fast the machine's CPUs were, moment by moment: a canary of fixed work per CPU.

Guarantee: every fixed-rate phase of bench/reload.py can say whether the virtual
machine itself slowed down while it ran, something neither the guest's scheduler
statistics (``schedstat``: the thread *ran*) nor its steal time (``/proc/stat``: ~0)
shows. Measured on this VM (2026-11-30, bench/README.md "The host under the phases"):
a piece of fixed work run at real-time priority (so no program of the guest can
delay it) took 2-11x its usual time on *both* CPUs at once for 50-150 ms stretches,
in ~6% of 50 ms windows; the bare uvicorn + FastAPI peer's quiet p99 was 1.7 ms in the
one phase of eight with no such window and 22-56 ms in the others, every one of their
tail requests within 100 ms after one.

Mechanism: ``python -m bench.host_speed OUT SECONDS [PARENT_PID]`` runs a canary;
:class:`HostWatch` runs one per CPU (pinned with ``taskset``, at ``SCHED_FIFO`` with
``chrt`` where permitted: a canary that other programs can preempt measures them, not
the host). Each canary runs a fixed piece of pure-Python work every :data:`PERIOD_S`
and writes ``start_monotonic_s piece_s`` per piece (~5% of a CPU each) once it stops.
:func:`slow_windows` reads the files back: a :data:`WINDOW_S` window is slow when the
median piece of *every* CPU in it took more than :data:`SLOW_FACTOR` times that CPU's
median piece of the whole run (the server
and wrk cannot slow a real-time canary's register-only work on both CPUs at once; the
host can). :class:`HostWatch` starts and stops the canaries around a benchmark.

The 10,000-schedule benchmark (bench/scheduler.py) uses the same canaries: its first
probe, one unpinned process timing a larger unit in CPU time, found the same windows
and was folded into this one.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

#: A canary's pause between two pieces (s).
PERIOD_S = 0.002
#: Iterations of the fixed piece (~40-60 µs of one CPU).
PIECE = 1000
#: The windows (s) of :func:`slow_windows`.
WINDOW_S = 0.05
#: A window is slow when every CPU's median piece in it took more than this times that
#: CPU's median piece.
SLOW_FACTOR = 1.5
#: The canaries' real-time priority (above wrk's, bench/reload.py WRK_RT_PRIORITY).
RT_PRIORITY = 60


def _piece() -> int:
    total = 0
    for i in range(PIECE):
        total += i
    return total


def canary(out: str, seconds: float, parent: int | None = None) -> None:
    """Run the fixed piece every :data:`PERIOD_S` for at most ``seconds``, or until the
    file ``OUT.stop`` exists or ``parent`` (the process that started it, by default the
    parent it starts with) is no longer its parent (both looked for every 100 pieces:
    a killed benchmark leaves no real-time canary behind); one row per piece."""
    clock, end = time.monotonic, time.monotonic() + seconds
    stop = Path(f"{out}.stop")
    if parent is None:
        parent = os.getppid()
    rows: list[str] = []
    while (start := clock()) < end:
        _piece()
        rows.append(f"{start:.6f} {clock() - start:.7f}\n")
        if len(rows) % 100 == 0 and (stop.exists() or os.getppid() != parent):
            break
        time.sleep(PERIOD_S)
    Path(out).write_text("".join(rows))


def read(path: Path) -> list[tuple[float, float]]:
    """A canary's rows: (start, seconds) per piece."""
    rows = []
    for line in path.read_text().splitlines():
        start, took = line.split()
        rows.append((float(start), float(took)))
    return rows


def slow_windows(
    cpus: list[list[tuple[float, float]]], window: float = WINDOW_S, factor: float = SLOW_FACTOR
) -> set[int]:
    """The windows (``int(t / window)``) in which every CPU's canary ran its pieces more
    than ``factor`` times slower than its own median (median piece per window)."""
    slow: set[int] | None = None
    for rows in cpus:
        if not rows:
            return set()
        median = statistics.median(took for _, took in rows)
        per: dict[int, list[float]] = {}
        for start, took in rows:
            per.setdefault(int(start / window), []).append(took)
        mine = {k for k, v in per.items() if statistics.median(v) > factor * median}
        slow = mine if slow is None else slow & mine
    return slow or set()


def count_in(slow: set[int], start: float, end: float, window: float = WINDOW_S) -> int:
    """How many slow windows fall between ``start`` and ``end`` (monotonic s)."""
    return sum(1 for k in slow if start <= k * window <= end)


def near(slow: set[int], sent: float, received: float, window: float = WINDOW_S) -> bool:
    """Whether a request (monotonic s) overlapped a slow window or followed one by less
    than two windows (the backlog a slowdown leaves drains after it)."""
    return any(k in slow for k in range(int(sent / window) - 2, int(received / window) + 1))


class HostWatch:
    """One canary per CPU while the ``with`` block runs (at most ``seconds``);
    :attr:`slow` is filled on exit, :attr:`realtime` says whether the canaries got
    real-time priority."""

    def __init__(self, folder: Path, seconds: float = 3600.0) -> None:
        self.folder = folder
        self.seconds = seconds
        self.procs: list[subprocess.Popen[bytes]] = []
        self.slow: set[int] = set()
        #: why :attr:`slow` could not be read (None: it was)
        self.problem: str | None = None
        self.realtime = False
        self.cpus = sorted(os.sched_getaffinity(0))

    def _prefix(self, cpu: int) -> list[str]:
        prefix: list[str] = []
        taskset, chrt = shutil.which("taskset"), shutil.which("chrt")
        if taskset is not None:
            prefix = [taskset, "-c", str(cpu)]
        if chrt is not None:
            rt = [*prefix, chrt, "-f", str(RT_PRIORITY)]
            if subprocess.run([*rt, "true"], capture_output=True).returncode == 0:
                self.realtime = True
                return rt
        return prefix

    def __enter__(self) -> HostWatch:
        for cpu in self.cpus:
            out = self.folder / f"host_speed_{cpu}.txt"
            command = [
                *self._prefix(cpu),
                sys.executable,
                "-m",
                "bench.host_speed",
                str(out),
                f"{self.seconds:g}",
                str(os.getpid()),
            ]
            self.procs.append(subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for cpu in self.cpus:
            (self.folder / f"host_speed_{cpu}.txt.stop").touch()
        for proc in self.procs:
            if kind is not None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if kind is None:
            self.collect()

    def collect(self) -> None:
        """Read the canaries' pieces into :attr:`slow`. A canary that left no file or a
        torn one (killed while writing) leaves :attr:`slow` empty and says why in
        :attr:`problem`: the benchmark's own figures are not thrown away for it."""
        files = [self.folder / f"host_speed_{cpu}.txt" for cpu in self.cpus]
        try:
            self.slow = slow_windows([read(f) for f in files])
        except (OSError, ValueError) as exc:
            self.slow = set()
            self.problem = f"{type(exc).__name__}: {exc}"


def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python -m bench.host_speed OUT SECONDS [PARENT_PID]")
    canary(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) == 4 else None)


if __name__ == "__main__":
    main()
