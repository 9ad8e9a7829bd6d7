"""The loader's implementation of the SDK's :class:`kernel.sdk.PluginContext`.

One context per loaded generation. It hands the plugin its config, logger and data
folder, lets it append and subscribe, and remembers the subscriptions so unloading the
generation ends them. Hooks run with :func:`kernel.sdk.current_plugin` set; sync hooks
and sync event handlers run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel.events import Event, Recorded
from kernel.sdk import plugin_context_var
from kernel.subscriptions import Subscription

from .events import stream_of
from .threads import PluginAborted, PluginThreads, ThreadTimeout

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["LoadedContext", "call_plugin"]


async def call_plugin(
    ctx: LoadedContext,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    what: str = "call",
) -> Any:
    """Call plugin code with ``current_plugin()`` set: async on the loop, sync in a thread.

    With ``timeout``, raises ``TimeoutError`` when the call does not finish in time; a
    sync call's thread that keeps running is reported by ``ctx.threads`` (it cannot be
    stopped). An async call can only be timed out while it awaits (see the watchdog).
    """
    token = plugin_context_var.set(ctx)
    try:
        if inspect.iscoroutinefunction(fn):
            async with asyncio.timeout(timeout):
                return await _own(fn(*args))
        # the thread gets a copy of the current context: current_plugin() works there too
        try:
            result = await ctx.threads.run(ctx.name, what, fn, *args, timeout=timeout)
        except ThreadTimeout as exc:
            raise TimeoutError(str(exc)) from None
        if inspect.isawaitable(result):
            async with asyncio.timeout(timeout):
                return await _own(result)
        return result
    finally:
        plugin_context_var.reset(token)


async def _own(awaitable: Any) -> Any:
    """Await plugin code: a ``SystemExit``, ``KeyboardInterrupt`` or ``CancelledError`` it
    raises itself (nothing cancelled this task) is its failure (:class:`PluginAborted`);
    re-raised on the event loop it would stop the server."""
    try:
        return await awaitable
    except Exception:
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # a real cancellation (a timeout, the server stopping)
        raise PluginAborted(exc) from exc
    except BaseException as exc:
        raise PluginAborted(exc) from exc


class LoadedContext:
    """What one generation of a plugin gets from the kernel."""

    def __init__(
        self,
        kernel: Kernel,
        name: str,
        generation: int,
        config: Any,
        data_dir: Path,
        threads: PluginThreads | None = None,
    ) -> None:
        self.name = name
        self.generation = generation
        self.config = config
        self.logger = logging.getLogger(f"xcore.plugin.{name}")
        #: ``<data_dir>/plugins/<name>``: the plugin's own files, kept across reloads and
        #: outside its code folder (writing there never triggers a reload).
        self.data_dir = data_dir
        #: Where this generation's sync code runs (and stuck threads are remembered).
        self.threads = threads if threads is not None else PluginThreads()
        self._kernel = kernel
        self._subscriptions: list[Subscription] = []
        self.closed = False

    async def append(self, event: Event, *, stream: str | None = None) -> list[Recorded]:
        """Record ``event`` (default stream ``plugin-<name>``); returns once durable."""
        return await self._kernel.append(
            event, stream=stream or stream_of(self.name), actor=f"plugin:{self.name}"
        )

    async def subscribe(
        self,
        handler: Callable[[Recorded], Awaitable[None] | None],
        *,
        types: Collection[type[Event] | str] | None = None,
    ) -> None:
        """Receive new events live until this generation is unloaded."""
        if self.closed:
            raise RuntimeError(f"plugin {self.name!r} generation {self.generation} is unloaded")

        async def deliver(record: Recorded) -> None:
            await call_plugin(self, handler, record, what="event handler")

        deliver.__qualname__ = f"plugin:{self.name}:{getattr(handler, '__qualname__', 'handler')}"
        sub = await self._kernel.subscribe(deliver, types=types, start="now")
        self._subscriptions.append(sub)

    async def close(self) -> None:
        """End every subscription of this generation."""
        self.closed = True
        subs, self._subscriptions = self._subscriptions, []
        for sub in subs:
            await self._kernel.unsubscribe(sub)
