"""The admin page in Debian's Chromium (issue 15): first event shown, memory while following.

- ``ui_first_event_ms``: from navigating to the event view (logged in) to the first row
  of the live table on screen; the median of several loads.
- ``ui_heap_after_100k_events_mb`` (peer ``before``): the page's JavaScript heap after
  the live table followed 100,000 new events, beside the same figure before them
  (garbage collected before each reading). ``ui_dom_nodes_after_100k_events`` beside
  the count before: the table keeps ``services.ui.max_rows`` rows, so both stay bounded.

A plugin of the benchmark's own appends the events through the plugin SDK, in chunks,
while the page follows them; a real ``xcore serve`` serves both.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Result, median, result

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-ui-admin-token-0123456789abcdef"
EVENTS = int(os.environ.get("XCORE_BENCH_UI_EVENTS", "100000"))
LOADS = int(os.environ.get("XCORE_BENCH_PAIRS", "7"))
CHUNK = 5000

FLOOD_RUN = """
import asyncio
from kernel import Event

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/flood"}
CTX = {}


class Flooded(Event):
    i: int


def on_load(ctx):
    CTX["ctx"] = ctx
"""
FLOOD_ROUTER = """
import asyncio
from fastapi import APIRouter
from . import run

router = APIRouter()


@router.post("/emit")
async def emit(n: int, start: int = 0) -> dict:
    ctx = run.CTX["ctx"]
    for base in range(start, start + n, 100):
        await asyncio.gather(
            *(ctx.append(run.Flooded(i=i)) for i in range(base, min(base + 100, start + n)))
        )
    return {"emitted": n}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    plugins = tmp / "plugins"
    shutil.copytree(ROOT / "plugins" / "hello", plugins / "hello")
    flood = plugins / "flood"
    flood.mkdir()
    (flood / "__init__.py").write_text("")
    (flood / "run.py").write_text(FLOOD_RUN)
    (flood / "router.py").write_text(FLOOD_ROUTER)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
    env.update(XCORE_ADMIN_TOKEN=TOKEN, XCORE_SYNCHRONOUS="NORMAL")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kernel.cli", "serve", "--port", str(port), "--no-reload"),
            *("--data-dir", str(tmp / "var"), "--plugins-dir", str(plugins)),
        ],
        cwd=tmp,
        env=env,
        stdout=(tmp / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/app/flood/emit", timeout=1).status_code in (405, 422):
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("xcore serve did not start:\n" + (tmp / "serve.log").read_text())
        time.sleep(0.1)


def _metrics(cdp: Any) -> dict[str, float]:
    cdp.send("HeapProfiler.collectGarbage")
    found = cdp.send("Performance.getMetrics")["metrics"]
    return {m["name"]: m["value"] for m in found}


def bench_ui() -> list[Result]:
    from playwright.sync_api import sync_playwright

    from tests.e2e.browser import CHROMIUM_ARGS

    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("Chromium is not installed: apt-get install -y chromium")
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-ui-"))
    proc, url = _serve(tmp)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            context = browser.new_context()
            page = context.new_page()
            page.goto(url + "/admin/ui/")
            page.get_by_label("Admin token").fill(TOKEN)
            page.get_by_role("button", name="Log in").click()
            page.get_by_role("heading", name="Plugins").wait_for(timeout=30_000)

            loads = []
            for _ in range(LOADS):
                page.goto("about:blank")
                t0 = time.perf_counter()
                page.goto(url + "/admin/ui/#events")
                page.locator("#events-body tr").first.wait_for(timeout=30_000)
                loads.append((time.perf_counter() - t0) * 1000)

            cdp = context.new_cdp_session(page)
            cdp.send("Performance.enable")
            before = _metrics(cdp)
            last = int(page.locator("#events-body tr").first.get_attribute("data-position") or 0)
            t0 = time.perf_counter()
            with httpx.Client(base_url=url, timeout=600) as client:
                for start in range(0, EVENTS, CHUNK):
                    r = client.post(
                        "/app/flood/emit", params={"n": min(CHUNK, EVENTS - start), "start": start}
                    )
                    r.raise_for_status()
            appended = time.perf_counter() - t0
            target = last + EVENTS
            page.wait_for_function(
                "([p]) => Number(document.querySelector('#events-body tr')?.dataset.position) >= p",
                arg=[target],
                timeout=600_000,
                polling=500,
            )
            followed = time.perf_counter() - t0
            after = _metrics(cdp)
            rows = page.locator("#events-body tr").count()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    mb = 1024 * 1024
    return [
        result(
            "ui_first_event_ms",
            median(loads),
            "ms (navigation to the first live row, logged in)",
            min=min(loads),
            max=max(loads),
            loads=len(loads),
        ),
        result(
            "ui_heap_after_100k_events_mb",
            after["JSHeapUsedSize"] / mb,
            "MB of JS heap after following the events",
            {"before": before["JSHeapUsedSize"] / mb},
            events=EVENTS,
            seconds_to_append=appended,
            seconds_until_shown=followed,
            rows_kept=rows,
        ),
        result(
            "ui_dom_nodes_after_100k_events",
            after["Nodes"],
            "DOM nodes",
            {"before": before["Nodes"]},
            events=EVENTS,
        ),
    ]


BENCHMARKS = [("ui", bench_ui)]
