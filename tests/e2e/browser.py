"""Drive Debian's Chromium with Playwright, for end-to-end tests of the admin page.

Playwright's own browser downloads are not used: the system Chromium (``apt-get install
chromium``; ``.ci/run`` installs it) is launched by path. Where it is missing the tests
are skipped with the reason, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The flags this workplace's closed network needs (no background connections).
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-precise-memory-info",
]


def chromium_path() -> str:
    for candidate in (os.environ.get("XCORE_TEST_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    reason = "Chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason + ": CI must run the browser tests")
    pytest.skip(reason)


def output_dir(name: str) -> Path:
    """Where a test writes its screenshots (``XCORE_TEST_OUTPUT`` or ``test-output/``)."""
    base = Path(os.environ.get("XCORE_TEST_OUTPUT") or ROOT / "test-output")
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed (it is in the dev extra)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
