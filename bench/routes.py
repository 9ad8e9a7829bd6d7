"""Plugin route throughput through the kernel against the same route in bare FastAPI.

``route_rps``: two uvicorn subprocesses with the same settings serve ``GET
/app/bench/status``: one a kernel app with the router service and a plugin runtime
mounted the way the loader does it (``kernel.plugins.put`` + ``PluginLoaded``), the
other a bare FastAPI app including the same router. ``wrk`` hits them in alternating
pairs, the order flipped every pair (A B, B A, ...); the result is the median of the
pair ratios with their min and max (DESIGN.md "Targets": >= 0.95).

The load generator must not be what is measured. wrk is required (``apt-get install -y
wrk`` on Debian): a Python client saturates near 300 req/s and would make both sides
equal. Before the pairs, wrk is pointed with the same settings at a calibration server
(a raw asyncio protocol answering fixed bytes, no framework): if that does not reach
``CALIBRATION_HEADROOM`` times the fastest app measured, the generator (or the machine)
is the bottleneck and the benchmark refuses to report a ratio. It refuses too when wrk
itself (one thread) used more than ``WRK_BUSY_LIMIT`` of a core in any run, measured
from its CPU time.

    python -m bench.routes [--pairs 9] [--seconds 5]

This module is also the servers' app module: ``uvicorn bench.routes:kernel_app`` /
``bench.routes:bare_app`` (built on attribute access).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.common import Result, median, result

PATH = "/app/bench/status"
EXPECTED = {"status": "ok"}
CONNECTIONS = 32
ROOT = Path(__file__).resolve().parent.parent


# -- the two apps (built in the server processes) ------------------------------------------


def _plugin_router() -> Any:
    from fastapi import APIRouter

    router = APIRouter(prefix="/bench", tags=["bench"])

    @router.get("/status")
    async def status() -> dict[str, str]:
        return {"status": "ok"}

    return router


def _bare_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(_plugin_router(), prefix="/app")
    return app


async def mount_bench_plugin(kernel: Any) -> None:
    """Mount the benchmark's plugin route the way the loader does it (``PluginLoaded``)."""
    from kernel.runtime import PluginRuntime
    from services.loader.events import PluginLoaded
    from services.router.events import RoutesMounted

    kernel.plugins.put(
        PluginRuntime(
            name="bench",
            generation=1,
            version="1.0.0",
            mode="trusted",
            prefix="/app/bench",
            router=_plugin_router(),
        )
    )
    outcome = await kernel.request(
        PluginLoaded(
            name="bench",
            version="1.0.0",
            generation=1,
            mode="trusted",
            prefix="/app/bench",
            routes=[PATH],
            tasks=[],
            digest="bench",
            duration_ms=0.0,
        ),
        stream="plugin-bench",
        outcomes=[RoutesMounted, "RouteConflict"],
    )
    if outcome.type != RoutesMounted.type_name:
        raise RuntimeError(f"the bench plugin was not mounted: {outcome.data}")


def _kernel_app() -> Any:
    from fastapi import FastAPI

    from kernel import Kernel, Settings
    from services.router.service import RouterService

    data_dir = os.environ.get("XCORE_BENCH_DATA") or tempfile.mkdtemp(prefix="xcore-bench-")
    kernel = Kernel(
        Settings(data_dir=Path(data_dir), node="bench", reload=False),
        services=[RouterService()],
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with kernel.lifespan(app):
            await mount_bench_plugin(kernel)
            yield

    return FastAPI(lifespan=lifespan)


def __getattr__(name: str) -> Any:
    if name == "bare_app":
        return _bare_app()
    if name == "kernel_app":
        return _kernel_app()
    raise AttributeError(name)


# -- servers and load ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _server(app: str, data_dir: str) -> Iterator[str]:
    with serve_app(f"bench.routes:{app}", data_dir) as url:
        yield url


@contextlib.contextmanager
def serve_app(
    target: str, data_dir: str, *, start_timeout: float = 30, stop_timeout: float = 10
) -> Iterator[str]:
    """Run ``uvicorn target`` in a subprocess until it answers the benchmark route; its URL."""
    port = _free_port()
    env = {**os.environ, "XCORE_BENCH_DATA": data_dir, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{target} server exited with {proc.returncode}")
            try:
                response = httpx.get(url, timeout=1)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{target} server did not answer within {start_timeout:g} s"
                    ) from None
                time.sleep(0.1)
                continue
            if response.json() != EXPECTED:
                raise RuntimeError(f"{target} answered {response.status_code} {response.text!r}")
            break
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: wrk's share of one core above which it may be the bottleneck (it runs one thread).
WRK_BUSY_LIMIT = 0.85

#: wrk's CPU share (user + system time over wall time) in every run so far.
wrk_busy: list[float] = []


def _wrk(url: str, seconds: float) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wrk_busy.append(cpu / wall)
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests against {url}:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return float(found.group(1))


#: The calibration server must outrun the fastest app by this factor. The server is
#: Python too (one core), so this is a floor for wrk's reach, not its ceiling.
CALIBRATION_HEADROOM = 1.5

_CALIBRATION_BODY = b'{"status":"ok"}'
_CALIBRATION_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_CALIBRATION_BODY)).encode()
    + b"\r\n\r\n"
    + _CALIBRATION_BODY
)


class _Calibration(asyncio.Protocol):
    """Answers every request on a keep-alive connection with fixed bytes (no parsing)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        requests = self.buffer.count(b"\r\n\r\n")
        if requests:
            self.buffer = self.buffer.rsplit(b"\r\n\r\n", 1)[1]
            self.transport.write(_CALIBRATION_RESPONSE * requests)


def _serve_calibration(port: int) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Calibration, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


@contextlib.contextmanager
def _calibration_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.routes", "--calibration-server", str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the calibration server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def require_wrk() -> None:
    """Refuse to measure HTTP throughput without a load generator faster than the server."""
    if shutil.which("wrk") is None:
        raise RuntimeError(
            "wrk is not installed: the route benchmarks need it as their load generator "
            "(a Python client saturates near 300 req/s and would measure itself). "
            "Install it with `apt-get install -y wrk` (Debian) and run again."
        )


def calibrate(seconds: float = 3.0) -> float:
    """Requests/s wrk reaches against the calibration server (the generator's ceiling here)."""
    require_wrk()
    with _calibration_server() as url:
        _wrk(url, 1)
        return _wrk(url, seconds)


def route_rps(pairs: int | None = None, seconds: float = 5.0) -> list[Result]:
    if pairs is None:
        pairs = max(7, int(os.environ.get("XCORE_BENCH_PAIRS", "9")))
    require_wrk()
    load = _wrk
    generator = "wrk"
    ceiling = calibrate()
    first_app_run = len(wrk_busy)  # wrk may be busy against the calibration server: it should
    print(f"   calibration: wrk reaches {ceiling:,.0f} req/s against a bare asyncio server")
    with (
        tempfile.TemporaryDirectory(prefix="xcore-bench-routes-") as data_dir,
        _server("kernel_app", data_dir) as kernel_url,
        _server("bare_app", data_dir) as bare_url,
    ):
        load(kernel_url, 2)  # warm both up
        load(bare_url, 2)
        kernel_runs: list[float] = []
        bare_runs: list[float] = []
        ratios: list[float] = []
        for i in range(pairs):
            if i % 2 == 0:
                k = load(kernel_url, seconds)
                b = load(bare_url, seconds)
            else:
                b = load(bare_url, seconds)
                k = load(kernel_url, seconds)
            kernel_runs.append(k)
            bare_runs.append(b)
            ratios.append(k / b)
            print(f"   pair {i + 1}: kernel {k:,.0f} req/s, bare {b:,.0f} req/s, ratio {k / b:.3f}")
    busiest = max(wrk_busy[first_app_run:])
    fastest = max(kernel_runs + bare_runs)
    if busiest > WRK_BUSY_LIMIT or ceiling < CALIBRATION_HEADROOM * fastest:
        raise RuntimeError(
            f"the load generator may be the bottleneck: wrk used up to {busiest:.0%} of a core "
            f"(limit {WRK_BUSY_LIMIT:.0%}) and reached {ceiling:,.0f} req/s against the "
            f"calibration server ({CALIBRATION_HEADROOM:g}x the fastest app run, "
            f"{fastest:,.0f} req/s, is needed); no ratio reported"
        )
    ratio = median(ratios)
    extra = {
        "generator_ceiling_rps": ceiling,
        "wrk_cpu_share_max": busiest,
        "median_ratio": ratio,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": pairs,
        "seconds_per_run": seconds,
        "connections": CONNECTIONS,
        "load_generator": generator,
        "kernel_rps": kernel_runs,
        "bare_rps": bare_runs,
    }
    return [
        result(
            "route_rps", median(kernel_runs), "req/s", {"bare_fastapi": median(bare_runs)}, **extra
        ),
        result("route_rps_ratio", ratio, "x (median of pairs)", {}, **extra),
    ]


BENCHMARKS = [("route_rps", route_rps)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routes")
    parser.add_argument("--pairs", type=int, default=None, help="A/B pairs (default 9)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--calibration-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibration_server:
        _serve_calibration(args.calibration_server)
        return 0
    for r in route_rps(args.pairs, args.seconds):
        extra = r.get("extra", {})
        print(
            f"{r['name']}: {r['value']:.4g} {r['unit']} peers={r['peers']} "
            f"ratio median {extra['median_ratio']:.3f} "
            f"(min {extra['ratio_min']:.3f}, max {extra['ratio_max']:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
