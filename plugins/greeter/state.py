"""greeter's module state, set by on_load (a helper module: reloaded with the plugin)."""

from __future__ import annotations

from typing import Any

config: Any = None


def greet(name: str) -> str:
    return f"{config.greeting}, {name}{config.punctuation}"
