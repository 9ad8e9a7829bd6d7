"""Helpers for tests of paced plugin builds (kernel/pacing.py) and of FastAPI's lazily
built route state (kernel/warm.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from kernel import pacing


@contextlib.contextmanager
def watched_loop() -> Iterator[Any]:
    """A new event loop watched by pacing (its selector wrapped); yields the watch."""
    loop = asyncio.new_event_loop()
    try:
        assert pacing.watch_loop(loop)
        watch = pacing._watch
        assert watch is not None
        yield watch
    finally:
        pacing.unwatch_loop(loop)
        loop.close()


@contextlib.contextmanager
def fastapi_builds() -> Iterator[list[str]]:
    """The path of each route FastAPI builds again for an include (its "effective
    context", built lazily at the first request that reaches the include)."""
    from fastapi import routing

    context: Any = getattr(routing, "_EffectiveRouteContext", None)
    if context is None or not hasattr(context, "from_api_route"):
        pytest.skip("this FastAPI builds included routes at include time")
    original = context.from_api_route.__func__
    seen: list[str] = []

    def counted(cls: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("original_route", args[0] if args else None).path)
        return original(cls, *args, **kwargs)

    context.from_api_route = classmethod(counted)
    try:
        yield seen
    finally:
        context.from_api_route = classmethod(original)
