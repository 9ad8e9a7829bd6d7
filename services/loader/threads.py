"""Running plugin code in threads that can be given up on, and remembering the stuck ones.

Guarantee: a plugin's sync code (its import, a sync hook, a sync event handler) never
runs on the event loop and never holds the loader up for longer than its timeout. When
the timeout expires the caller gets :class:`ThreadTimeout` at once; the thread cannot
be killed (Python has no way to stop a thread) but is marked abandoned: its next route or
validator declared raises ``kernel.pacing.Abandoned`` in it (an import declaring routes
in an endless loop stops there); until it ends it is recorded in
:attr:`PluginThreads.stuck` — shown in ``/health`` and ``/admin/plugins`` — until it ends
on its own or the process restarts.

Mechanism: each call gets its own daemon thread (not the loop's default executor, whose
few workers a handful of endless plugins would exhaust for the whole process); the
thread hands its result back with ``call_soon_threadsafe``; ``asyncio.timeout`` bounds
the wait. A ``BaseException`` the plugin's code raises (``SystemExit``, ``KeyboardInterrupt``,
``CancelledError``) reaches the caller as :class:`PluginAborted`, an ordinary exception:
re-raised on the event loop it would stop the server. Time the thread spends paused by kernel/pacing.py (leaving the event loop its
share while a generation is built) does not count: the deadline moves by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kernel import pacing

__all__ = ["PluginAborted", "PluginThreads", "StuckThread", "ThreadTimeout"]

T = TypeVar("T")

_ids = itertools.count(1)


#: Seconds a call given up on gets to stop at its next unit of build work (kernel/pacing.py).
ABANDON_GRACE = 1.0


class ThreadTimeout(Exception):
    """The call did not finish within its timeout; its thread may still be running."""


class PluginAborted(Exception):
    """The plugin's code raised a ``BaseException`` that is not an ``Exception``
    (``KeyboardInterrupt``, ``SystemExit``, ``CancelledError``, its own class).

    Raised in its thread (or by its coroutine when nothing cancelled the caller), it is the plugin's failure, never the process's interrupt, exit
    or the caller's cancellation: it reaches the caller as this ordinary exception, with
    the original as ``__cause__`` and its traceback (so the plugin's file and line are
    named).
    """

    def __init__(self, exc: BaseException) -> None:
        shown = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        super().__init__(f"{shown} (raised by the plugin's code: its failure, the server goes on)")
        self.__cause__ = exc
        self.__traceback__ = exc.__traceback__


@dataclass
class StuckThread:
    """A plugin thread that outlived its timeout (and is still running)."""

    id: int
    plugin: str
    what: str
    thread: str
    started: float
    timeout: float

    def describe(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin,
            "what": self.what,
            "thread": self.thread,
            "running_s": round(time.monotonic() - self.started, 1),
            "timeout_s": self.timeout,
        }


class PluginThreads:
    """Runs plugin callables in daemon threads with a timeout; keeps the stuck ones."""

    def __init__(self) -> None:
        self._stuck: dict[int, StuckThread] = {}
        self._lock = threading.Lock()

    @property
    def stuck(self) -> list[StuckThread]:
        with self._lock:
            return sorted(self._stuck.values(), key=lambda s: s.id)

    def stuck_of(self, plugin: str) -> list[dict[str, Any]]:
        return [s.describe() for s in self.stuck if s.plugin == plugin]

    async def run(
        self,
        plugin: str,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None,
    ) -> T:
        """``fn(*args)`` in a new thread (with the caller's context variables)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        ident = next(_ids)
        ctx = contextvars.copy_context()
        started = time.monotonic()
        state = {"done": False}
        paused = pacing.Account()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def target() -> None:
            pacing.account(paused)
            try:
                result = ctx.run(fn, *args)
            except Exception as exc:  # handed to the caller, never lost
                outcome: tuple[bool, Any] = (False, exc)
            except BaseException as exc:  # not the process's: an interrupt goes to the main thread
                outcome = (False, PluginAborted(exc))
            else:
                outcome = (True, result)
            finally:
                pacing.account(None)
            with self._lock:
                state["done"] = True
                self._stuck.pop(ident, None)
            # a closed loop raises RuntimeError: nobody waits any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, *outcome)

        name = f"xcore-plugin-{plugin}-{what}"[:60]
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                # asyncio.timeout, not wait_for: wait_for can swallow a cancellation (3.11)
                async with asyncio.timeout_at(
                    None if deadline is None else deadline + paused.paused
                ):
                    return await asyncio.shield(future)
            except TimeoutError:
                if future.done():  # the call's own TimeoutError (or it just ended)
                    return future.result()
                assert deadline is not None
                if loop.time() < deadline + paused.paused:
                    continue  # the thread was paused meanwhile: its deadline moved
            paused.abandoned = True  # its next route or validator stops it (pacing)
            # its late outcome is nobody's (the caller gets ThreadTimeout): read, not logged
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            # a moment for it to stop there, so that it is not still running (importlib
            # cleaning up sys.modules) while the caller restores the previous generation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ABANDON_GRACE):
                    await asyncio.wait([future])
            with self._lock:
                if not state["done"]:
                    self._stuck[ident] = StuckThread(
                        ident, plugin, what, name, started, timeout or 0.0
                    )
            raise ThreadTimeout(f"{what} did not finish within {timeout:g}s") from None
