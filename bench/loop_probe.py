"""Where a server's event loop stalls: run ``xcore serve`` with recorders inside.

``python -m bench.loop_probe OUT.json serve ...`` runs ``xcore serve ...`` (the same
arguments as ``python -m kernel.cli``) with four recorders added to the process, and
rewrites ``OUT.json`` once a second: ``{"lags": [[end_monotonic_s, ms], ...], "gcs":
[[start_monotonic_s, ms, generation, thread], ...], "samples": [[monotonic_s,
stale_ms, state, main_thread_frames, {thread: frames}], ...]}``. Times are
``CLOCK_MONOTONIC`` seconds, the clock wrk's ``bench/fixed_rate.lua`` stamps requests
with, so a late request can be matched with what the server did at that moment.

- *Lag:* a task of the server's loop sleeps 1 ms in a loop; each wake-up more than
  3 ms late is a stall of the loop (its length is recorded when it ends).
- *Collections:* ``gc.callbacks`` times every collection of the cyclic collector, with
  the thread that ran it (a build thread's young collection holds the interpreter too).
- *Samples:* a thread looks at the loop every 3 ms; once the loop has been stale for
  15 ms, and again each time the staleness doubles, it records the main thread's stack,
  the other threads' innermost frames and the main thread's state from
  ``/proc/self/task/<tid>/stat`` (``R``: runnable or running — in a system call or
  waiting for a CPU; ``S``: waiting, e.g. for the interpreter another thread holds).

- *Requests:* per HTTP request, when the loop read it from its socket, when the app was
  called and when its response was handed to the socket, keyed by the request's ``t``
  (the slot bench/fixed_rate.lua sends), appended to ``OUT.json.requests`` once a
  second (``--no-requests``: off). "Written" is taken once the send has returned, so
  wrk may have read the response a few tens of µs earlier (a negative
  ``written_to_received`` in bench/reload.py's split).

``--no-lag`` leaves the lag probe and the sampler out; ``--stall MS`` blocks the loop
for MS every second (the stall bench/reload.py's check must see; each one is listed
in ``stalls``); ``bare --port PORT`` runs a bare uvicorn + FastAPI app with the
neighbour's routes instead of ``xcore serve`` (the framework's own peer).

The probe costs the loop one timer a millisecond, and a few stack walks per long stall
only (sampling every millisecond of a stall took a third of a core on a loaded machine
and changed what it measured). ``bench/reload.py`` runs its neighbour server under it
when ``XCORE_BENCH_PROBE`` names a folder (see bench/README.md), and
:func:`summarise` reduces a recording to what happened during one phase.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

#: A wake-up of the probe's 1 ms sleep later than this (s) is a stall.
LAG_S = 0.003
#: Staleness (s) from which the sampler records stacks (then at each doubling).
SAMPLE_FROM_S = 0.015


class Probe:
    """The recorders of one process (installed by :meth:`install`)."""

    def __init__(
        self, out: str, lag: bool = True, requests: bool = True, stall_ms: float = 0.0
    ) -> None:
        self.out = out
        self.lag = lag
        self.timed = requests
        self.stall_ms = stall_ms
        self.lags: list[tuple[float, float]] = []
        self.gcs: list[tuple[float, float, int, str]] = []
        self.samples: list[tuple[float, float, str, list[str], dict[str, list[str]]]] = []
        self.stalls: list[tuple[float, float]] = []
        #: per request: key (the ``t`` of its query), read, ASGI call, response written
        self.requests: list[tuple[str, float, float, float]] = []
        #: the monotonic time of the last read of each connection (by client port)
        self.reads: dict[int, float] = {}
        self._beat = time.perf_counter()
        self._main = threading.get_ident()
        self._main_native = threading.get_native_id()
        self._gc_start: dict[int, float] = {}

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)
        probe = self
        original = asyncio.base_events.BaseEventLoop.run_forever

        def run_forever(loop: asyncio.base_events.BaseEventLoop) -> None:
            if probe.lag:
                loop.create_task(probe._tick(), name="bench-loop-probe")
            if probe.stall_ms > 0:
                loop.create_task(probe._stall(), name="bench-injected-stall")
            original(loop)

        asyncio.base_events.BaseEventLoop.run_forever = run_forever  # type: ignore[method-assign,assignment]
        if self.timed:
            self._time_requests()
        if self.lag:
            threading.Thread(target=self._sampler, name="bench-probe-sampler", daemon=True).start()
        threading.Thread(target=self._writer, name="bench-probe-writer", daemon=True).start()

    def _time_requests(self) -> None:
        """Record, per HTTP request, when the loop read it from its socket, when the app
        was called and when the last byte of the response was handed to the socket."""
        from asyncio import selector_events

        import uvicorn.config

        reads = self.reads
        transport_class: Any = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
        data_received = transport_class._read_ready__data_received

        def timed_read(transport: Any) -> None:
            peer = transport._extra.get("peername")
            if peer:
                reads[peer[1]] = time.monotonic()
            data_received(transport)

        transport_class._read_ready__data_received = timed_read
        load = uvicorn.config.Config.load
        rows = self

        def timed_load(config: Any) -> None:
            load(config)
            inner = config.loaded_app

            async def app(scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await inner(scope, receive, send)
                    return
                called = time.monotonic()
                client = scope.get("client")
                read = reads.get(client[1], -1.0) if client else -1.0
                query = scope.get("query_string", b"").decode("latin-1")
                key = next((q[2:] for q in query.split("&") if q.startswith("t=")), "")

                async def timed_send(message: Any) -> None:
                    await send(message)
                    if message["type"] == "http.response.body" and not message.get("more_body"):
                        rows.requests.append((key, read, called, time.monotonic()))

                await inner(scope, receive, timed_send)

            config.loaded_app = app

        uvicorn.config.Config.load = timed_load  # type: ignore[method-assign,assignment]

    async def _stall(self) -> None:
        """A stall of the server's loop on purpose (``--stall MS``, once a second): what
        the benchmark's figure must show."""
        while True:
            await asyncio.sleep(1.0)
            start = time.monotonic()
            time.sleep(self.stall_ms / 1000)
            self.stalls.append((start, (time.monotonic() - start) * 1000))

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            self._gc_start[ident] = time.monotonic()
            return
        start = self._gc_start.pop(ident, None)
        if start is not None:
            name = "main" if ident == self._main else threading.current_thread().name
            self.gcs.append((start, (time.monotonic() - start) * 1000, info["generation"], name))

    async def _tick(self) -> None:
        while True:
            before = self._beat = time.perf_counter()
            await asyncio.sleep(0.001)
            now = self._beat = time.perf_counter()
            late = now - before - 0.001
            if late > LAG_S:
                self.lags.append((time.monotonic(), late * 1000))

    @staticmethod
    def _frames(frame: FrameType | None, depth: int) -> list[str]:
        if frame is None:
            return []
        return [
            "/".join(f.filename.split("/")[-2:]) + f":{f.lineno}:{f.name}"
            for f in traceback.extract_stack(frame)[-depth:]
        ]

    def _state(self) -> str:
        try:
            with open(f"/proc/self/task/{self._main_native}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "?"

    def _sampler(self) -> None:
        next_at = SAMPLE_FROM_S
        while True:
            time.sleep(0.003)
            stale = time.perf_counter() - self._beat
            if stale < SAMPLE_FROM_S:
                next_at = SAMPLE_FROM_S
                continue
            if stale < next_at:
                continue
            next_at = stale * 2
            frames = sys._current_frames()
            others = {
                str(ident): self._frames(frame, 3)
                for ident, frame in frames.items()
                if ident not in (self._main, threading.get_ident())
            }
            self.samples.append(
                (
                    time.monotonic(),
                    stale * 1000,
                    self._state(),
                    self._frames(frames.get(self._main), 8),
                    others,
                )
            )

    def _writer(self) -> None:
        requests = f"{self.out}.requests"
        while True:
            time.sleep(1)
            tmp = f"{self.out}.tmp"
            with open(tmp, "w") as out:
                json.dump(
                    {
                        "lags": self.lags,
                        "gcs": self.gcs,
                        "samples": self.samples[-5000:],
                        "stalls": self.stalls,
                    },
                    out,
                )
            os.replace(tmp, self.out)
            rows, self.requests = self.requests, []
            if rows:
                with open(requests, "a") as out:
                    out.writelines(f"{k} {r:.6f} {c:.6f} {w:.6f}\n" for k, r, c, w in rows)


def summarise(recording: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """What the loop went through between ``start`` and ``end`` (monotonic s): the stall
    time, the longest stalls, the collections of 2 ms or more (ms, generation, thread),
    and where the main thread was, in which state, when sampled during a stall."""
    lags = [lag for at, lag in recording["lags"] if start <= at <= end]
    gcs = [
        [round(ms, 1), gen, thread]
        for at, ms, gen, thread in recording["gcs"]
        if start <= at <= end and ms >= 2
    ]
    where: collections.Counter[str] = collections.Counter()
    for at, _, state, frames, _others in recording["samples"]:
        if start <= at <= end and frames:
            where[f"{state} {frames[-1]}"] += 1
    return {
        "stalled_ms": round(sum(lags), 1),
        "longest_ms": sorted((round(x, 1) for x in lags), reverse=True)[:5],
        "collections_2ms": gcs[:20],
        "main_thread_in_stalls": dict(where.most_common(5)),
    }


BARE_PATH = "/app/neighbour"


def bare_app() -> Any:
    """A bare FastAPI app with the neighbour's routes at the same paths as xcore's
    (``/app/neighbour/echo``, ``/app/neighbour/ping``) and ``/health/live``: the peer
    of the fixed-rate neighbour (uvicorn + FastAPI without xcore)."""
    from fastapi import APIRouter, FastAPI
    from fastapi.responses import PlainTextResponse

    router = APIRouter()

    @router.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/echo")
    async def echo(t: str = "0") -> PlainTextResponse:
        return PlainTextResponse(t)

    app = FastAPI()
    app.include_router(router, prefix=BARE_PATH)

    @app.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"ok": True}

    return app


def _serve_bare(argv: list[str]) -> int:
    import uvicorn

    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 8000
    config = uvicorn.Config(
        bare_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    uvicorn.Server(config).run()
    return 0


USAGE = (
    "usage: python -m bench.loop_probe OUT.json [--no-lag] [--no-requests] [--stall MS] "
    "(serve [xcore serve args] | bare --port PORT)"
)


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        raise SystemExit(USAGE)
    out, argv = argv[0], argv[1:]
    lag, requests, stall_ms = True, True, 0.0
    while argv and argv[0].startswith("--"):
        if argv[0] == "--no-lag":
            lag, argv = False, argv[1:]
        elif argv[0] == "--no-requests":
            requests, argv = False, argv[1:]
        elif argv[0] == "--stall" and len(argv) > 1:
            stall_ms, argv = float(argv[1]), argv[2:]
        else:
            raise SystemExit(f"{USAGE}\nunknown option {argv[0]!r}")
    if not argv or argv[0] not in ("serve", "bare"):
        raise SystemExit(USAGE)
    Probe(out, lag=lag, requests=requests, stall_ms=stall_ms).install()
    if argv[0] == "bare":
        sys.exit(_serve_bare(argv[1:]))
    from kernel.cli import main as cli

    sys.exit(cli(argv))


if __name__ == "__main__":
    main()
