"""The loader refreshes the path finders' caches safely while other threads import."""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.loader.importer import invalidate_path_caches


@pytest.fixture
def clean_cache() -> Iterator[None]:
    before = sys.path_importer_cache.copy()
    try:
        yield
    finally:
        sys.path_importer_cache.clear()
        sys.path_importer_cache.update(before)


def _with_paths_added_mid_iteration(refresh: Callable[[], None]) -> None:
    """Run ``refresh`` while collections keep running finalizers that add cache entries,
    which is what another import thread does when a collection hands it the GIL."""
    left = [2_000]

    class Adder:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            sys.path_importer_cache[f"/nonexistent/xcore-test-{left[0]}"] = None
            if left[0] > 0:
                left[0] -= 1
                Adder()

    for i in range(5_000):  # enough entries that the listing allocates past the free list
        sys.path_importer_cache[f"/nonexistent/xcore-pad-{i}"] = None
    gc.collect()
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        Adder()
        refresh()
    finally:
        gc.set_threshold(*threshold)
        left[0] = 0  # end the chain: the last finalizer makes no successor
        gc.collect()


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="3.12+ runs collections between bytecodes only"
)
@pytest.mark.usefixtures("clean_cache")
def test_the_standard_refresh_fails_when_paths_are_added_meanwhile() -> None:
    """The hazard the loader avoids, shown on the standard call (CPython 3.11)."""
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        _with_paths_added_mid_iteration(importlib.invalidate_caches)


@pytest.mark.usefixtures("clean_cache")
def test_the_loaders_refresh_holds_when_paths_are_added_meanwhile() -> None:
    _with_paths_added_mid_iteration(invalidate_path_caches)


@pytest.mark.usefixtures("clean_cache")
def test_the_refresh_makes_a_module_added_in_the_same_instant_importable(
    tmp_path: Path,
) -> None:
    """A file finder caches its folder's listing by the folder's mtime: a module added
    without the mtime moving is found only after the refresh."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "xcore_refresh_first.py").write_text("X = 1\n")
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module("xcore_refresh_first")
        stamp = folder.stat()
        (folder / "xcore_refresh_second.py").write_text("X = 2\n")
        os.utime(folder, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("xcore_refresh_second")
        invalidate_path_caches()
        assert importlib.import_module("xcore_refresh_second").X == 2
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("xcore_refresh_first", None)
        sys.modules.pop("xcore_refresh_second", None)
