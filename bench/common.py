"""Shared helpers of the benchmarks: statistics, the results table and ``results.json``.

Each benchmark module exposes ``BENCHMARKS = [(name, fn), ...]``; ``fn`` (sync or async)
returns a list of result dicts ``{"name", "value", "unit", "peers": {peer: value}}`` with
optional ``"notes"`` and ``"extra"`` keys. ``python -m bench`` runs them, prints a table
and merges the results into ``bench/results.json`` (results of benchmarks not run this
time are kept, so ``--only`` refreshes one entry).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

RESULTS = Path(__file__).with_name("results.json")

Result = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def result(
    name: str,
    value: float,
    unit: str,
    peers: dict[str, float] | None = None,
    **extra: Any,
) -> Result:
    out: Result = {"name": name, "value": value, "unit": unit, "peers": peers or {}}
    if extra:
        out["extra"] = extra
    return out


def machine() -> dict[str, Any]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "sqlite": __import__("sqlite3").sqlite_version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": cmd("git", "rev-parse", "--short", "HEAD"),
    }


def load_results() -> dict[str, Any]:
    if RESULTS.exists():
        try:
            data: dict[str, Any] = orjson.loads(RESULTS.read_bytes())
            return data
        except orjson.JSONDecodeError:
            pass
    return {"machine": {}, "benchmarks": []}


def save_results(new: list[Result]) -> None:
    data = load_results()
    names = {r["name"] for r in new}
    kept = [r for r in data.get("benchmarks", []) if r["name"] not in names]
    data["machine"] = machine()
    data["benchmarks"] = kept + new
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    tmp.replace(RESULTS)


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def table(results: list[Result]) -> str:
    rows = [("benchmark", "value", "unit", "peers (value, ratio xcore/peer)")]
    for r in results:
        peers = ", ".join(
            f"{p}: {fmt(v)} ({r['value'] / v:.2f}x)" if v else f"{p}: {fmt(v)}"
            for p, v in r.get("peers", {}).items()
        )
        headline = r.get("extra", {}).get("ratio")
        if isinstance(headline, int | float):  # a benchmark's own headline statistic
            peers += f"; headline ratio {headline:.2f}x"
        rows.append((r["name"], fmt(r["value"]), r["unit"], peers))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(row)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
