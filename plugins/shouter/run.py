"""shouter: loads after greeter (``requires``), records an event, runs a task."""

from __future__ import annotations

from kernel.events import Event
from kernel.sdk import PluginContext, current_task, task

PLUGIN_INFO = {
    "version": "0.3.0",
    "author": "xcore",
    "api_prefix": "/app/shouter",
    "requires": {"greeter": ">=1.0,<2"},
    "description": "Shouts. Needs greeter 1.x to be loaded first.",
}


class Shouted(Event):
    """shouter's own event, recorded on its stream (plugin-shouter)."""

    text: str


async def on_load(ctx: PluginContext) -> None:
    await ctx.append(Shouted(text="shouter is up"))


@task(every="1h")
def hourly_shout() -> None:
    current_task().logger.info("HELLO, WORLD")
