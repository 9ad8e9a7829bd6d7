"""Sandbox benchmarks: a call's round trip, a sandboxed route's throughput, a worker's start and size.

- ``sandbox_call_p50_us`` / ``sandbox_call_p99_us``: a no-op call into a sandboxed
  plugin's worker (the supervisor's ``call``: one frame out, one frame back, through the
  event loops of both processes), beside ``raw_pipe``: the same bytes (a no-op frame
  out, a result frame back, of the sizes the sandbox sends) over two pipes between two
  Python processes that each run an asyncio loop as the kernel and the worker do: the
  parent writes and awaits a future, the child reads in its loop's readable callback
  and answers there. It does no framing, no decoding and no bookkeeping: the floor of
  any IPC between two asyncio processes. Measured in the same run, in alternating
  batches (DESIGN.md "Targets": p50 <= 1.5x).
  For reference the record also has ``blocking_child_pipe_p50_us`` (the child blocking
  in ``read`` instead of on a loop) and ``blocking_pipe_p50_us`` (both sides blocking:
  the pipe alone, which an event-loop kernel cannot use), and the CPU time both
  processes spend per call (``cpu_us_per_call``: kernel + worker, or parent + child),
  which a loaded machine disturbs less than the latency.
- ``sandbox_route_rps``: ``GET /app/bench/status`` served by two ``xcore serve``
  processes, the same plugin trusted in one and sandboxed in the other, loaded by wrk in
  alternating pairs (target >= 0.6x). The record also has the CPU time the server's
  processes (kernel and worker) spent per request, and its ratio (trusted over
  sandboxed): the throughput ratio a quiet machine would show when CPU-bound.
- ``sandbox_start_ms``: a worker's start to ready (interpreter, FastAPI, the plugin's
  import), median over reloads; ``sandbox_worker_rss_mb``: its RSS once ready.

    python -m bench.sandbox [--pairs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Result, median, percentile, result

ROOT = Path(__file__).resolve().parent.parent
CALLS = 2000
CONNECTIONS = 32


def _plugin(folder: Path, mode: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text(
        f"PLUGIN_INFO = {{'version': '1.0.0', 'api_prefix': '/app/bench', 'mode': {mode!r}}}\n"
    )
    (folder / "router.py").write_text(
        textwrap.dedent(
            """
            from fastapi import APIRouter
            router = APIRouter()

            @router.get("/status")
            async def status():
                return {"status": "ok"}
            """
        )
    )


#: A child that reads a request of ``argv[1]`` bytes and answers ``argv[2]`` bytes,
#: blocking in ``read`` (a reference: the sandbox's worker runs an event loop).
ECHO = """
import os, sys
ask, answer = int(sys.argv[1]), int(sys.argv[2])
reply = bytes(answer)
while True:
    got = 0
    while got < ask:
        d = os.read(0, ask - got)
        if not d:
            raise SystemExit(0)
        got += len(d)
    os.write(1, reply)
"""


#: The child of the raw pipe peer, on an asyncio loop as a worker is: reads in a
#: readable callback and answers in it.
ECHO_ASYNCIO = """
import asyncio, os, sys
ask, answer = int(sys.argv[1]), int(sys.argv[2])
reply = bytes(answer)

async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    got = 0
    os.set_blocking(0, False)

    def readable():
        nonlocal got
        data = os.read(0, 65536)
        if not data:
            if not done.done():
                done.set_result(None)
            return
        got += len(data)
        while got >= ask:
            got -= ask
            os.write(1, reply)

    loop.add_reader(0, readable)
    await done

asyncio.run(main())
"""


def _frame_sizes() -> tuple[int, int]:
    """Bytes of a no-op call's frame and of its answer, as the sandbox sends them."""
    from services.sandbox.protocol import encode

    ask = encode({"op": "noop", "id": 12345})
    answer = encode({"op": "result", "id": 12345, "ok": True})
    return len(ask), len(answer)


class RawPipe:
    """The peer: a round trip over two pipes to a child that answers at once, the
    parent's side on its asyncio loop like the kernel's (one write, the loop woken by the
    answer), the child on an asyncio loop like a worker (``ECHO_ASYNCIO``; ``ECHO``: a
    child blocking in ``read``)."""

    def __init__(self, child: str = ECHO_ASYNCIO) -> None:
        self.ask, self.answer = _frame_sizes()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", child, str(self.ask), str(self.answer)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w, self.r = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.r, False)
        self.message = bytes(self.ask)
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[None] | None = None
        self.got = 0
        self.loop.add_reader(self.r, self._readable)

    def _readable(self) -> None:
        self.got += len(os.read(self.r, 65536))
        if self.got >= self.answer and self.waiter is not None and not self.waiter.done():
            self.got -= self.answer
            self.waiter.set_result(None)

    async def batch(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.waiter = self.loop.create_future()
            os.write(self.w, self.message)
            await self.waiter
            out.append((time.perf_counter() - t0) * 1e6)
        return out

    def close(self) -> None:
        self.loop.remove_reader(self.r)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


def _blocking_pipe(n: int) -> list[float]:
    """The same round trip with both sides blocking (a reference, not the peer)."""
    ask, answer = _frame_sizes()
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO, str(ask), str(answer)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    w, r = proc.stdin.fileno(), proc.stdout.fileno()
    message = bytes(ask)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(w, message)
            got = 0
            while got < answer:
                got += len(os.read(r, 65536))
            out.append((time.perf_counter() - t0) * 1e6)
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()
    return out


async def _sandbox_calls(pairs: int) -> list[Result]:
    from kernel import Kernel, Settings
    from services.loader.events import PluginReloaded, PluginReloadFailed, PluginReloadRequested
    from services.loader.service import LoaderService
    from services.sandbox.service import SandboxService

    base = Path(tempfile.mkdtemp(prefix="xcore-bench-sandbox-"))
    base.chmod(0o755)  # noqa: ASYNC240 - set-up, before anything is measured
    try:
        _plugin(base / "plugins" / "bench", "sandboxed")
        service = SandboxService()
        settings = Settings(
            data_dir=base / "var", plugins_dir=base / "plugins", store="memory", reload=False
        )
        async with Kernel(settings, services=[service, LoaderService()]) as kernel:
            starts = []
            for _ in range(5):
                outcome = await kernel.request(
                    PluginReloadRequested(name="bench", reason="bench"),
                    stream="plugin-bench",
                    outcomes=[PluginReloaded, PluginReloadFailed],
                )
                if outcome.type != PluginReloaded.type_name:
                    raise RuntimeError(f"the bench plugin did not load: {outcome.data}")
                await asyncio.sleep(0.5)
                plugin = max(
                    (p for (n, _), p in service.plugins.items() if n == "bench"),
                    key=lambda p: p.generation,
                )
                assert plugin.worker is not None
                starts.append(plugin.worker.start_ms)
            await asyncio.sleep(1.2)  # one RSS sample after start
            worker = plugin.worker
            assert worker is not None
            rss_mb = worker.rss / 2**20
            worker_pid = worker.pid
            sandbox: list[float] = []
            raw: list[float] = []
            blocking_child: list[float] = []
            ratios = []
            cpu: dict[str, list[float]] = {"sandbox": [], "raw_pipe": []}
            peer = RawPipe(ECHO_ASYNCIO)
            reference = RawPipe(ECHO)
            try:
                for _ in range(200):  # warm both paths
                    await plugin.call({"op": "noop"}, kind="noop")
                await peer.batch(200)
                for i in range(pairs):
                    k0, w0 = time.process_time(), _tree_cpu(worker_pid)
                    batch = []
                    for _ in range(CALLS):
                        t0 = time.perf_counter()
                        await plugin.call({"op": "noop"}, kind="noop")
                        batch.append((time.perf_counter() - t0) * 1e6)
                    k1, w1 = time.process_time(), _tree_cpu(worker_pid)
                    c1 = _tree_cpu(peer.proc.pid)
                    k2 = time.process_time()
                    pipe = await peer.batch(CALLS)
                    k3, c3 = time.process_time(), _tree_cpu(peer.proc.pid)
                    cpu["sandbox"].append(((k1 - k0) + (w1 - w0)) / CALLS * 1e6)
                    cpu["raw_pipe"].append(((k3 - k2) + (c3 - c1)) / CALLS * 1e6)
                    blocking_child += await reference.batch(CALLS)
                    sandbox += batch
                    raw += pipe
                    ratios.append(median(batch) / median(pipe))
                    print(
                        f"   batch {i + 1}: sandbox p50 {median(batch):.1f} us, "
                        f"raw pipe p50 {median(pipe):.1f} us, ratio {ratios[-1]:.2f}; "
                        f"CPU per call {cpu['sandbox'][-1]:.1f} us and {cpu['raw_pipe'][-1]:.1f} us"
                    )
            finally:
                peer.close()
                reference.close()
            blocking = await asyncio.to_thread(_blocking_pipe, CALLS)
            level = service.level
    finally:
        shutil.rmtree(base, ignore_errors=True)
    extra = {
        "calls": len(sandbox),
        "level": level,
        "median_ratio_of_batches": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "raw_pipe_p99_us": percentile(raw, 99),
        "raw_pipe": "two Python processes, each on an asyncio loop",
        "frame_bytes": list(_frame_sizes()),
        "blocking_child_pipe_p50_us": median(blocking_child),
        "blocking_pipe_p50_us": median(blocking),
        # CPU time of both processes per call (kernel + worker; parent + child), in us;
        # the child's is read from /proc in clock ticks (10 ms): a batch of 2,000 calls
        # is exact to about 5 us per call, the median of the batches better
        "cpu_us_per_call": {k: median(v) for k, v in cpu.items()},
        "cpu_ratio": median(cpu["sandbox"]) / median(cpu["raw_pipe"]),
        "cpu_us_per_call_batches": cpu,
    }
    return [
        result("sandbox_call_p50_us", median(sandbox), "us", {"raw_pipe": median(raw)}, **extra),
        result(
            "sandbox_call_p99_us",
            percentile(sandbox, 99),
            "us",
            {"raw_pipe": percentile(raw, 99)},
            **extra,
        ),
        result("sandbox_start_ms", median(starts), "ms", {}, starts_ms=starts, level=level),
        result("sandbox_worker_rss_mb", rss_mb, "MiB", {}, level=level),
    ]


def sandbox_calls(pairs: int | None = None) -> list[Result]:
    pairs = pairs or max(7, int(os.environ.get("XCORE_BENCH_PAIRS", "7")))
    return asyncio.run(_sandbox_calls(pairs))


class _Serve:
    def __init__(self, base: Path, mode: str) -> None:
        self.base = base / mode
        _plugin(self.base / "plugins" / "bench", mode)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/app/bench/status"
        env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
        env.update({"XCORE_ADMIN_TOKEN": "bench-admin-token-0123456789", "XCORE_RELOAD": "false"})
        env["XCORE_LOG_LEVEL"] = "WARNING"
        self.log = (self.base / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kernel.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.base / "var"),
                "--plugins-dir",
                str(self.base / "plugins"),
            ],
            cwd=self.base,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"xcore serve ({mode}) did not serve {self.url}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and every process below it."""
    from services.sandbox.worker_process import _tree

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def _load(server: _Serve, seconds: float) -> tuple[float, float]:
    """(requests/s, CPU microseconds the server's processes spent per request)."""
    cpu0 = _tree_cpu(server.proc.pid)
    rps, requests = _wrk(server.url, seconds)
    cpu = _tree_cpu(server.proc.pid) - cpu0
    return rps, cpu / max(requests, 1) * 1e6


def _wrk(url: str, seconds: float) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests against {url}:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if found is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return float(found.group(1)), int(total.group(1))


def sandbox_route_rps(pairs: int | None = None, seconds: float = 5.0) -> list[Result]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    pairs = pairs or max(7, int(os.environ.get("XCORE_BENCH_PAIRS", "7")))
    base = Path(tempfile.mkdtemp(prefix="xcore-bench-sandbox-route-"))
    base.chmod(0o755)
    servers = []
    try:
        sandboxed = _Serve(base, "sandboxed")
        servers.append(sandboxed)
        trusted = _Serve(base, "trusted")
        servers.append(trusted)
        _wrk(sandboxed.url, 2)  # warm-up
        _wrk(trusted.url, 2)
        s_runs, t_runs, ratios = [], [], []
        s_cpu, t_cpu, cpu_ratios = [], [], []
        for i in range(pairs):
            if i % 2 == 0:
                s, sc = _load(sandboxed, seconds)
                t, tc = _load(trusted, seconds)
            else:
                t, tc = _load(trusted, seconds)
                s, sc = _load(sandboxed, seconds)
            s_runs.append(s)
            t_runs.append(t)
            ratios.append(s / t)
            s_cpu.append(sc)
            t_cpu.append(tc)
            cpu_ratios.append(tc / sc)
            print(
                f"   pair {i + 1}: sandboxed {s:,.0f} req/s ({sc:.0f} us CPU/req), "
                f"trusted {t:,.0f} req/s ({tc:.0f} us CPU/req), ratio {s / t:.3f}, "
                f"CPU ratio {tc / sc:.3f}"
            )
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(base, ignore_errors=True)
    extra: dict[str, Any] = {
        "median_ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": pairs,
        "seconds_per_run": seconds,
        "connections": CONNECTIONS,
        "load_generator": "wrk",
        "sandboxed_rps": s_runs,
        "trusted_rps": t_runs,
        # CPU the server's processes (kernel, and worker) spent per request: what the
        # throughput of each would be bound by on a quiet machine; less noisy than req/s
        # on a loaded one (an extra runnable process gets an extra share of the cores)
        "sandboxed_cpu_us_per_request": s_cpu,
        "trusted_cpu_us_per_request": t_cpu,
        "median_cpu_ratio": median(cpu_ratios),
    }
    return [
        result("sandbox_route_rps", median(s_runs), "req/s", {"trusted": median(t_runs)}, **extra)
    ]


BENCHMARKS = [("sandbox_call", sandbox_calls), ("sandbox_route_rps", sandbox_route_rps)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox")
    parser.add_argument("--pairs", type=int, default=None)
    args = parser.parse_args()
    for r in sandbox_calls(args.pairs) + sandbox_route_rps(args.pairs):
        print(f"{r['name']}: {r['value']:.4g} {r['unit']} peers={r['peers']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
