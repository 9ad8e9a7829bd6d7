"""Plugin benchmarks: hot-reload latency over HTTP, boot with 50 plugins, memory after boot.

- ``reload_latency_p50_ms`` / ``_p99_ms``: ``router.py`` of a plugin is rewritten, and the
  clock stops when the new code answers over HTTP — watcher debounce, import, hooks, mount
  and swap included. The server is a real ``xcore serve`` subprocess; this process polls.
- ``boot_50_plugins_s``: a fresh process starts a kernel (SQLite log, FULL sync) with the
  admin, router and loader services and 50 trusted plugins in the plugins directory;
  measured from ``kernel.start()`` to its return (every plugin validated, imported,
  mounted, recorded). Median of 7 fresh processes.
- ``rss_after_boot_mb``: resident memory of that process after boot (median).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Result, percentile, result

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-plugins-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_plugin(plugins: Path, name: str, version: int = 0) -> None:
    folder = plugins / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text(
        f"PLUGIN_INFO = {{'version': '1.0.0', 'Api_prefix': '/app/{name}'}}\n"
        "def on_load(ctx):\n    pass\n"
    )
    (folder / "router.py").write_text(_router(version))
    (folder / "config.yaml").write_text("{}\n")


def _router(version: int) -> str:
    return textwrap.dedent(
        f"""
        from fastapi import APIRouter
        router = APIRouter()

        @router.get("/status")
        async def status():
            return {{"v": {version}}}
        """
    )


def reload_latency(edits: int = 40) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plugins = base / "plugins"
        _write_plugin(plugins, "bench")
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
        env["XCORE_ADMIN_TOKEN"] = TOKEN
        env["XCORE_LOG_LEVEL"] = "WARNING"
        log = (base / "serve.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kernel.cli",
                "serve",
                "--port",
                str(port),
                "--plugins-dir",
                str(plugins),
                "--data-dir",
                str(base / "var"),
            ],
            cwd=base,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/app/bench/status"
        latencies: list[float] = []
        try:
            with httpx.Client(timeout=5) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if client.get(url).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError((base / "serve.log").read_text())
                    time.sleep(0.05)
                time.sleep(0.5)  # let the watcher settle
                for i in range(1, edits + 1):
                    start = time.perf_counter()
                    (plugins / "bench" / "router.py").write_text(_router(i))
                    while True:
                        if client.get(url).json().get("v") == i:
                            break
                        if time.perf_counter() - start > 10:
                            raise RuntimeError(f"edit {i} not served after 10s")
                        time.sleep(0.002)
                    latencies.append((time.perf_counter() - start) * 1000)
                    time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()
    return [
        result(
            "reload_latency_p50_ms",
            percentile(latencies, 50),
            "ms",
            target=300,
            edits=edits,
            min=min(latencies),
            max=max(latencies),
        ),
        result("reload_latency_p99_ms", percentile(latencies, 99), "ms", edits=edits),
    ]


BOOT_SCRIPT = """
import asyncio, json, sys, time
from pathlib import Path
from kernel import Kernel, Settings
from services.admin.service import AdminService
from services.loader.service import LoaderService
from services.router.service import RouterService

async def main():
    base = Path(sys.argv[1])
    settings = Settings(data_dir=base / "var", plugins_dir=base / "plugins", reload=False,
                        admin_token="bench-plugins-token-0123456789", log_level="WARNING")
    loader = LoaderService()
    kernel = Kernel(settings, services=[AdminService(), RouterService(), loader])
    start = time.perf_counter()
    await kernel.start()
    boot = time.perf_counter() - start
    loaded = len(loader.loader.loaded)
    rss = 0.0
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    await kernel.stop()
    print(json.dumps({"boot": boot, "loaded": loaded, "rss": rss}))

asyncio.run(main())
"""


def boot_50(runs: int = 7) -> list[Result]:
    boots: list[float] = []
    rss: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            for i in range(50):
                _write_plugin(base / "plugins", f"p{i:02d}")
            out = subprocess.run(
                [sys.executable, "-c", BOOT_SCRIPT, str(base)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"boot run failed:\n{out.stderr}")
            data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            if data["loaded"] != 50:
                raise RuntimeError(f"only {data['loaded']} of 50 plugins loaded:\n{out.stderr}")
            boots.append(data["boot"])
            rss.append(data["rss"])
    return [
        result(
            "boot_50_plugins_s",
            statistics.median(boots),
            "s",
            target=0.3,
            runs=runs,
            min=min(boots),
            max=max(boots),
        ),
        result("rss_after_boot_mb", statistics.median(rss), "MiB", runs=runs),
    ]


BENCHMARKS = [("reload_latency", reload_latency), ("boot_50_plugins", boot_50)]

if __name__ == "__main__":
    for _, fn in BENCHMARKS:
        for r in fn():
            print(r)
