"""The reload-neighbour benchmark's method (bench/reload.py, bench/fixed_rate.lua): what
it promises to count as the server's latency, and the statistic of its headline.

- A request whose slot passed while every connection was held is timed from its slot;
  one that wrk itself sent late is timed from when it left.
- A stall of the server's loop shows in the figure, short (requests sent on time wait
  in the socket) or longer than the connections cover (requests held back are timed
  from their slots): checked against a real bare uvicorn + FastAPI app whose loop is
  blocked on purpose, loaded by wrk with the benchmark's script.
- The headline's Hodges-Lehmann estimate is not moved by one outlying pair.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from bench import reload as method


def test_a_request_held_back_by_the_server_is_timed_from_its_slot() -> None:
    # key, slot, sent, received, claimed_late (µs)
    rows = [
        ("a", 1_000.0, 1_100.0, 2_100.0, False),  # on time: 1 ms
        ("b", 2_000.0, 52_000.0, 53_000.0, True),  # every connection held: 51 ms
        ("c", 3_000.0, 23_000.0, 24_000.0, False),  # wrk itself 20 ms late: 1 ms
    ]
    latencies = method._latencies(rows)
    assert latencies["new"] == [1.0, 51.0, 1.0]
    # the old rule counted wrk's own lateness
    assert latencies["old"] == [1.0, 51.0, 21.0]


def test_the_hodges_lehmann_ratio_ignores_one_outlying_pair() -> None:
    assert method.hodges_lehmann([2.0, 2.0, 2.0, 2.0, 2.0]) == pytest.approx(2.0)
    assert method.hodges_lehmann([2.0, 2.0, 2.0, 2.0, 40.0]) == pytest.approx(2.0)
    assert method.hodges_lehmann([1.0, 2.0, 4.0]) == pytest.approx(2.0)


needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


def _stalled_phase(
    tmp_path: Path, stall_ms: float, rate: float
) -> tuple[dict[str, Any], tuple[int, int], dict[str, Any]]:
    """One fixed-rate phase against the bare app blocked ``stall_ms`` every second: its
    figures, (stalls seen, stalls) and the raw rows and latencies."""
    recording = tmp_path / "probe.json"
    command = method.bare_command(recording, stall_ms)
    keep: dict[str, Any] = {}
    with method._server(tmp_path, command=command) as (url, proc):
        figures = method._wrk_rate(url, rate, 3, check=False, server=proc.pid, keep=keep)
        deadline = time.monotonic() + 30
        stalls: list[list[float]] = []
        while time.monotonic() < deadline:  # the probe writes its recording once a second
            time.sleep(0.5)
            if recording.exists():
                stalls = json.loads(recording.read_text())["stalls"]
                if stalls and stalls[-1][0] * 1e6 >= keep["rows"][-1][2] - 1e6:
                    break
    return figures, method._stalls_seen(keep["rows"], stalls), keep


@needs_wrk
def test_a_short_stall_of_the_server_shows_in_the_figure(tmp_path: Path) -> None:
    figures, (seen, stalls), _ = _stalled_phase(tmp_path, 50, 300)
    assert stalls >= 1
    assert seen == stalls
    assert figures["max"] >= 40


@needs_wrk
def test_a_stall_longer_than_the_connections_cover_counts_the_requests_held_back(
    tmp_path: Path,
) -> None:
    # 128 connections at 300 req/s cover ~430 ms of slots; a 700 ms stall holds them all
    figures, (seen, stalls), keep = _stalled_phase(tmp_path, 700, 300)
    assert figures["claimed_late"] > 0
    assert stalls >= 1
    assert seen == stalls
    assert figures["max"] >= 560
    # the requests held back are timed from their slots: the first of them waited
    # (stall - the ~430 ms the connections cover) at least, not the few ms since it left
    held = [
        latency
        for row, latency in zip(keep["rows"], keep["latencies"]["new"], strict=True)
        if row[4]
    ]
    assert max(held) >= 0.2 * 700
