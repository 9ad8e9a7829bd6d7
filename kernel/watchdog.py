"""The event-loop watchdog: a blocked loop is named, recorded, and cannot stop a shutdown.

Guarantee: when code on the event loop (an ``async def`` hook or route that never
awaits, a C call that does not return) keeps the loop from running for longer than
``loop_block_threshold`` seconds,

- the watchdog *thread* logs, while the loop is still blocked, the loop thread's stack
  with the culprit named (the innermost frame of a plugin's code: plugin, file, line);
- once the loop runs again, a ``LoopBlocked`` event is recorded on the ``kernel``
  stream (duration, culprit, stack), and ``/health`` shows the count and the last one;
- a SIGTERM (or SIGINT) that the blocked loop cannot act on ends the process anyway
  after ``stop_grace`` seconds, logs flushed first, so a service manager can stop it;
  so does one received while the kernel is still starting (uvicorn acts on a signal
  only once the start is over, and a plugin's import may hold the boot for
  ``import_timeout``) if the start has not ended ``stop_grace`` seconds later.

Mechanism: a heartbeat task on the loop stamps the time every ``interval``; the thread
compares that stamp with the clock. Python runs signal handlers on the main thread
between bytecodes even while a coroutine spins, so a small handler (chained in front of
uvicorn's) notes when the stop was asked; the thread does the rest. Only a block in C
code that never returns to the interpreter escapes the SIGTERM path (SIGKILL remains).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from kernel.events import Event
from kernel.logging import flush_logging

__all__ = ["PLUGIN_PACKAGE", "Block", "LoopBlocked", "Watchdog", "culprit"]

log = logging.getLogger("xcore.watchdog")

#: The package the loader imports plugins under (``xcore_plugins.<name>.<module>``).
PLUGIN_PACKAGE = "xcore_plugins"


class LoopBlocked(Event):
    """The event loop did not run for ``duration_ms``; ``plugin``/``file``/``line`` name
    the innermost plugin frame found on the loop thread while it was blocked."""

    duration_ms: float
    plugin: str | None = None
    file: str | None = None
    line: int | None = None
    stack: str = ""


@dataclass
class Block:
    """One stretch of time the loop did not run (seen by the thread, closed by the loop)."""

    started: float
    plugin: str | None = None
    file: str | None = None
    line: int | None = None
    stack: str = ""
    duration_ms: float = 0.0

    def where(self) -> str:
        if self.file is None:
            return "unknown code"
        owner = f"plugin {self.plugin!r} " if self.plugin else ""
        return f"{owner}{self.file} line {self.line}"


def culprit(frame: FrameType | None) -> tuple[str | None, str | None, int | None]:
    """``(plugin, file, line)`` of the innermost plugin frame (else the innermost frame)."""
    innermost: tuple[str | None, str | None, int | None] = (None, None, None)
    first = True
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if first:
            innermost = (None, frame.f_code.co_filename, frame.f_lineno)
            first = False
        if isinstance(module, str) and module.startswith(PLUGIN_PACKAGE + "."):
            parts = module.split(".")
            filename = frame.f_code.co_filename
            # the file relative to the plugin's folder: the module path after the plugin
            rel = "/".join(parts[2:]) + ".py" if len(parts) > 2 else "__init__.py"
            if filename.endswith("__init__.py") and len(parts) > 2:
                rel = "/".join(parts[2:]) + "/__init__.py"
            return parts[1], rel, frame.f_lineno
        frame = frame.f_back
    return innermost


Recorder = Callable[[Block], Awaitable[None]]


class Watchdog:
    """Watches one event loop from a daemon thread; see the module docstring."""

    def __init__(self, threshold: float, grace: float, *, interval: float | None = None) -> None:
        self.threshold = threshold
        self.grace = grace
        self.interval = interval if interval is not None else max(0.01, min(0.1, threshold / 4))
        #: Blocks seen since start (the loop came back from each).
        self.count = 0
        self.last: Block | None = None
        self._beat = time.monotonic()
        self._current: Block | None = None
        self._loop_thread = 0
        self._term_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._record: Recorder | None = None
        self._previous: dict[int, Any] = {}
        self._pending: set[asyncio.Task[None]] = set()
        #: True from start() until :meth:`started` (the kernel's start is under way).
        self._starting = False

    # -- life cycle ------------------------------------------------------------------

    async def start(self, record: Recorder | None = None) -> None:
        """Start the heartbeat (on this loop), the thread, and the signal hook."""
        self._record = record
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._task = asyncio.create_task(self._heartbeat(), name="xcore-watchdog-heartbeat")
        self._stop.clear()
        self._starting = True
        self._thread = threading.Thread(target=self._watch, name="xcore-watchdog", daemon=True)
        self._thread.start()
        self._hook_signals()

    def started(self) -> None:
        """The kernel's start is over: from now on a stop is the kernel's to run."""
        self._starting = False

    async def stop(self) -> None:
        self._unhook_signals()
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pending in list(self._pending):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pending, 5)
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 5)

    def health(self) -> dict[str, Any]:
        """What ``/health`` shows (the loop answers, so it is not blocked right now)."""
        last = None
        if self.last is not None:
            b = self.last
            last = {
                "duration_ms": b.duration_ms,
                "plugin": b.plugin,
                "file": b.file,
                "line": b.line,
                "ago_s": round(time.monotonic() - b.started, 3),
            }
        return {"threshold_s": self.threshold, "blocked_count": self.count, "last_block": last}

    # -- the loop side -----------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            before = time.monotonic()
            self._beat = before
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self._beat = now
            late = now - before - self.interval
            if late > self.threshold:
                self._closed(before, late)

    def _closed(self, started: float, late: float) -> None:
        block = self._current or Block(started=started)
        self._current = None
        block.duration_ms = round(late * 1000, 1)
        self.count += 1
        self.last = block
        log.warning(
            "the event loop is running again after %.0f ms blocked by %s",
            block.duration_ms,
            block.where(),
        )
        if self._record is not None:
            task = asyncio.create_task(self._safe_record(block), name="xcore-watchdog-record")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _safe_record(self, block: Block) -> None:
        assert self._record is not None
        try:
            await self._record(block)
        except Exception:
            log.exception("could not record LoopBlocked (%s)", block.where())

    # -- the thread side ---------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            beat = self._beat
            blocked = now - beat > self.threshold + self.interval
            if blocked and self._current is None:
                self._current = self._capture(beat)
            term = self._term_at
            if term is not None and blocked and now - max(term, beat) > self.grace:
                self._force_exit()
                return
            if term is not None and self._starting and now - term > self.grace:
                # the server answers the signal only once started (uvicorn awaits the
                # whole start): a start held by a plugin's import must not hold the stop
                self._force_exit("the start is still under way")
                return

    def _capture(self, started: float) -> Block:
        frame = sys._current_frames().get(self._loop_thread)
        plugin, file, line = culprit(frame)
        stack = "".join(traceback.format_stack(frame, limit=40)) if frame is not None else ""
        block = Block(started=started, plugin=plugin, file=file, line=line, stack=stack)
        log.error(
            "the event loop has been blocked for more than %gs by %s; its stack:\n%s",
            self.threshold,
            block.where(),
            stack,
        )
        return block

    def _force_exit(self, why: str | None = None) -> None:
        if why is None:
            block = self._current
            where = block.where() if block is not None else "unknown code"
            why = f"the event loop is blocked by {where}"
        log.critical("stop requested %gs ago but %s: ending the process", self.grace, why)
        flush_logging()
        os._exit(128 + signal.SIGTERM)

    # -- signals -----------------------------------------------------------------------

    def _hook_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may install handlers; no forced stop then
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
            except (ValueError, OSError) as exc:
                log.debug("cannot hook %s: %s", sig, exc)
                continue
            self._previous[sig] = previous

    def _unhook_signals(self) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._term_at is None:
            self._term_at = time.monotonic()
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._unhook_signals()
            signal.raise_signal(signum)
