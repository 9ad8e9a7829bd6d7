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

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["LoadedContext", "call_plugin"]


async def call_plugin(ctx: LoadedContext, fn: Callable[..., Any], *args: Any) -> Any:
    """Call plugin code with ``current_plugin()`` set: async on the loop, sync in a thread."""
    token = plugin_context_var.set(ctx)
    try:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        # to_thread copies the current context, so the thread sees current_plugin() too
        result = await asyncio.to_thread(fn, *args)
        if inspect.isawaitable(result):
            return await result
        return result
    finally:
        plugin_context_var.reset(token)


class LoadedContext:
    """What one generation of a plugin gets from the kernel."""

    def __init__(
        self, kernel: Kernel, name: str, generation: int, config: Any, data_dir: Path
    ) -> None:
        self.name = name
        self.generation = generation
        self.config = config
        self.logger = logging.getLogger(f"xcore.plugin.{name}")
        self.data_dir = data_dir
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
            await call_plugin(self, handler, record)

        deliver.__qualname__ = f"plugin:{self.name}:{getattr(handler, '__qualname__', 'handler')}"
        sub = await self._kernel.subscribe(deliver, types=types, start="now")
        self._subscriptions.append(sub)

    async def close(self) -> None:
        """End every subscription of this generation."""
        self.closed = True
        subs, self._subscriptions = self._subscriptions, []
        for sub in subs:
            await self._kernel.unsubscribe(sub)
