"""Shared fixtures: asyncio in debug mode for every async test; the route state FastAPI
builds lazily (tests/building.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.building import fastapi_builds


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"debug": True})


@pytest.fixture
def built() -> Iterator[list[str]]:
    """The path of each route FastAPI builds again for an include while the test runs."""
    with fastapi_builds() as seen:
        yield seen
