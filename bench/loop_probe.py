"""Where a server's event loop stalls: run ``xcore serve`` with a loop-lag probe inside.

``python -m bench.loop_probe OUT.json serve ...`` runs ``xcore serve ...`` (the same
arguments as ``python -m kernel.cli``) with three recorders added to the process, and
rewrites ``OUT.json`` once a second: ``{"lags": [[end_monotonic_s, ms], ...], "gcs":
[[start_monotonic_s, ms, generation, thread], ...], "samples": [[monotonic_s,
stale_ms, state, main_thread_frames, {thread: frames}], ...]}``. Times are
``CLOCK_MONOTONIC`` seconds, the clock wrk's ``bench/fixed_rate.lua`` stamps requests
with, so a late request can be matched with what the server did at that moment.

- *Lag:* a task of the server's loop sleeps 1 ms in a loop; each wake-up more than
  3 ms late is a stall of the loop (its length is recorded when it ends).
- *Collections:* ``gc.callbacks`` times every collection of the cyclic collector, with
  the thread that ran it (a build thread's young collection holds the interpreter too).
- *Samples:* a thread looks at the loop every 3 ms; once the loop has been stale for
  15 ms, and again each time the staleness doubles, it records the main thread's stack,
  the other threads' innermost frames and the main thread's state from
  ``/proc/self/task/<tid>/stat`` (``R``: runnable or running — in a system call or
  waiting for a CPU; ``S``: waiting, e.g. for the interpreter another thread holds).

The probe costs the loop one timer a millisecond, and a few stack walks per long stall
only (sampling every millisecond of a stall took a third of a core on a loaded machine
and changed what it measured). ``bench/reload.py`` runs its neighbour server under it
when ``XCORE_BENCH_PROBE`` names a folder (see bench/README.md), and
:func:`summarise` reduces a recording to what happened during one phase.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

#: A wake-up of the probe's 1 ms sleep later than this (s) is a stall.
LAG_S = 0.003
#: Staleness (s) from which the sampler records stacks (then at each doubling).
SAMPLE_FROM_S = 0.015


class Probe:
    """The recorders of one process (installed by :meth:`install`)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.lags: list[tuple[float, float]] = []
        self.gcs: list[tuple[float, float, int, str]] = []
        self.samples: list[tuple[float, float, str, list[str], dict[str, list[str]]]] = []
        self._beat = time.perf_counter()
        self._main = threading.get_ident()
        self._main_native = threading.get_native_id()
        self._gc_start: dict[int, float] = {}

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)
        probe = self
        original = asyncio.base_events.BaseEventLoop.run_forever

        def run_forever(loop: asyncio.base_events.BaseEventLoop) -> None:
            loop.create_task(probe._tick(), name="bench-loop-probe")
            original(loop)

        asyncio.base_events.BaseEventLoop.run_forever = run_forever  # type: ignore[method-assign,assignment]
        threading.Thread(target=self._sampler, name="bench-probe-sampler", daemon=True).start()
        threading.Thread(target=self._writer, name="bench-probe-writer", daemon=True).start()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            self._gc_start[ident] = time.monotonic()
            return
        start = self._gc_start.pop(ident, None)
        if start is not None:
            name = "main" if ident == self._main else threading.current_thread().name
            self.gcs.append((start, (time.monotonic() - start) * 1000, info["generation"], name))

    async def _tick(self) -> None:
        while True:
            before = self._beat = time.perf_counter()
            await asyncio.sleep(0.001)
            now = self._beat = time.perf_counter()
            late = now - before - 0.001
            if late > LAG_S:
                self.lags.append((time.monotonic(), late * 1000))

    @staticmethod
    def _frames(frame: FrameType | None, depth: int) -> list[str]:
        if frame is None:
            return []
        return [
            "/".join(f.filename.split("/")[-2:]) + f":{f.lineno}:{f.name}"
            for f in traceback.extract_stack(frame)[-depth:]
        ]

    def _state(self) -> str:
        try:
            with open(f"/proc/self/task/{self._main_native}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "?"

    def _sampler(self) -> None:
        next_at = SAMPLE_FROM_S
        while True:
            time.sleep(0.003)
            stale = time.perf_counter() - self._beat
            if stale < SAMPLE_FROM_S:
                next_at = SAMPLE_FROM_S
                continue
            if stale < next_at:
                continue
            next_at = stale * 2
            frames = sys._current_frames()
            others = {
                str(ident): self._frames(frame, 3)
                for ident, frame in frames.items()
                if ident not in (self._main, threading.get_ident())
            }
            self.samples.append(
                (
                    time.monotonic(),
                    stale * 1000,
                    self._state(),
                    self._frames(frames.get(self._main), 8),
                    others,
                )
            )

    def _writer(self) -> None:
        while True:
            time.sleep(1)
            tmp = f"{self.out}.tmp"
            with open(tmp, "w") as out:
                json.dump(
                    {"lags": self.lags, "gcs": self.gcs, "samples": self.samples[-5000:]}, out
                )
            os.replace(tmp, self.out)


def summarise(recording: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """What the loop went through between ``start`` and ``end`` (monotonic s): the stall
    time, the longest stalls, the collections of 2 ms or more (ms, generation, thread),
    and where the main thread was, in which state, when sampled during a stall."""
    lags = [lag for at, lag in recording["lags"] if start <= at <= end]
    gcs = [
        [round(ms, 1), gen, thread]
        for at, ms, gen, thread in recording["gcs"]
        if start <= at <= end and ms >= 2
    ]
    where: collections.Counter[str] = collections.Counter()
    for at, _, state, frames, _others in recording["samples"]:
        if start <= at <= end and frames:
            where[f"{state} {frames[-1]}"] += 1
    return {
        "stalled_ms": round(sum(lags), 1),
        "longest_ms": sorted((round(x, 1) for x in lags), reverse=True)[:5],
        "collections_2ms": gcs[:20],
        "main_thread_in_stalls": dict(where.most_common(5)),
    }


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m bench.loop_probe OUT.json serve [xcore serve args]")
    Probe(sys.argv[1]).install()
    from kernel.cli import main as cli

    sys.exit(cli(sys.argv[2:]))


if __name__ == "__main__":
    main()
