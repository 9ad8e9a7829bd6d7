"""Monitoring costs: observed plugin route throughput, a /metrics scrape, a log query.

``route_rps_observed`` (peer ``unobserved``): two uvicorn subprocesses serve the same
plugin route ``GET /app/bench/status``: one with request ids, per-route metrics and
log capture on (the monitor, admin and router services, logging configured), the
other with all of them off (router only, ``services.router.observe: false``). wrk
drives them in alternating pairs, the order flipped every pair; the result is the
median of the pair ratios (goal >= 0.9) with min and max.

``metrics_scrape_ms``: ``GET /metrics`` (in process, through the ASGI app) with 50
plugins x 4 routes of request numbers and 500 tasks with runs in the log.

``logs_query_ms``: queries of ``/admin/logs`` shape over a store of 1,000,000 lines
(50 plugins, 1% errors): by plugin (the headline), by level, by run id, a deep cursor
page, and a case-insensitive text search (a full scan: the slow case, reported apart).

    python -m bench.monitor [--pairs 7] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from bench.common import Result, median, percentile, result
from bench.routes import _wrk, mount_bench_plugin, serve_app

PLUGINS = 50
TASKS = 500
LINES = 1_000_000


# -- the two apps (built in the server processes) ------------------------------------------


def _app(observed: bool) -> Any:
    from fastapi import FastAPI

    from kernel import Kernel, Settings
    from kernel.logging import configure_logging
    from services.router.service import RouterService

    data_dir = Path(os.environ.get("XCORE_BENCH_DATA") or tempfile.mkdtemp(prefix="xcore-bench-"))
    services: list[Any] = [RouterService()]
    if observed:
        from services.admin.service import AdminService
        from services.monitor.service import MonitorService

        services += [MonitorService(), AdminService()]
        configure_logging("INFO", "text")
    kernel = Kernel(
        Settings(
            data_dir=data_dir,
            node="bench",
            reload=False,
            admin_token="bench-admin-token-0123456789",
            services={"router": {"observe": observed}},
        ),
        services=services,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with kernel.lifespan(app):
            await mount_bench_plugin(kernel)
            yield

    return FastAPI(lifespan=lifespan)


def __getattr__(name: str) -> Any:
    if name == "observed_app":
        return _app(True)
    if name == "unobserved_app":
        return _app(False)
    raise AttributeError(name)


@contextlib.contextmanager
def _server(app: str) -> Iterator[str]:
    data_dir = tempfile.mkdtemp(prefix=f"xcore-bench-{app}-")
    with serve_app(f"bench.monitor:{app}", data_dir, start_timeout=60) as url:
        if app == "observed_app" and "x-request-id" not in httpx.get(url, timeout=5).headers:
            raise RuntimeError("the observed server does not set request ids")
        yield url


def route_rps_observed(pairs: int | None = None, seconds: float = 5.0) -> list[Result]:
    if pairs is None:
        pairs = max(7, int(os.environ.get("XCORE_BENCH_PAIRS", "7")))
    with _server("observed_app") as observed, _server("unobserved_app") as unobserved:
        _wrk(observed, 2)
        _wrk(unobserved, 2)
        obs: list[float] = []
        raw: list[float] = []
        ratios: list[float] = []
        for i in range(pairs):
            if i % 2 == 0:
                o, u = _wrk(observed, seconds), _wrk(unobserved, seconds)
            else:
                u = _wrk(unobserved, seconds)
                o = _wrk(observed, seconds)
            obs.append(o)
            raw.append(u)
            ratios.append(o / u)
            print(
                f"   pair {i + 1}: observed {o:,.0f} req/s, unobserved {u:,.0f}, ratio {o / u:.3f}"
            )
    return [
        result(
            "route_rps_observed",
            median(obs),
            "req/s",
            {"unobserved": median(raw)},
            median_ratio=median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
            pairs=pairs,
            seconds_per_run=seconds,
            load_generator="wrk",
            observed_rps=obs,
            unobserved_rps=raw,
        )
    ]


# -- /metrics scrape -------------------------------------------------------------------------


async def metrics_scrape_ms(scrapes: int = 60) -> list[Result]:
    from kernel import Kernel, Settings, create_app
    from services.loader.events import PluginLoaded
    from services.monitor.service import MonitorService
    from services.router.stats import RouteStats
    from services.scheduler.events import TaskFailed, TaskStarted, TaskSucceeded

    with tempfile.TemporaryDirectory(prefix="xcore-bench-metrics-") as data_dir:
        kernel = Kernel(
            Settings(data_dir=Path(data_dir), node="bench", reload=False),
            services=[MonitorService()],
        )
        app = create_app(kernel)
        async with kernel.lifespan(app):
            for p in range(PLUGINS):
                name = f"plugin{p:02d}"
                await kernel.append(
                    PluginLoaded(
                        name=name, version="1.0.0", generation=1, mode="trusted",
                        prefix=f"/app/{name}", routes=[], tasks=[], digest="d", duration_ms=1.0,
                    ),
                    stream=f"plugin-{name}",
                )  # fmt: skip
            now = time.time()
            for t in range(TASKS):
                task = f"plugin{t % PLUGINS:02d}.task{t:03d}"
                batch: list[Any] = []
                for run in range(4):
                    rid = f"{t}-{run}"
                    batch.append(TaskStarted(task=task, run_id=rid, scheduled_for=now - 0.01))
                    if run == 3:
                        batch.append(TaskFailed(task=task, run_id=rid, attempt=1, error="x"))
                    else:
                        batch.append(TaskSucceeded(task=task, run_id=rid, attempt=1, duration_ms=5))
                await kernel.append(batch, stream=f"task-{task}")
            stats = RouteStats()
            for p in range(PLUGINS):
                ps = stats.plugin(f"plugin{p:02d}")
                for route in range(4):
                    for status in (200, 201, 404, 500):
                        ps.observe(status, 0.003 * (route + 1), "GET", f"/r{route}/{{id}}")
            # the router's numbers, as the monitor finds them on a running router service
            kernel.services["router"] = SimpleNamespace(stats=stats)  # type: ignore[assignment]
            await kernel.settle()
            transport = httpx.ASGITransport(app=app)
            times: list[float] = []
            size = 0
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                for _ in range(5):
                    await client.get("/metrics")
                for _ in range(scrapes):
                    start = time.perf_counter()
                    r = await client.get("/metrics")
                    times.append((time.perf_counter() - start) * 1000)
                    size = len(r.content)
            events = await kernel.store.last_position()
    return [
        result(
            "metrics_scrape_ms",
            median(times),
            "ms",
            {},
            p99_ms=percentile(times, 99),
            plugins=PLUGINS,
            tasks=TASKS,
            events_in_log=events,
            bytes=size,
            scrapes=scrapes,
        )
    ]


# -- log queries -------------------------------------------------------------------------------


async def logs_query_ms(repeat: int = 15) -> list[Result]:
    from services.monitor.logstore import LogQuery, LogStore
    from services.monitor.settings import LogSettings

    with tempfile.TemporaryDirectory(prefix="xcore-bench-logs-") as data_dir:
        store = LogStore(Path(data_dir) / "logs.db", LogSettings(max_lines=LINES, max_age=1e9))
        store.open()
        start = time.perf_counter()
        now = time.time()
        chunk = 50_000
        for base in range(0, LINES, chunk):
            batch = []
            for i in range(base, base + chunk):
                error = i % 100 == 0
                plugin = f"plugin{i % PLUGINS:02d}"
                batch.append(
                    {
                        "ts": now - (LINES - i) * 0.01,
                        "level": "ERROR" if error else "INFO",
                        "levelno": 40 if error else 20,
                        "logger": f"xcore.plugin.{plugin}",
                        "plugin": plugin,
                        "task": f"{plugin}.sync",
                        "run_id": f"run{i // 10}",
                        "request_id": None,
                        "message": f"processed order {i} for customer {i % 977}",
                        "extra": {},
                        "exc": None,
                    }
                )
            store._write_batch(batch)
        fill_s = time.perf_counter() - start
        assert store.count == LINES, store.count
        cases: dict[str, tuple[LogQuery, dict[str, Any]]] = {
            "plugin": (LogQuery(plugin="plugin07"), {}),
            "newest": (LogQuery(), {}),
            "level_error": (LogQuery(level="ERROR"), {}),
            "run_id": (LogQuery(run_id="run54321"), {}),
            "plugin_deep_page": (LogQuery(plugin="plugin07"), {"before": LINES // 2}),
            "text_search_full_scan": (LogQuery(q="CUSTOMER 976"), {}),
        }
        out: dict[str, float] = {}
        for name, (query, kwargs) in cases.items():
            times = []
            for _ in range(repeat if "scan" not in name else 3):
                t0 = time.perf_counter()
                lines, _ = await store.query(query, limit=100, **kwargs)
                times.append((time.perf_counter() - t0) * 1000)
                assert lines, name
            out[name] = median(times)
        store.close()
    return [
        result(
            "logs_query_ms",
            out["plugin"],
            "ms (page of 100 by plugin)",
            {},
            lines=LINES,
            fill_s=fill_s,
            **{f"{k}_ms": v for k, v in out.items()},
        )
    ]


BENCHMARKS = [
    ("route_rps_observed", route_rps_observed),
    ("metrics_scrape_ms", metrics_scrape_ms),
    ("logs_query_ms", logs_query_ms),
]


def main() -> int:
    import asyncio

    parser = argparse.ArgumentParser(prog="python -m bench.monitor")
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    for r in [
        *asyncio.run(metrics_scrape_ms()),
        *asyncio.run(logs_query_ms()),
        *route_rps_observed(args.pairs, args.seconds),
    ]:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
