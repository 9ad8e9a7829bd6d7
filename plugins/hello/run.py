"""hello: PLUGIN_INFO in the original project's format, and two hooks."""

from __future__ import annotations

from kernel.sdk import PluginContext

PLUGIN_INFO = {
    "version": "1.0.0",
    "author": "Nom Auteur",
    "Api_prefix": "/app/hello",
    "tag_for_identified": ["hello"],
}


def on_load(ctx: PluginContext) -> None:
    # a sync hook: the loader runs it in a worker thread
    ctx.logger.info("hello is loaded")


async def on_unload(ctx: PluginContext) -> None:
    ctx.logger.info("hello is unloaded")
