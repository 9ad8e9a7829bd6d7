"""``xcore plugin new NAME``: the files of a new, working plugin."""

from __future__ import annotations

from pathlib import Path

__all__ = ["scaffold"]

RUN = '''"""{name}: a plugin made with `xcore plugin new`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kernel.sdk import PluginContext

from . import state

PLUGIN_INFO = {{
    "name": "{name}",
    "version": "0.1.0",
    "author": "",
    "api_prefix": "/app/{name}",
    "tags": ["{name}"],
    "description": "",
}}


class Config(BaseModel):
    """The shape of config.yaml (validated at every load)."""

    model_config = ConfigDict(extra="forbid")

    message: str = "ok"


async def on_load(ctx: PluginContext) -> None:
    state.config = ctx.config
    ctx.logger.info("{name} loaded")


async def on_unload(ctx: PluginContext) -> None:
    ctx.logger.info("{name} unloaded")
'''

STATE = '''"""{name}'s module state (set by on_load)."""

from __future__ import annotations

from typing import Any

config: Any = None
'''

ROUTER = '''"""{name}'s routes, served under /app/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from . import state

router = APIRouter(tags=["{name}"])


@router.get("/status")
async def status() -> dict[str, str]:
    return {{"plugin": "{name}", "status": state.config.message}}
'''

CONFIG = """# {name}'s configuration, validated against Config in run.py
message: ok
"""


def scaffold(folder: Path, name: str) -> list[Path]:
    """Write the plugin's files into ``folder`` (which must not exist)."""
    folder.mkdir(parents=True)
    files = {
        "__init__.py": f'"""The {name} plugin."""\n',
        "run.py": RUN.format(name=name),
        "state.py": STATE.format(name=name),
        "router.py": ROUTER.format(name=name),
        "config.yaml": CONFIG.format(name=name),
    }
    written = []
    for file, text in files.items():
        path = folder / file
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
