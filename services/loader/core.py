"""The plugin loader: one object per kernel, assembled from its concerns.

- ``state.py``: what it knows (serving generations, lock, paths, limits) and the
  queries shared by everything below (``folder``, ``installed``, ``dependents``);
- ``lifecycle.py``: building one generation side by side, mounting it, unloading it;
- ``boot.py``: loading every plugin at start, unloading them at stop;
- ``requests.py``: the answers to reload, enable, disable, install and uninstall.

Every operation runs under :attr:`Loader.lock` and records what happened; a failure
leaves the previous state untouched.
"""

from __future__ import annotations

from .boot import Boot
from .requests import Requests
from .state import ACTOR

__all__ = ["ACTOR", "Loader"]


class Loader(Boot, Requests):
    """The plugin loader's state and operations (one per kernel)."""
