"""/metrics parses with prometheus-client's parser and its counters survive a restart."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi import APIRouter
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler.events import TaskFailed, TaskStarted, TaskSucceeded
from tests.services.monitor.conftest import AUTH, monitored

pytestmark = pytest.mark.anyio


def _router() -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/items/{item}")
    async def item(item: int) -> dict[str, int]:
        return {"item": item}

    return router


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _record_runs(kernel, task: str, ok: int, failed: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(ok + failed):
        run = f"run-{task}-{i}-{time.monotonic_ns()}"
        await kernel.append(
            TaskStarted(task=task, run_id=run, scheduled_for=time.time() - 0.25),
            stream=f"task-{task}",
        )
        if i < ok:
            await kernel.append(
                TaskSucceeded(task=task, run_id=run, attempt=1, duration_ms=12.0),
                stream=f"task-{task}",
            )
        else:
            await kernel.append(
                TaskFailed(task=task, run_id=run, attempt=1, error="boom", duration_ms=3.0),
                stream=f"task-{task}",
            )


WATCHED = [
    (
        "xcore_task_runs_total",
        (("outcome", "succeeded"), ("plugin", "shop"), ("task", "shop.sync")),
    ),
    ("xcore_task_runs_total", (("outcome", "failed"), ("plugin", "shop"), ("task", "shop.sync"))),
    ("xcore_task_run_duration_seconds_count", (("plugin", "shop"), ("task", "shop.sync"))),
    ("xcore_task_lateness_seconds_count", (("plugin", "shop"), ("task", "shop.sync"))),
    (
        "xcore_http_requests_total",
        (
            ("method", "GET"),
            ("plugin", "shop"),
            ("route", "/api/items/{item}"),
            ("status_class", "2xx"),
        ),
    ),
    (
        "xcore_http_requests_total",
        (
            ("method", "GET"),
            ("plugin", "shop"),
            ("route", "/api/items/{item}"),
            ("status_class", "4xx"),
        ),
    ),
    ("xcore_http_request_duration_seconds_count", (("plugin", "shop"),)),
    ("xcore_plugin_loads_total", (("plugin", "shop"),)),
    ("xcore_events_appended_total", (("type", "TaskStarted"),)),
    ("xcore_event_append_duration_seconds_count", ()),
]


async def test_metrics_parse_and_counters_continue_after_a_restart(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        await m.load("shop", _router(), "/app")
        for i in range(7):
            assert (await m.client.get(f"/app/api/items/{i}")).status_code == 200
        assert (await m.client.get("/app/api/items/nope")).status_code == 422
        await _record_runs(m.kernel, "shop.sync", ok=4, failed=2)
        await m.kernel.settle()
        r = await m.client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        before = _samples(r.text)
        stats = (await m.client.get("/admin/stats", headers=AUTH)).json()
    assert before[WATCHED[0]] == 4 and before[WATCHED[1]] == 2
    assert before[WATCHED[4]] == 7 and before[WATCHED[5]] == 1
    assert before[WATCHED[3]] == 6
    assert stats["tasks"]["shop.sync"]["outcomes"] == {"succeeded": 4, "failed": 2}
    assert stats["http"]["shop"]["requests"] == 8
    every_family = {name for name, _ in before}
    # the Grafana dashboard uses only series /metrics declares
    declared = set(re.findall(r"^# TYPE (\w+) ", r.text, re.M))
    dashboard = (Path(__file__).parents[3] / "docs" / "grafana-dashboard.json").read_text()
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"xcore_\w+", dashboard)}
    used -= {"xcore_overview"}
    assert used and used <= declared, used - declared
    for name in (
        "xcore_uptime_seconds",
        "xcore_log_position",
        "xcore_subscriber_lag_events",
        "xcore_projection_lag_events",
        "xcore_log_lines_stored",
    ):
        assert name in every_family, name

    # a new process on the same data: the same counts, and they keep counting from there
    async with monitored(tmp_path) as m:
        after = _samples((await m.client.get("/metrics")).text)
        for key in WATCHED:
            if key[0] == "xcore_events_appended_total":
                assert after[key] == before[key]  # no TaskStarted since
            else:
                assert after[key] >= before[key], key
            if key[0].startswith(("xcore_task", "xcore_http")):
                assert after[key] == before[key], key
        await m.load("shop", _router(), "/app")
        assert (await m.client.get("/app/api/items/1")).status_code == 200
        again = _samples((await m.client.get("/metrics")).text)
        assert again[WATCHED[4]] == before[WATCHED[4]] + 1
