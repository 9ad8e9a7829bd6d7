"""Reload cost benchmarks: a neighbour's latency while a big plugin reloads, memory over reloads.

- ``reload_neighbour_p99_ms`` (issue 8's target: "another plugin's p99 during such
  reloads stays within 2x of its baseline"): a real ``xcore serve`` holds two plugins,
  ``neighbour`` (small routes) and ``big`` (300 routes with pydantic models). ``wrk``
  (a separate process) with ``bench/fixed_rate.lua`` offers the neighbour a *fixed
  rate*: the rate at which the neighbour's requests take :data:`LOOP_SHARE` (half) of
  the server's event loop, from the main thread's CPU time per request measured at the
  fixed-rate pattern in the same run (:func:`_calibrate`), each request timed from its
  slot of the schedule when every connection was held at its slot (a stall counts every
  request it held back), else from when it left (wrk's own lateness is not the
  server's); wrk at real-time priority pinned to the last CPU, the server in its own
  session at niceness :data:`SERVER_NICE` (:func:`_generator_prefix`, :func:`_boost`:
  the machine's other programs otherwise made most of the tail, bench/README.md).
  After the pairs the same method measures a bare uvicorn + FastAPI app
  (``bare_fastapi``) and that app with its loop blocked 50 ms every second
  (``stall_check``: refused unless every stall shows). The issue's baseline was an
  unsaturated neighbour (2.2 ms p99); a saturated one queues every connection behind
  any CPU a reload takes. A phase whose achieved rate misses the offered one by more
  than 5%, or where wrk is busier than 85% of a core, is refused. In the measured phase
  this process reloads ``big`` in a loop through the admin API for ``PHASE_S`` and wrk
  goes on for ``TAIL_S`` more; in the peer phase (``no_reload``) it does nothing, and it
  starts only once the collector has settled (``/health`` -> ``loader.gc``: nothing
  pending, no full collection for 0.5 s). Full collections and collector pauses are
  recorded per phase (``quiet_gc``, ``busy_gc``), and
  ``full_collections_after_busy_phase`` counts those the reloads set off that ran after
  the busy phase (the remains of generations freed by refcounting are collected 10 s
  after the last reload, kernel/collector.py; -1: a server without the collector's
  state, for which a fixed wait is used). Phases alternate (A B A B ...); the value is
  the median of the reload phases' p99, the peer that of the quiet phases; the
  headline ratio (``ratio``) is the Hodges-Lehmann estimate of the pairs' ratios (in
  A/A comparisons as steady as pooling every request, and not thrown by one starved
  phase, which pooling is: bench/README.md); ``ratio_median`` and ``ratio_pooled`` are
  kept, ``aa_quiet`` / ``aa_busy`` compare each side with itself (the run's noise).
  One reload runs before the first pair (the admin API's first request builds its
  routes' state once per process). Each fixed-rate phase also records the share of it
  the server's event loop ran and the share it was runnable but waited for a CPU
  (``loop_ran_*``, ``loop_waited_for_cpu_*``): on a machine shared with other programs
  the quiet p99 measured that wait (bench/README.md). ``XCORE_BENCH_PROBE=folder``
  runs the server under bench/loop_probe.py and adds each phase's stalls (``probe``).
  A real-time canary per CPU (bench/host_speed.py) runs throughout: ``host`` gives per
  phase the VM's slow windows (every CPU slowed at once, which the guest's accounting
  does not show and which made most quiet phases' tail: bench/README.md), the share
  of the phase's tail near one (and of all its requests, chance), and the headline's
  statistic over the pairs that met none (``ratio_host_clean``, a diagnostic).
- ``reload_neighbour_saturated_p99_ms``: the same pairs with the neighbour's ``/ping``
  loaded by ``wrk -t1 -c8`` as fast as it answers (a saturated closed loop): what a
  reload costs a server at its limit (the reload's CPU share), not the stalls.
- ``reload_neighbour_cpu_p99_ms``: the same two plugins in a kernel run in this process,
  the neighbour's route called by 8 closed-loop clients through ASGI; each request's
  latency is counted in *process CPU time* (what the server, the build threads and the
  clients computed meanwhile), so other programs loading the machine do not count: the
  figure holds on a busy machine where wrk's does not. Value: the p99 while ``big``
  reloads (2 reloads a phase, then until the collection they set off has run; 3 phases;
  a quiet phase starts once the collector has nothing pending) with the build window
  (services/loader/priority.py);
  peers: the same without reloads (``no_reload``) and reloading with the window turned
  off (``window_off``: ``build_switch_interval_ms: 0``, ``defer_full_gc: false``,
  ``build_cpu_share: 1``).
- ``reload_rss_growth_mb`` (a plugin with one GET route), ``reload_rss_growth_config_mb``
  (a ``run.py`` with a ``Config`` model and no router) and ``reload_rss_growth_posts_mb``
  (20 POST routes with a pydantic body model, and a ``Config``): a real server, run as a
  default ``xcore serve`` runs (every installed service, log level INFO), reloads the
  plugin 1,050 times through the admin API; the value is the server's RSS after 1,050
  reloads minus its RSS after the first 50 (target: within 10 MiB). The kernel's
  in-memory tail of recent events (8,192 events, about 6 per reload) fills during the
  run; ``extra.tail_full_growth_mb`` is the growth over 600 further reloads once it is
  full (a leak shows there; a bounded cache filling does not).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import host_speed
from bench.common import Result, median, percentile, result

TOKEN = "bench-reload-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Alternating pairs of the neighbour benchmark (``XCORE_BENCH_RELOAD_PAIRS``): the
#: headline's noise falls as one over the square root of the phases (bench/README.md).
PAIRS = int(os.environ.get("XCORE_BENCH_RELOAD_PAIRS", "5"))
PHASE_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(plugins: Path, name: str, router: str) -> None:
    folder = plugins / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.py").write_text(
        f"PLUGIN_INFO = {{'version': '1.0.0', 'api_prefix': '/app/{name}'}}\n"
    )
    (folder / "router.py").write_text(router)


def _big_router(routes: int = 300) -> str:
    lines = [
        "from fastapi import APIRouter, Query",
        "from pydantic import BaseModel",
        "router = APIRouter()",
        "class Item(BaseModel):",
        "    id: int",
        "    name: str",
        "    tags: list[str] = []",
    ]
    for i in range(routes):
        lines += [
            f"@router.post('/r{i}/{{item_id}}', response_model=Item)",
            f"async def r{i}(item_id: int, item: Item, q: str | None = Query(None)) -> Item:",
            "    return item",
        ]
    return "\n".join(lines) + "\n"


SMALL = """from fastapi import APIRouter
router = APIRouter()

@router.get("/ping")
async def ping():
    return {"ok": True}
"""

#: The neighbour of the reload benchmarks: ``/ping`` (the saturated load) and ``/echo``,
#: which answers the stamp of bench/fixed_rate.lua as plain text (the fixed-rate load).
NEIGHBOUR = (
    SMALL
    + """
from fastapi.responses import PlainTextResponse

@router.get("/echo")
async def echo(t: str = "0"):
    return PlainTextResponse(t)
"""
)


#: A folder: the neighbour benchmark's server runs under bench/loop_probe.py, its
#: recording is kept there, and each fixed-rate phase's summary goes into the figures
#: (``probe``). Unset: no probe (the default; the figures are taken without it).
PROBE = os.environ.get("XCORE_BENCH_PROBE")


def _main_thread(pid: int) -> tuple[float, float]:
    """CPU seconds the server's main thread (its event loop) ran, and the seconds it was
    runnable but waited for a CPU (``/proc/<pid>/task/<pid>/schedstat``; zeros where
    the kernel keeps no such statistics)."""
    try:
        ran, waited = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


#: The niceness given to the neighbour benchmark's server (and the bare peer) through its
#: own autogroup (``/proc/<pid>/autogroup``): Linux groups the processes of each session
#: and shares the CPUs between groups first, so a process's own niceness weighs only
#: against its own session (why ``nice -10`` changed nothing in session 6). In its own
#: session at this niceness the server waits for a CPU 1-13% of a phase instead of
#: 38-42% on a machine loaded by other programs (bench/README.md); its own threads
#: still compete with each other as before.
SERVER_NICE = -15


def _boost(pid: int) -> int | None:
    """Give ``pid``'s autogroup :data:`SERVER_NICE`; the niceness set, None if refused
    (no autogroups, or not permitted)."""
    try:
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
            return None
        Path(f"/proc/{pid}/autogroup").write_text(str(SERVER_NICE))
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def _server(
    base: Path,
    extra_env: dict[str, str] | None = None,
    probe: Path | None = None,
    boost: bool = False,
    command: list[str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server on a free port: ``xcore serve`` on ``base`` (under bench/loop_probe.py
    with ``probe``), or ``command`` + ``--port PORT``. ``boost``: in its own session at
    :data:`SERVER_NICE` (the niceness reached is ``proc.boosted``)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
    env.update(
        XCORE_ADMIN_TOKEN=TOKEN,
        XCORE_LOG_LEVEL="WARNING",
        # a 300-route plugin takes seconds to rebuild on a loaded 2-core machine
        XCORE_REQUEST_TIMEOUT="120",
        XCORE_SERVICES__LOADER__IMPORT_TIMEOUT="120",
        XCORE_SERVICES__LOADER__MOUNT_TIMEOUT="120",
    )
    env.update(extra_env or {})
    log = (base / "serve.log").open("wb")
    if command is not None:
        command = [*command, "--port", str(port)]
    else:
        entry = ["bench.loop_probe", str(probe)] if probe is not None else ["kernel.cli"]
        command = [
            sys.executable,
            "-m",
            *entry,
            "serve",
            "--no-reload",
            "--port",
            str(port),
            "--plugins-dir",
            str(base / "plugins"),
            "--data-dir",
            str(base / "var"),
        ]
    proc = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=boost,
    )
    proc.boosted = _boost(proc.pid) if boost else None  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((base / "serve.log").read_text())
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wrk_p99(url: str, seconds: float) -> tuple[float, float]:
    """Saturated closed loop (wrk -t1 -c8): the p99 (ms) and the rate reached (req/s)."""
    out = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds:g}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None or rate is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    value = float(m.group(1))
    return {"us": value / 1000, "ms": value, "s": value * 1000}[m.group(2)], float(rate.group(1))


#: The first guess of the fixed rate (calibration only): this share of the rate wrk's
#: saturated closed loop reached in the same run's first quiet phase.
RATE_SHARE = 0.5
#: The fixed-rate neighbour is offered the rate at which its requests take this share of
#: the event loop's time (CPU time of the server's main thread per request, measured at
#: the fixed-rate pattern): an unsaturated neighbour whatever the machine's load.
LOOP_SHARE = 0.5
#: Connections of the fixed-rate load: requests go on leaving on schedule through a stall
#: of up to connections / rate (160 ms at 800 req/s); a longer one holds the rest back,
#: which the rate check then refuses.
RATE_CONNECTIONS = 128
#: A fixed-rate phase whose achieved rate misses the offered one by more than this is
#: refused (the generator, or a server that could not keep up, measured nothing valid).
RATE_TOLERANCE = 0.05
#: A generator busier than this share of a core is at its limit: refused.
WRK_BUSY_LIMIT = 0.85
LUA = Path(__file__).resolve().parent / "fixed_rate.lua"
#: The old stamp rule (before session 7): a request that left more than this (µs) after
#: its slot was timed from its slot, whatever made it late; kept as ``old_*`` figures.
OLD_LATE_US = 2000
#: wrk runs under SCHED_FIFO at this priority, pinned to the last CPU, where permitted
#: (``taskset``, ``chrt``): it then runs the moment its timers or sockets are ready
#: instead of waiting for a CPU behind other programs (17-29% of a phase on the loaded
#: machine, with 4-15% of its requests leaving more than 2 ms late). Pinned, because an
#: unpinned real-time wrk is woken on the server's CPU (the response's sender) and
#: preempts the server's loop at every response (``perf sched timehist``: the two
#: alternating every 30-500 µs on one CPU). It uses ~10% of a core.
WRK_RT_PRIORITY = 50


@functools.cache
def _generator_prefix() -> tuple[str, ...]:
    """``taskset -c LAST chrt -f PRIORITY`` for wrk where this process may use them,
    else what of it is permitted (nothing: wrk as any program)."""
    chrt, taskset = shutil.which("chrt"), shutil.which("taskset")
    command: tuple[str, ...] = ()
    cpus = sorted(os.sched_getaffinity(0))
    if taskset is not None and len(cpus) > 1:
        command = (taskset, "-c", str(cpus[-1]))
    if chrt is not None:
        rt = (*command, chrt, "-f", str(WRK_RT_PRIORITY))
        if subprocess.run([*rt, "true"], capture_output=True).returncode == 0:
            return rt
    return command


def _parse_wrk(samples: Path) -> tuple[list[tuple[str, float, float, float, bool]], list[int]]:
    """bench/fixed_rate.lua's rows: (key, slot, sent, received, claimed_late) in µs, and
    [ns the wrk thread waited for a CPU, ns elapsed] between its first and last
    schedstat rows (empty with fewer than two)."""
    rows: list[tuple[str, float, float, float, bool]] = []
    sched: list[list[int]] = []
    bad: list[list[str]] = []
    for line in samples.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "S":
            sched.append([int(x) for x in parts[1:4]])
            continue
        if parts[0] != "200" or parts[1] == "-1":
            bad.append(parts)
            continue
        slot, sent, received = float(parts[1]), float(parts[2]), float(parts[3])
        rows.append((parts[1], slot, sent, received, parts[4] == "1"))
    if bad:
        raise RuntimeError(f"the fixed-rate load saw {len(bad)} failed requests: {bad[:3]}")
    waited: list[int] = []
    if len(sched) > 1:
        span = sched[-1][0] - sched[0][0]  # µs
        waited = [sched[-1][2] - sched[0][2], span * 1000]
    return rows, waited


def _latencies(rows: list[tuple[str, float, float, float, bool]]) -> dict[str, list[float]]:
    """Each request's latency (ms) by the current rule (``new``: from its slot only when
    its slot had passed before a connection was free to claim it, i.e. the server held
    every connection; otherwise from when it left) and by the old one (``old``: from its
    slot whenever it left more than 2 ms late, wrk's own lateness included)."""
    new = [(r - (slot if late else sent)) / 1000 for _, slot, sent, r, late in rows]
    old = [
        (r - (slot if sent - slot > OLD_LATE_US else sent)) / 1000 for _, slot, sent, r, _ in rows
    ]
    return {"new": new, "old": old}


def _wrk_rate(
    base: str,
    rate: float,
    seconds: float,
    check: bool = True,
    server: int = 0,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The neighbour at ``rate`` req/s (bench/fixed_rate.lua, wrk under
    :func:`_generator_prefix`): latency (ms: p50, p99, max; ``old_*`` by the old stamp
    rule, from the same requests), the achieved rate, wrk's CPU and the share of the
    phase its thread waited for a CPU, the requests that left late because every
    connection was held (``claimed_late``) and those wrk itself sent late
    (``wrk_late``); with ``server`` (its pid), the share of the phase its event loop ran
    and the share it was runnable but waited for a CPU. ``keep`` receives the raw rows
    (``rows``) and the latencies (``latencies``) for pooling and the probe."""
    loop_before = _main_thread(server) if server else (0.0, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "latencies.txt"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            [
                *_generator_prefix(),
                "wrk",
                "-t1",
                f"-c{RATE_CONNECTIONS}",
                f"-d{seconds:g}s",
                "-s",
                str(LUA),
                f"{base}/",
                "--",
                f"{rate:.3f}",
                str(samples),
                "/app/neighbour/echo?t=",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        loop_after = _main_thread(server) if server else (0.0, 0.0)
        if proc.returncode != 0 or "Socket errors" in proc.stdout:
            raise RuntimeError(f"wrk failed:\n{proc.stdout}{proc.stderr}")
        rows, wrk_sched = _parse_wrk(samples)
    latencies = _latencies(rows)
    achieved = len(rows) / seconds
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / seconds
    if check and achieved < rate * (1 - RATE_TOLERANCE):
        raise RuntimeError(
            f"the fixed-rate load reached {achieved:.0f} req/s of the {rate:.0f} offered "
            f"(more than {RATE_TOLERANCE:.0%} short): refused"
        )
    if check and cpu > WRK_BUSY_LIMIT:
        raise RuntimeError(f"wrk used {cpu:.0%} of a core: the generator is the limit")
    if keep is not None:
        keep["rows"] = rows
        keep["latencies"] = latencies
    new, old = latencies["new"], latencies["old"]
    return {
        "p50": percentile(new, 50),
        "p99": percentile(new, 99),
        "max": max(new),
        "old_p99": percentile(old, 99),
        "old_max": max(old),
        "achieved": achieved,
        "wrk_cpu": cpu,
        "wrk_waited_for_cpu": wrk_sched[0] / wrk_sched[1] if wrk_sched else -1.0,
        "claimed_late": sum(1 for row in rows if row[4]),
        "wrk_late": sum(
            1 for _, slot, sent, _, late in rows if not late and sent - slot > OLD_LATE_US
        ),
        "loop_ran": (loop_after[0] - loop_before[0]) / seconds,
        "loop_waited_for_cpu": (loop_after[1] - loop_before[1]) / seconds,
    }


#: Seconds wrk goes on measuring after the reloads of a busy phase stop: the work the
#: reloads set off (the collection of the unloaded generations) falls inside the phase.
TAIL_S = 3.0
#: Without the collector's state in /health (an older server): wait this long instead.
SETTLE_FALLBACK_S = 3.0


def _gc_state(client: httpx.Client, url: str) -> dict[str, Any] | None:
    """The collector's state (``/health`` -> loader.gc), None if the server has none."""
    r = client.get(f"{url}/health", headers=AUTH)
    gc_state = r.json().get("components", {}).get("loader", {}).get("gc")
    return gc_state if isinstance(gc_state, dict) else None


def _wait_settled(client: httpx.Client, url: str) -> dict[str, Any] | None:
    """Wait until nothing a reload set off is still pending or running (at most 60 s)."""
    state = _gc_state(client, url)
    if state is None:
        time.sleep(SETTLE_FALLBACK_S)
        return None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # settled: nothing pending, and no full collection during the last 0.5 s
        if not state["pending"]:
            time.sleep(0.5)
            again = _gc_state(client, url)
            assert again is not None
            if not again["pending"] and again["full_collections"] == state["full_collections"]:
                return again
            state = again
            continue
        time.sleep(0.1)
        state = _gc_state(client, url) or state
    raise RuntimeError(f"the collector did not settle within 60 s: {state}")


def _gc_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    if before is None or after is None:
        return {}
    return {
        "full_collections": after["full_collections"] - before["full_collections"],
        "collector_pause_ms": round(after["total_pause_ms"] - before["total_pause_ms"], 3),
        "collector_max_pause_ms": after["max_pause_ms"],
    }


def _reloading(url: str, measure: Callable[[float], Any]) -> tuple[Any, int, dict[str, Any], int]:
    """Run ``measure(PHASE_S + TAIL_S)`` while another thread reloads ``big`` for the
    first ``PHASE_S`` s: its value, the reloads, the collector's work during the phase
    and the full collections that still ran after it (0 expected; -1: no state)."""
    stop = threading.Event()
    counter = [0]
    failure: list[BaseException] = []

    def reload_loop() -> None:
        try:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    r = client.post(f"{url}/admin/plugins/big/reload", headers=AUTH)
                    if r.status_code != 200:
                        raise RuntimeError(r.text)
                    counter[0] += 1
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    with httpx.Client(timeout=60) as admin:
        before = _gc_state(admin, url)
        thread = threading.Thread(target=reload_loop)
        thread.start()
        # reloads for PHASE_S, then TAIL_S more of the same measure
        timer = threading.Timer(PHASE_S, stop.set)
        timer.start()
        try:
            value = measure(PHASE_S + TAIL_S)
        finally:
            stop.set()
            timer.cancel()
            thread.join()
        if failure:
            raise RuntimeError("a reload failed") from failure[0]
        at_end = _gc_state(admin, url)
        settled = _wait_settled(admin, url)
    # work the reloads set off that ran after the busy phase (should be none)
    spilled = _gc_delta(at_end, settled).get("full_collections", -1)
    return value, counter[0], _gc_delta(before, at_end), spilled


def _calibrate(url: str, guess: float, server: int) -> tuple[float, float | None]:
    """The fixed rate at which the neighbour's requests take :data:`LOOP_SHARE` of the
    server's event loop, and the loop's CPU seconds per request (None: unknown).

    "Half the saturated rate" was not half the loop: a saturated closed loop (8
    connections, several requests ready at each wake-up, ``/ping``) costs the loop less
    per request than the fixed-rate pattern (one request per wake-up over 128
    connections, ``/echo``), whose loop then ran 57-81% of the time; and the saturated
    rate, a wall-clock figure, swung 2.2x from run to run with the machine's load. CPU
    time per request does not. Without schedstat (not Linux) the guess is kept."""
    _wrk_rate(url, guess, 2, check=False)  # warm up the echo route
    rate, cost = guess, None
    # twice: the cost per request grows as the rate falls (fewer requests share a
    # wake-up), so the second measure, at the first estimate, lands closer
    for _ in range(2):
        measured = _wrk_rate(url, rate, 2, check=False, server=server)
        if measured["loop_ran"] <= 0 or measured["achieved"] <= 0:
            return guess, None
        cost = measured["loop_ran"] / measured["achieved"]
        rate = LOOP_SHARE / cost
    return rate, cost


def _pooled_p99(kept: list[dict[str, Any]], rule: str) -> float:
    """The p99 of every request of the phases ``kept`` together (``rule``: new/old)."""
    return percentile([x for k in kept for x in k["latencies"][rule]], 99)


def hodges_lehmann(ratios: list[float]) -> float:
    """The Hodges-Lehmann estimate of a ratio from paired ratios: the median, over every
    two pairs (a pair with itself included), of their geometric mean. As efficient as
    pooling the requests when every phase is alike, and as robust as the median of the
    ratios when one phase is not (bench/README.md, "The headline ratio")."""
    logs = [math.log(r) for r in ratios]
    walsh = [(logs[i] + logs[j]) / 2 for i in range(len(logs)) for j in range(i, len(logs))]
    return math.exp(median(walsh))


def _aa(kept: list[dict[str, Any]], p99s: list[float]) -> dict[str, float]:
    """An A/A comparison inside one side: its phases split into two alternating halves
    (0, 2, 4 against 1, 3), compared as the headline compares the two sides. A
    statistic that is robust to the machine's noise gives ~1 here; how far from 1 it
    lands, run after run, is its noise floor."""
    a, b = kept[0::2], kept[1::2]
    pairs = [p99s[i + 1] / p99s[i] for i in range(0, len(p99s) - 1, 2)]
    if not pairs:
        return {}
    return {
        "pooled_ratio": round(_pooled_p99(b, "new") / _pooled_p99(a, "new"), 3),
        "pair_ratio_median": round(median(pairs), 3),
        "pair_ratio_hl": round(hodges_lehmann(pairs), 3),
    }


def _server_times(path: Path) -> dict[str, tuple[float, float, float]]:
    """bench/loop_probe.py's request rows: key -> (read, app called, written), µs."""
    served: dict[str, tuple[float, float, float]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            served[parts[0]] = (
                float(parts[1]) * 1e6,
                float(parts[2]) * 1e6,
                float(parts[3]) * 1e6,
            )
    return served


#: The parts of a request's time: wrk late to send it (slot to sent), in the network and
#: the server's socket until the server's loop read it, read to the app's call (parsing,
#: the task's start), the app (call to the response handed to the socket), back to wrk.
PARTS = ("slot_to_sent", "sent_to_read", "read_to_call", "call_to_written", "written_to_received")


def _decompose(
    rows: list[tuple[str, float, float, float, bool]],
    served: dict[str, tuple[float, float, float]],
) -> dict[str, Any]:
    """Where the time of one phase's requests went (ms): each part's p99, and its mean
    over the requests at or above the phase's p99 (the tail)."""
    parts: list[tuple[float, ...]] = []
    totals: list[float] = []
    for key, slot, sent, received, late in rows:
        times = served.get(key)
        if times is None:
            continue
        read, called, written = times
        parts.append(
            tuple(
                (b - a) / 1000
                for a, b in (
                    (slot, sent),
                    (sent, read),
                    (read, called),
                    (called, written),
                    (written, received),
                )
            )
        )
        totals.append((received - (slot if late else sent)) / 1000)
    if not parts:
        return {}
    p99 = percentile(totals, 99)
    tail = [p for p, total in zip(parts, totals, strict=True) if total >= p99]
    return {
        "joined": len(parts),
        "p99": {n: round(percentile([p[i] for p in parts], 99), 2) for i, n in enumerate(PARTS)},
        "tail_mean": {
            n: round(sum(p[i] for p in tail) / len(tail), 2) for i, n in enumerate(PARTS)
        },
    }


#: The stall the check injects into the bare peer's loop, once a second (ms).
STALL_MS = 50.0
#: Fixed-rate phases against the bare peer, and against it with the stall.
BARE_PHASES = 2


def _stalls_seen(
    rows: list[tuple[str, float, float, float, bool]], stalls: list[list[float]]
) -> tuple[int, int]:
    """Of the injected stalls that began inside this phase (monotonic s, ms) and that a
    request met, how many the figure shows: a request that left in the first tenth of a
    stall must be timed at no less than 80% of the stall (noise can only add to it). A
    stall no request left during the first tenth of (the generator itself descheduled
    on a loaded machine) can show nothing either way and is not counted. (seen, stalls)."""
    first, last = rows[0][2], rows[-1][2]
    seen = total = 0
    for start_s, ms in stalls:
        start = start_s * 1e6
        if not first <= start <= last - ms * 1000:
            continue
        window = [
            (received - (slot if late else sent)) / 1000
            for _, slot, sent, received, late in rows
            if start <= sent <= start + ms * 100
        ]
        if not window:
            continue
        total += 1
        if max(window) >= 0.8 * ms:
            seen += 1
    return seen, total


def bare_command(recording: Path, stall_ms: float | None = None) -> list[str]:
    """The command of the bare uvicorn + FastAPI peer (bench/loop_probe.py) recording to
    ``recording``, its loop blocked ``stall_ms`` every second when given."""
    stall = ["--stall", f"{stall_ms:g}"] if stall_ms is not None else []
    return [
        sys.executable,
        "-m",
        "bench.loop_probe",
        str(recording),
        "--no-lag",
        "--no-requests",
        *stall,
        "bare",
    ]


def _bare_peer(
    rate: float,
    rows_out: dict[str, list[list[tuple[str, float, float, float, bool]]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The same method against a bare uvicorn + FastAPI app serving the same route
    (``bench/loop_probe.py bare``, in its own session at :data:`SERVER_NICE` like the
    xcore server), at the same rate: ``bare``, the framework's own shape under this
    load; and against that app with a :data:`STALL_MS` stall of its loop every second:
    ``stalled``, the check that the method shows a stall the server causes. Each stall
    is matched with the requests that left in its first tenth (they must be timed at
    80% of the stall or more, whatever else the machine did): refused if one is not.
    ``rows_out`` receives each label's phases' request rows (for the host's speed)."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for label, stall in (("bare", False), ("stalled", True)):
            recording = base / f"{label}.json"
            command = bare_command(recording, STALL_MS if stall else None)
            kept: list[dict[str, Any]] = []
            with _server(base, boost=True, command=command) as (url, proc):
                _wrk_rate(url, rate, 2, check=False)  # warm up
                phases = []
                for _ in range(BARE_PHASES):
                    kept.append({})
                    phases.append(_wrk_rate(url, rate, PHASE_S, server=proc.pid, keep=kept[-1]))
                time.sleep(1.5)  # (the probe writes its recording once a second)
                injected = json.loads(recording.read_text())["stalls"]
            out[label] = {
                "p99": [round(p["p99"], 2) for p in phases],
                "max": [round(p["max"], 1) for p in phases],
                "old_p99": [round(p["old_p99"], 2) for p in phases],
                "p50": [round(p["p50"], 2) for p in phases],
                "loop_ran": [round(p["loop_ran"], 3) for p in phases],
                "loop_waited_for_cpu": [round(p["loop_waited_for_cpu"], 3) for p in phases],
            }
            if rows_out is not None:
                rows_out[label] = [k["rows"] for k in kept]
            if stall:
                counts = [_stalls_seen(k["rows"], injected) for k in kept]
                seen, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
                out[label].update(injected_ms=STALL_MS, stalls=total, stalls_seen=seen)
                if total == 0 or seen < total:
                    raise RuntimeError(
                        f"a server stalling {STALL_MS:g} ms every second: {seen} of its "
                        f"{total} stalls seen in the figure: the method hides server stalls"
                    )
    return out


def _host_slowed(
    host: host_speed.HostWatch,
    kept: dict[str, list[dict[str, Any]]],
    bare_rows: dict[str, list[list[tuple[str, float, float, float, bool]]]],
    busy: list[dict[str, Any]],
    quiet: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per phase, the host's slow windows (bench/host_speed.py: 50 ms in which the
    real-time canaries ran 1.5x slower on every CPU at once) and the share of the
    phase's tail (requests at or above its p99) that overlapped one or followed it by
    less than 100 ms, beside the same share over all its requests (chance), and the p99
    (ms) of the requests that met none (None under 100 of them); and the headline's
    statistic over the pairs neither of whose phases met one (``ratio_host_clean``,
    None under two such pairs), and over the pairs' p99s away from slow windows
    (``ratio_away_from_slow``). Diagnostics: the headline stays ``ratio``."""

    def phase(
        rows: list[tuple[str, float, float, float, bool]],
    ) -> tuple[int, float, float, float | None]:
        if not rows:
            return 0, 0.0, 0.0, None
        windows = host_speed.count_in(host.slow, rows[0][2] / 1e6, rows[-1][3] / 1e6)
        totals = [(received - (slot if late else sent)) for _, slot, sent, received, late in rows]
        p99 = percentile(totals, 99)
        tail = [
            (sent, received)
            for (_, _, sent, received, _), total in zip(rows, totals, strict=True)
            if total >= p99
        ]
        hit = sum(
            1 for sent, received in tail if host_speed.near(host.slow, sent / 1e6, received / 1e6)
        )
        # the requests that met no slow window; the others' share is what chance
        # alone gives the tail's share
        away = [
            total / 1000
            for (_, _, sent, received, _), total in zip(rows, totals, strict=True)
            if not host_speed.near(host.slow, sent / 1e6, received / 1e6)
        ]
        return (
            windows,
            round(hit / len(tail), 2),
            round((len(rows) - len(away)) / len(rows), 2),
            round(percentile(away, 99), 2) if len(away) >= 100 else None,
        )

    out: dict[str, Any] = {"canary_realtime": host.realtime, "canary_problem": host.problem}
    pairs_rows = {kind: [k.get("rows", []) for k in kept[kind]] for kind in ("quiet", "busy")}
    for label, phases in {**pairs_rows, **bare_rows}.items():
        counted = [phase(rows) for rows in phases]
        out[f"slow_windows_{label}"] = [c[0] for c in counted]
        out[f"tail_near_slow_{label}"] = [c[1] for c in counted]
        out[f"all_near_slow_{label}"] = [c[2] for c in counted]
        out[f"p99_away_from_slow_{label}"] = [c[3] for c in counted]
    clean = [
        b["p99"] / q["p99"]
        for b, q, nb, nq in zip(
            busy, quiet, out["slow_windows_busy"], out["slow_windows_quiet"], strict=True
        )
        if nb == 0 and nq == 0
    ]
    out["host_clean_pairs"] = len(clean)
    out["ratio_host_clean"] = round(hodges_lehmann(clean), 3) if len(clean) >= 2 else None
    away = [
        b / q
        for b, q in zip(
            out["p99_away_from_slow_busy"], out["p99_away_from_slow_quiet"], strict=True
        )
        if b is not None and q is not None
    ]
    out["ratio_away_from_slow"] = round(hodges_lehmann(away), 3) if len(away) >= 2 else None
    return out


def reload_neighbour_p99() -> list[Result]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is needed (apt-get install -y wrk)")
    sat_quiet: list[float] = []
    sat_busy: list[float] = []
    quiet: list[dict[str, float]] = []
    busy: list[dict[str, float]] = []
    gc_log: dict[str, list[dict[str, Any]]] = {"quiet": [], "busy": [], "sat_busy": []}
    spilled: list[int] = []
    kept: dict[str, list[dict[str, Any]]] = {"quiet": [], "busy": []}
    reloads = 0
    bare_rows: dict[str, list[list[tuple[str, float, float, float, bool]]]] = {}
    with tempfile.TemporaryDirectory() as tmp, host_speed.HostWatch(Path(tmp)) as host:
        base = Path(tmp)
        _write(base / "plugins", "neighbour", NEIGHBOUR)
        _write(base / "plugins", "big", _big_router())
        probe = None
        if PROBE:
            Path(PROBE).mkdir(parents=True, exist_ok=True)
            probe = Path(PROBE) / "reload_neighbour_probe.json"
            # the request rows are appended: a former run's must not join this one's
            Path(f"{probe}.requests").unlink(missing_ok=True)
        phases: list[tuple[str, float, float]] = []
        with (
            _server(base, probe=probe, boost=True) as (url, proc),
            httpx.Client(timeout=60) as admin,
        ):
            target = f"{url}/app/neighbour/ping"
            _wrk_p99(target, 2)  # warm up
            # one reload first: the first request to the admin API builds its routes'
            # state (FastAPI, ~80 ms on the loop once per process), not a reload's cost
            r = admin.post(f"{url}/admin/plugins/big/reload", headers=AUTH)
            if r.status_code != 200:
                raise RuntimeError(r.text)
            _wait_settled(admin, url)
            # the rate a saturated closed loop reaches, quiet, in this run
            _, saturated_rate = _wrk_p99(target, PHASE_S)
            rate, loop_cost = _calibrate(url, saturated_rate * RATE_SHARE, proc.pid)
            for _ in range(PAIRS):
                # fixed rate: quiet (nothing a reload set off is pending), then reloading
                before = _wait_settled(admin, url)
                start = time.monotonic()
                kept["quiet"].append({})
                quiet.append(_wrk_rate(url, rate, PHASE_S, server=proc.pid, keep=kept["quiet"][-1]))
                phases.append(("quiet", start, time.monotonic()))
                gc_log["quiet"].append(_gc_delta(before, _gc_state(admin, url)))
                start = time.monotonic()
                kept["busy"].append({})
                value, n, gc_delta, spill = _reloading(
                    url,
                    lambda seconds: _wrk_rate(
                        url, rate, seconds, server=proc.pid, keep=kept["busy"][-1]
                    ),
                )
                phases.append(("busy", start, start + PHASE_S + TAIL_S))
                busy.append(value)
                gc_log["busy"].append(gc_delta)
                spilled.append(spill)
                reloads += n
                # saturated closed loop: the same pair
                _wait_settled(admin, url)
                sat_quiet.append(_wrk_p99(target, PHASE_S)[0])
                value, n, gc_delta, spill = _reloading(
                    url, lambda seconds: _wrk_p99(target, seconds)[0]
                )
                sat_busy.append(value)
                gc_log["sat_busy"].append(gc_delta)
                spilled.append(spill)
                reloads += n
            probed: dict[str, list[dict[str, Any]]] = {}
            if probe is not None:
                from bench.loop_probe import summarise

                time.sleep(1.5)  # (the probe writes its recording once a second)
                recording = json.loads(probe.read_text())
                for kind, start, end in phases:
                    probed.setdefault(kind, []).append(summarise(recording, start, end))
                served = _server_times(Path(f"{probe}.requests"))
                for kind in ("quiet", "busy"):
                    probed[f"{kind}_requests"] = [_decompose(k["rows"], served) for k in kept[kind]]
            boosted = getattr(proc, "boosted", None)
        bare = _bare_peer(rate, bare_rows)
    slowed = _host_slowed(host, kept, bare_rows, busy, quiet)
    busy_p99 = [b["p99"] for b in busy]
    quiet_p99 = [q["p99"] for q in quiet]
    ratios = [b / q for b, q in zip(busy_p99, quiet_p99, strict=True)]
    pooled = {
        rule: {kind: _pooled_p99(kept[kind], rule) for kind in ("quiet", "busy")}
        for rule in ("new", "old")
    }
    old_ratios = [b["old_p99"] / q["old_p99"] for b, q in zip(busy, quiet, strict=True)]
    sat_ratios = [b / q for b, q in zip(sat_busy, sat_quiet, strict=True)]
    return [
        result(
            "reload_neighbour_p99_ms",
            median(busy_p99),
            "ms",
            peers={"no_reload": median(quiet_p99)},
            ratio=hodges_lehmann(ratios),
            headline=(
                "ratio: the Hodges-Lehmann estimate of the pairs' p99 ratios (the median "
                "of the geometric means of every two of them); value and peer are the "
                "sides' median p99s, their quotient the ratio of medians"
            ),
            ratio_median=median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            ratio_pooled=pooled["new"]["busy"] / pooled["new"]["quiet"],
            pooled_p99=pooled["new"],
            busy_p99=busy_p99,
            quiet_p99=quiet_p99,
            aa_quiet=_aa(kept["quiet"], quiet_p99),
            aa_busy=_aa(kept["busy"], busy_p99),
            old_rule={
                "busy_p99": [b["old_p99"] for b in busy],
                "quiet_p99": [q["old_p99"] for q in quiet],
                "ratio_median": median(old_ratios),
                "ratio_pooled": pooled["old"]["busy"] / pooled["old"]["quiet"],
                "pooled_p99": pooled["old"],
                "busy_max": [b["old_max"] for b in busy],
                "quiet_max": [q["old_max"] for q in quiet],
            },
            claimed_late_quiet=[q["claimed_late"] for q in quiet],
            claimed_late_busy=[b["claimed_late"] for b in busy],
            wrk_late_quiet=[q["wrk_late"] for q in quiet],
            wrk_late_busy=[b["wrk_late"] for b in busy],
            wrk_waited_for_cpu=[round(x["wrk_waited_for_cpu"], 4) for x in quiet + busy],
            wrk_priority=" ".join(Path(x).name for x in _generator_prefix()) or "normal",
            server_nice=boosted,
            bare_fastapi=bare["bare"],
            stall_check=bare["stalled"],
            busy_p50=[b["p50"] for b in busy],
            quiet_p50=[q["p50"] for q in quiet],
            busy_max=[b["max"] for b in busy],
            quiet_max=[q["max"] for q in quiet],
            offered_rate=round(rate, 1),
            saturated_rate=round(saturated_rate, 1),
            loop_cpu_per_request_ms=round(loop_cost * 1000, 4) if loop_cost else None,
            achieved_rate_quiet=[round(q["achieved"], 1) for q in quiet],
            achieved_rate_busy=[round(b["achieved"], 1) for b in busy],
            wrk_cpu=[round(x["wrk_cpu"], 3) for x in quiet + busy],
            loop_ran_quiet=[round(q["loop_ran"], 3) for q in quiet],
            loop_ran_busy=[round(b["loop_ran"], 3) for b in busy],
            loop_waited_for_cpu_quiet=[round(q["loop_waited_for_cpu"], 3) for q in quiet],
            loop_waited_for_cpu_busy=[round(b["loop_waited_for_cpu"], 3) for b in busy],
            probe=probed or None,
            host=slowed,
            pairs=PAIRS,
            phase_s=PHASE_S,
            tail_s=TAIL_S,
            quiet_gc=gc_log["quiet"],
            busy_gc=gc_log["busy"],
            full_collections_after_busy_phase=spilled,
            target_ratio=2.0,
            generator=(
                f"wrk -t1 -c{RATE_CONNECTIONS} + bench/fixed_rate.lua at the rate whose "
                f"requests take {LOOP_SHARE:g} of the server's loop (its main thread's CPU "
                "per request in this run); latency from each request's slot when every "
                "connection was held, else from when it left"
            ),
        ),
        result(
            "reload_neighbour_saturated_p99_ms",
            median(sat_busy),
            "ms",
            peers={"no_reload": median(sat_quiet)},
            ratio_median=median(sat_ratios),
            ratio_min=min(sat_ratios),
            ratio_max=max(sat_ratios),
            busy_p99=sat_busy,
            quiet_p99=sat_quiet,
            pairs=PAIRS,
            busy_gc=gc_log["sat_busy"],
            reloads_of_big=reloads,
            generator="wrk -t1 -c8 (separate process, saturated closed loop)",
            measures="what a reload costs a saturated server (its CPU share), not a stall",
        ),
    ]


CPU_PHASES = 3
CPU_RELOADS = 2
CPU_CLIENTS = 8
CPU_QUIET_REQUESTS = 3000


async def _cpu_phases(
    base: Path, loader: dict[str, Any], gc_log: list[dict[str, Any]]
) -> tuple[list[float], list[float], int]:
    """p99 CPU latency of the neighbour per quiet phase and per reloading phase."""
    from kernel import Kernel, Settings, create_app
    from kernel.collector import collector
    from services.admin.service import AdminService
    from services.loader.service import LoaderService
    from services.router.service import RouterService

    settings = Settings(
        data_dir=base / "var",
        plugins_dir=base / "plugins",
        admin_token=TOKEN,
        reload=False,
        node="bench",
        log_level="WARNING",
        request_timeout=120,
        services={"loader": {"import_timeout": 120, "mount_timeout": 120, **loader}},
    )
    kernel = Kernel(settings, services=[AdminService(), RouterService(), LoaderService()])
    app = create_app(kernel)
    quiet: list[float] = []
    busy: list[float] = []
    reloads = 0
    async with (
        kernel.lifespan(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=120
        ) as client,
    ):

        async def settled() -> None:
            # nothing a reload set off is pending or running (kernel/collector.py)
            while collector.pending():
                await asyncio.sleep(0.05)

        async def phase(reload: bool) -> float:
            nonlocal reloads
            latencies: list[float] = []
            walls: list[tuple[float, float]] = []
            done = asyncio.Event()
            began = time.monotonic()
            full = gc.get_stats()[2]["collections"]
            paused = collector.total_pause_ms

            async def neighbour() -> None:
                while not done.is_set():
                    start, wall = time.process_time(), time.monotonic()
                    r = await client.get("/app/neighbour/ping")
                    latencies.append((time.process_time() - start) * 1000)
                    walls.append((wall, time.monotonic()))
                    if r.status_code != 200:
                        raise RuntimeError(r.text)
                    if not reload and len(latencies) >= CPU_QUIET_REQUESTS:
                        done.set()
                    # through the loop, as a request from a socket (an ASGI call alone
                    # may finish without ever suspending)
                    await asyncio.sleep(0)

            if not reload:
                await settled()
            clients = [asyncio.create_task(neighbour()) for _ in range(CPU_CLIENTS)]
            try:
                if reload:
                    for _ in range(CPU_RELOADS):
                        r = await client.post("/admin/plugins/big/reload", headers=AUTH)
                        if r.status_code != 200:
                            raise RuntimeError(r.text)
                        reloads += 1
                    # a collection of unloaded generations the reloads set off (0.5 s
                    # after the last) belongs to this phase; the remains of generations
                    # freed by refcounting, collected remains_delay (10 s) later, are
                    # counted after it (``after``: a longer phase would dilute its p99)
                    await asyncio.sleep(collector.settle + collector.tick)
                    while collector.pending() and not collector.freed_since_full:
                        await asyncio.sleep(0.05)
                    done.set()
                await asyncio.gather(*clients)
            finally:
                for task in clients:
                    task.cancel()
            p99 = percentile(latencies, 99)
            entry: dict[str, Any] = {
                "reload": reload,
                # wall-clock span and the tail's requests (monotonic s): the host's
                # slow windows they met are counted after the run (_cpu_host)
                "wall": (began, time.monotonic()),
                "tail_walls": [w for w, x in zip(walls, latencies, strict=True) if x >= p99],
                "all_walls": walls,
                "full_collections": gc.get_stats()[2]["collections"] - full,
                "collector_pause_ms": round(collector.total_pause_ms - paused, 3),
            }
            if reload:
                full, paused = gc.get_stats()[2]["collections"], collector.total_pause_ms
                await settled()
                entry["after"] = {
                    "full_collections": gc.get_stats()[2]["collections"] - full,
                    "collector_pause_ms": round(collector.total_pause_ms - paused, 3),
                }
            gc_log.append(entry)
            return p99

        await phase(False)  # warm up
        for _ in range(CPU_PHASES):
            quiet.append(await phase(False))
            busy.append(await phase(True))
    return quiet, busy, reloads


def _cpu_host(slow: set[int], log: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per phase of the CPU benchmark (``gc_per_phase``'s order, the warm-up first):
    the host's slow windows it met (bench/host_speed.py; a slowed CPU makes the same
    work take more CPU time, so process CPU time does not escape the host), the share
    of its tail near one and that of all its requests (chance). Drops the raw spans
    from ``log``."""
    out: dict[str, list[Any]] = {"slow_windows": [], "tail_near_slow": [], "all_near_slow": []}
    for entry in log:
        began, ended = entry.pop("wall")
        tail, every = entry.pop("tail_walls"), entry.pop("all_walls")
        out["slow_windows"].append(host_speed.count_in(slow, began, ended))
        hit = sum(1 for s, e in tail if host_speed.near(slow, s, e))
        out["tail_near_slow"].append(round(hit / len(tail), 2) if tail else 0.0)
        chance = sum(1 for s, e in every if host_speed.near(slow, s, e))
        out["all_near_slow"].append(round(chance / len(every), 2) if every else 0.0)
    return out


async def reload_neighbour_cpu_p99() -> list[Result]:
    runs: dict[str, tuple[list[float], list[float], int]] = {}
    gc_logs: dict[str, list[dict[str, Any]]] = {}
    hosts: dict[str, dict[str, list[Any]]] = {}
    off = {"build_switch_interval_ms": 0, "defer_full_gc": False, "build_cpu_share": 1}
    for label, loader in (("off", off), ("on", {})):
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            _write(base / "plugins", "neighbour", NEIGHBOUR)
            _write(base / "plugins", "big", _big_router())
            gc_logs[label] = []
            with host_speed.HostWatch(base) as host:
                runs[label] = await _cpu_phases(base, loader, gc_logs[label])
            hosts[label] = _cpu_host(host.slow, gc_logs[label])
    quiet, busy, reloads = runs["on"]
    _, busy_off, reloads_off = runs["off"]
    return [
        result(
            "reload_neighbour_cpu_p99_ms",
            median(busy),
            "CPU ms",
            peers={"no_reload": median(quiet), "window_off": median(busy_off)},
            quiet_p99=quiet,
            busy_p99=busy,
            busy_p99_window_off=busy_off,
            quiet_p99_window_off=runs["off"][0],
            reloads=reloads + reloads_off,
            gc_per_phase=gc_logs["on"],
            gc_per_phase_window_off=gc_logs["off"],
            host=hosts["on"],
            host_window_off=hosts["off"],
            clients=CPU_CLIENTS,
            target_ratio=2.0,
            measure="process CPU time per request (load-independent), in-process ASGI",
        )
    ]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CONFIG_RUN = """from pydantic import BaseModel

class Config(BaseModel):
    greeting: str = "hi"
    retries: int = 3
"""


def posts_router(routes: int = 20) -> str:
    lines = [
        "from fastapi import APIRouter",
        "from pydantic import BaseModel",
        "router = APIRouter()",
        "class Item(BaseModel):",
        "    id: int",
        "    tags: list[str] = []",
    ]
    for i in range(routes):
        lines += [
            f"@router.post('/r{i}', response_model=Item)",
            f"async def r{i}(item: Item) -> Item:",
            "    return item",
        ]
    return "\n".join(lines) + "\n"


def _rss_growth(name: str, run: str, router: str | None) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        folder = base / "plugins" / "plugin"
        folder.mkdir(parents=True)
        (folder / "run.py").write_text(
            "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/plugin'}\n" + run
        )
        if router is not None:
            (folder / "router.py").write_text(router)
        # as a default `xcore serve` runs: every installed service, log level INFO
        with (
            _server(base, {"XCORE_LOG_LEVEL": "INFO"}) as (url, proc),
            httpx.Client(timeout=60) as client,
        ):
            marks: dict[int, float] = {}
            for i in range(1, 1651):
                r = client.post(f"{url}/admin/plugins/plugin/reload", headers=AUTH)
                if r.status_code != 200:
                    raise RuntimeError(r.text)
                if i in (50, 1050, 1650):
                    time.sleep(0.5)
                    marks[i] = _rss_mb(proc.pid)
    return [
        result(
            name,
            marks[1050] - marks[50],
            "MiB",
            rss_after_50=marks[50],
            rss_after_1050=marks[1050],
            tail_full_growth_mb=marks[1650] - marks[1050],
            target=10,
            server="xcore serve, every installed service, log level INFO",
        )
    ]


def reload_rss_growth() -> list[Result]:
    return _rss_growth("reload_rss_growth_mb", "", SMALL)


def reload_rss_growth_config() -> list[Result]:
    return _rss_growth("reload_rss_growth_config_mb", CONFIG_RUN, None)


def reload_rss_growth_posts() -> list[Result]:
    return _rss_growth("reload_rss_growth_posts_mb", CONFIG_RUN, posts_router())


BENCHMARKS = [
    ("reload_neighbour_p99_ms", reload_neighbour_p99),
    ("reload_neighbour_cpu_p99_ms", reload_neighbour_cpu_p99),
    ("reload_rss_growth_mb", reload_rss_growth),
    ("reload_rss_growth_config_mb", reload_rss_growth_config),
    ("reload_rss_growth_posts_mb", reload_rss_growth_posts),
]
