"""Scheduler benchmarks: lateness with every run recorded, and 10,000 schedules at boot.

- ``scheduler_lateness_p50_ms`` / ``_p99_ms``: start minus due time of 20 schedules at
  10 Hz for 10 s, every run recorded in the SQLite log (synchronous=FULL), side by side
  with APScheduler 4 (memory store) on the same work, in alternating pairs (7 by
  default); the value is the median over pairs, the min-max is in ``extra``.
- ``scheduler_10k_boot_s`` / ``_rss_mb`` / ``_lateness_p99_ms``: a first process registers
  10,000 interval schedules (phases spread over 10 s) and exits; a fresh process boots on
  that log and registers them again (their next runs come from the log), then runs them
  for one full round. Boot = kernel start + registration; RSS = the process's max RSS.
  Runs found more than 1 s late are skipped by the misfire policy and reported as
  ``missed_runs`` in ``extra`` (none expected). The round is run in
  ``XCORE_BENCH_10K_TRIALS`` fresh pairs of processes (3 by default); the value is the
  median of their p99s, each trial's figures are in ``extra.trials``. Beside each round
  a canary per CPU samples the machine's own speed (bench/host_speed.py): a burst of
  runs whose way (from its timer, at most ``max_lead_ms`` ahead, to its last start)
  overlaps a window where every CPU ran slow is counted in
  ``bursts_in_slow_machine``, and ``p99_outside_slow_machine_ms`` is the p99 of the
  other bursts' runs (a diagnosis, not the value).

``XCORE_BENCH_PAIRS`` / ``XCORE_BENCH_SECONDS`` shorten the lateness runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import median, percentile, result
from bench.host_speed import WINDOW_S, HostWatch
from services.scheduler.config import SchedulerSettings

PAIRS = int(os.environ.get("XCORE_BENCH_PAIRS", "7"))
SECONDS = float(os.environ.get("XCORE_BENCH_SECONDS", "10"))
SCHEDULES = 20
WARMUP = 0.5


async def _xcore_trial(seconds: float) -> list[float]:
    from kernel import Kernel, Settings
    from kernel.sdk import current_task, task
    from services.scheduler.service import SchedulerService

    samples: list[float] = []
    t_end = time.time() + WARMUP + seconds

    async def work() -> None:
        now = time.time()
        due = current_task().scheduled_for.timestamp()
        if due < t_end:
            samples.append(now - due)

    with tempfile.TemporaryDirectory() as tmp:
        service = SchedulerService()
        settings = Settings(data_dir=Path(tmp), node="bench", synchronous="FULL")
        async with Kernel(settings, services=[service]):
            specs = []
            for i in range(SCHEDULES):
                fn: Any = task(name=f"s{i}", every=0.1)(work)
                specs.append(fn.__xcore_task__)
                del fn.__xcore_task__, fn.__xcore_tasks__
            await service.register("bench", specs)
            await asyncio.sleep(WARMUP + seconds + 0.2)
    return samples[SCHEDULES * int(WARMUP * 10) :]


async def _aps_trial(seconds: float) -> list[float]:
    from apscheduler import AsyncScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    _APS_SAMPLES.clear()
    samples = _APS_SAMPLES

    async with AsyncScheduler() as scheduler:
        for i in range(SCHEDULES):
            await scheduler.add_schedule(_aps_work, IntervalTrigger(seconds=0.1), id=f"s{i}")
        await scheduler.start_in_background()
        await asyncio.sleep(WARMUP + seconds)
    return list(samples[SCHEDULES * int(WARMUP * 10) :])


_APS_SAMPLES: list[float] = []


async def _aps_work() -> None:
    """APScheduler needs a module-level function (it stores a reference to it)."""
    from apscheduler import current_job

    now = time.time()
    fire = current_job.get().scheduled_fire_time
    assert fire is not None  # a scheduled job has one
    _APS_SAMPLES.append(now - fire.timestamp())


def lateness() -> list[dict[str, Any]]:
    p50s: list[tuple[float, float]] = []
    p99s: list[tuple[float, float]] = []
    for _ in range(PAIRS):
        ours = asyncio.run(_xcore_trial(SECONDS))
        theirs = asyncio.run(_aps_trial(SECONDS))
        p50s.append((percentile(ours, 50) * 1000, percentile(theirs, 50) * 1000))
        p99s.append((percentile(ours, 99) * 1000, percentile(theirs, 99) * 1000))
    out = []
    for name, pairs in (("scheduler_lateness_p50_ms", p50s), ("scheduler_lateness_p99_ms", p99s)):
        ratios = [a / b for a, b in pairs if b]
        out.append(
            result(
                name,
                median([a for a, _ in pairs]),
                "ms",
                {"apscheduler4": median([b for _, b in pairs])},
                pairs=len(pairs),
                xcore_min_max=[min(a for a, _ in pairs), max(a for a, _ in pairs)],
                peer_min_max=[min(b for _, b in pairs), max(b for _, b in pairs)],
                ratio_median=median(ratios) if ratios else None,
                ratio_min_max=[min(ratios), max(ratios)] if ratios else None,
            )
        )
    return out


# -- 10,000 schedules ----------------------------------------------------------------------

N_10K = 10_000
EVERY_10K = 30.0


def _specs_10k() -> list[Any]:
    from kernel.sdk import task

    async def work() -> None:
        from kernel.sdk import current_task

        due = current_task().scheduled_for.timestamp()
        _LATE.append((due, time.time() - due))

    specs = []
    for i in range(N_10K):
        # A run found late by more than 1 s is skipped (TaskMissed) and counted apart;
        # a grace of 0 would skip (and so hide) every run delayed by a loop stall.
        fn: Any = task(name=f"s{i}", every=EVERY_10K, misfire="skip", misfire_grace=1)(work)
        specs.append(fn.__xcore_task__)
        del fn.__xcore_task__, fn.__xcore_tasks__
    return specs


_LATE: list[tuple[float, float]] = []  # (due time, lateness) per run


async def _phase(data: str, phase: int) -> dict[str, Any]:
    from kernel import Kernel, Settings
    from services.scheduler.config import SchedulerSettings
    from services.scheduler.service import SchedulerService

    specs = _specs_10k()
    settings = Settings(data_dir=Path(data), node="bench", synchronous="FULL")
    manage = os.environ.get("XCORE_BENCH_MANAGE_GC", "1") == "1"
    service = SchedulerService(SchedulerSettings(manage_gc=manage))
    t0 = time.perf_counter()
    kernel = Kernel(settings, services=[service])
    if phase == 1:
        async with kernel:
            for b in range(100):  # 100 batches of 100, 0.1 s apart: phases spread over 10 s
                await service.register(f"p{b}", specs[b * 100 : (b + 1) * 100])
                await asyncio.sleep(0.1)
        return {}
    async with kernel:
        for b in range(100):
            await service.register(f"p{b}", specs[b * 100 : (b + 1) * 100])
        boot = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        scheduled = len(await kernel.read(types=["TaskScheduled"]))
        await asyncio.sleep(EVERY_10K + 2)
        missed = sum(r.data["count"] for r in await kernel.read(types=["TaskMissed"]))
    return {
        "boot_s": boot,
        "rss_mb": rss,
        "late": _LATE,
        "task_scheduled_events": scheduled,
        "missed_runs": missed,
    }


TRIALS_10K = int(os.environ.get("XCORE_BENCH_10K_TRIALS", "3"))
#: How far ahead of its instant a burst's way may begin (the ``max_lead_ms`` default).
WAY_10K = SchedulerSettings().max_lead_ms / 1000


def _ten_thousand_trial(manage_gc: bool) -> dict[str, Any]:
    env = {**os.environ, "XCORE_BENCH_MANAGE_GC": "1" if manage_gc else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "bench.scheduler", "--phase"]
        subprocess.run([*cmd, "1", tmp], check=True, stdout=subprocess.DEVNULL, env=env)
        # monotonic (the canaries' clock) to epoch (the runs' due times), read once
        offset = time.time() - time.monotonic()
        with HostWatch(Path(tmp)) as host:
            out = subprocess.run(
                [*cmd, "2", tmp], check=True, capture_output=True, text=True, env=env
            )
    data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    slow = [(k * WINDOW_S + offset, (k + 1) * WINDOW_S + offset) for k in sorted(host.slow)]
    data["host"] = {
        **_by_machine(data["late"], slow),
        "canary_realtime": host.realtime,
        "canary_problem": host.problem,
    }
    return data


def _by_machine(late: list[tuple[float, float]], slow: list[tuple[float, float]]) -> dict[str, Any]:
    """Split the runs by whether their burst's way met a window of a slow machine."""
    bursts: dict[float, list[float]] = {}
    for due, lateness in late:
        bursts.setdefault(round(due, 3), []).append(lateness)
    kept: list[float] = []
    touched_bursts = late_touched = late_bursts = 0
    for due, values in bursts.items():
        start, end = due - WAY_10K, due + max(values)
        whole = min(values) > 0.01  # the burst late as a whole
        late_bursts += whole
        if any(a < end and b > start for a, b in slow):
            touched_bursts += 1
            late_touched += whole
        else:
            kept.extend(values)
    return {
        "slow_machine_windows": len(slow),
        "bursts_in_slow_machine": touched_bursts,
        "late_bursts_in_slow_machine": late_touched,
        "late_bursts": late_bursts,
        "p99_outside_slow_machine_ms": percentile(kept, 99) * 1000,
    }


def _lateness_ms(trial: dict[str, Any], q: float = 99) -> float:
    """The q-th percentile of a trial's lateness, in ms."""
    return percentile([lateness for _, lateness in trial["late"]], q) * 1000


def ten_thousand() -> list[dict[str, Any]]:
    # the same process and log without the scheduler's GC policy, for comparison
    plain = _ten_thousand_trial(manage_gc=False)
    trials = [_ten_thousand_trial(manage_gc=True) for _ in range(max(1, TRIALS_10K))]
    first = trials[0]
    return [
        result("scheduler_10k_boot_s", median([t["boot_s"] for t in trials]), "s"),
        result("scheduler_10k_rss_mb", median([t["rss_mb"] for t in trials]), "MB"),
        result(
            "scheduler_10k_lateness_p99_ms",
            median([_lateness_ms(t) for t in trials]),
            "ms",
            runs=len(first["late"]),
            trials=[
                {
                    "p99_ms": _lateness_ms(t),
                    "p50_ms": _lateness_ms(t, 50),
                    "missed_runs": t["missed_runs"],
                    **t["host"],
                }
                for t in trials
            ],
            task_scheduled_events=first["task_scheduled_events"],
            without_gc_policy_p99_ms=_lateness_ms(plain),
            without_gc_policy_p50_ms=_lateness_ms(plain, 50),
            without_gc_policy_missed_runs=plain["missed_runs"],
            without_gc_policy_rss_mb=plain["rss_mb"],
            without_gc_policy_late_bursts=plain["host"]["late_bursts"],
            without_gc_policy_bursts_in_slow_machine=plain["host"]["bursts_in_slow_machine"],
        ),
    ]


# -- 1,000 schedules under HTTP load -------------------------------------------------------

N_LOADED = 1_000
LOAD_SECONDS = float(os.environ.get("XCORE_BENCH_LOAD_SECONDS", "20"))
_LOADED: list[tuple[float, float]] = []  # (due, lateness) in the server process


async def _loaded_work() -> None:
    from kernel.sdk import current_task

    now = time.time()
    due = current_task().scheduled_for.timestamp()
    _LOADED.append((due, now - due))


async def _aps_loaded_work() -> None:
    from apscheduler import current_job

    now = time.time()
    fire = current_job.get().scheduled_fire_time
    assert fire is not None  # a scheduled job has one
    due = fire.timestamp()
    _LOADED.append((due, now - due))


def _dump_loaded() -> None:
    out = os.environ.get("XCORE_BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(_LOADED))


def _xcore_loaded_app() -> Any:
    """A kernel serving the route benchmark's plugin route, with 1,000 schedules."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from bench.routes import mount_bench_plugin
    from kernel import Kernel, Settings
    from kernel.sdk import task
    from services.router.service import RouterService
    from services.scheduler.service import SchedulerService

    data_dir = os.environ.get("XCORE_BENCH_DATA") or tempfile.mkdtemp(prefix="xcore-bench-")
    scheduler = SchedulerService()
    kernel = Kernel(
        Settings(data_dir=Path(data_dir), node="bench", reload=False),
        services=[RouterService(), scheduler],
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        async with kernel.lifespan(app):
            await mount_bench_plugin(kernel)
            for b in range(10):  # phases spread over the second
                specs = []
                for i in range(b * 100, (b + 1) * 100):
                    fn: Any = task(name=f"s{i}", every=1.0)(_loaded_work)
                    specs.append(fn.__xcore_task__)
                    del fn.__xcore_task__, fn.__xcore_tasks__
                await scheduler.register(f"load{b}", specs)
                await asyncio.sleep(0.1)
            yield
        _dump_loaded()

    return FastAPI(lifespan=lifespan)


def _aps_loaded_app() -> Any:
    """Bare FastAPI with the same route, and APScheduler 4 with 1,000 schedules."""
    from contextlib import asynccontextmanager

    from apscheduler import AsyncScheduler
    from apscheduler.triggers.interval import IntervalTrigger
    from fastapi import FastAPI

    from bench.routes import _plugin_router

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        async with AsyncScheduler() as scheduler:
            for b in range(10):
                for i in range(b * 100, (b + 1) * 100):
                    await scheduler.add_schedule(
                        _aps_loaded_work, IntervalTrigger(seconds=1), id=f"s{i}"
                    )
                await asyncio.sleep(0.1)
            await scheduler.start_in_background()
            yield
        _dump_loaded()

    app = FastAPI(lifespan=lifespan)
    app.include_router(_plugin_router(), prefix="/app")
    return app


def __getattr__(name: str) -> Any:
    if name == "xcore_loaded_app":
        return _xcore_loaded_app()
    if name == "aps_loaded_app":
        return _aps_loaded_app()
    raise AttributeError(name)


@contextlib.contextmanager
def _server(app: str, data_dir: str) -> Iterator[str]:
    from bench.routes import serve_app

    with serve_app(f"bench.scheduler:{app}", data_dir, start_timeout=60, stop_timeout=30) as url:
        yield url


def _loaded_trial(app: str) -> tuple[list[float], float, int]:
    """(lateness of the runs due while wrk ran, requests/s) for one server."""
    import shutil

    from bench import routes

    if not shutil.which("wrk"):
        raise RuntimeError("wrk is needed for this benchmark (apt-get install -y wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "late.json"
        os.environ["XCORE_BENCH_OUT"] = str(out)
        try:
            with _server(app, tmp) as url:
                time.sleep(3)  # registrations done, heap settled
                t0 = time.time()
                rps = routes._wrk(url, LOAD_SECONDS)
                t1 = time.time()
                time.sleep(2)  # the runs due at the end of the load may still start
        finally:
            os.environ.pop("XCORE_BENCH_OUT", None)
        pairs = json.loads(out.read_text())
    # the runs due while the load ran (its first second is ramp-up); a run due then
    # that never started is not in `late`: `due_runs` says how many were due
    late = [lateness for due, lateness in pairs if t0 + 1 <= due <= t1]
    return late, rps, int((t1 - t0 - 1) * N_LOADED)


def under_load() -> list[dict[str, Any]]:
    ours, ours_rps, due_runs = _loaded_trial("xcore_loaded_app")
    theirs, theirs_rps, _ = _loaded_trial("aps_loaded_app")
    nan = float("nan")
    p99 = percentile(ours, 99) * 1000 if ours else nan
    peer = percentile(theirs, 99) * 1000 if theirs else nan
    return [
        result(
            "scheduler_1k_under_load_lateness_p99_ms",
            p99,
            "ms",
            {"apscheduler4": peer},
            ratio=p99 / peer if peer and peer == peer else None,
            due_runs=due_runs,
            runs=len(ours),
            peer_runs=len(theirs),
            p50_ms=percentile(ours, 50) * 1000 if ours else None,
            peer_p50_ms=percentile(theirs, 50) * 1000 if theirs else None,
            http_rps=ours_rps,
            peer_http_rps=theirs_rps,
            load=f"wrk -t1 -c{routes_connections()} {LOAD_SECONDS:g}s on the route benchmark's route",
        )
    ]


def routes_connections() -> int:
    from bench.routes import CONNECTIONS

    return CONNECTIONS


BENCHMARKS = [
    ("scheduler_lateness", lateness),
    ("scheduler_10k", ten_thousand),
    ("scheduler_1k_under_load", under_load),
]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        res = asyncio.run(_phase(sys.argv[3], int(sys.argv[2])))
        print(json.dumps(res))
    else:
        for _, fn in BENCHMARKS:
            for r in fn():
                print(r)
