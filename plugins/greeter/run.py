"""greeter: declares its config model (``Config``) and keeps the validated config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kernel.sdk import PluginContext

from . import state

PLUGIN_INFO = {
    "name": "greeter",
    "version": "1.2.0",
    "author": "xcore",
    "api_prefix": "/app/greeter",
    "tags": ["greeter"],
    "description": "Greets people the way config.yaml says.",
}


class Config(BaseModel):
    """Validated against config.yaml at every load; an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")

    greeting: str = "Hello"
    punctuation: str = Field(default="!", max_length=3)


async def on_load(ctx: PluginContext) -> None:
    state.config = ctx.config
    ctx.logger.info("greeter ready: %r", ctx.config)
