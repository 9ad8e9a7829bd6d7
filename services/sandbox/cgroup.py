"""A pids cgroup per worker: a process limit that holds for root too, and a sure kill.

Guarantee: where the kernel may create cgroups with the ``pids`` controller (cgroup v1's
``pids`` hierarchy, or cgroup v2 with ``pids`` delegated to the kernel's cgroup), every
worker runs in a cgroup of its own whose ``pids.max`` caps its processes and threads, so
a fork bomb is held at the cap even when the worker keeps root (``RLIMIT_NPROC`` does not
apply to root); stopping the worker kills every process in that cgroup, including
orphans that left the worker's process tree, and removes it.

Mechanism: the supervisor starts the worker, moves it (and, under bubblewrap, the
sandbox's own processes) into ``<kernel's cgroup>/xcore-sandbox-<kernel pid>/w<pid>``
before sending the ``config`` frame (so before the worker runs any plugin code: nothing
it starts can be outside), and writes ``pids.max``. Where no such cgroup can be made the
worker runs without one, and :func:`pids_base` says why (the level reported shows it).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from contextlib import suppress
from pathlib import Path

__all__ = ["PidsCgroup", "pids_base", "pids_folders", "pids_possible", "remove_base"]

log = logging.getLogger("xcore.sandbox")


def _mounts() -> list[tuple[str, str, str, list[str]]]:
    """(mount root, mount point, fs type, super options) of every cgroup mount."""
    out = []
    with suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4], tail[0], tail[2].split(",")))
    return out


def _own_cgroups() -> dict[str, str]:
    """The kernel's cgroup path by controller list (``""`` for cgroup v2)."""
    out = {}
    with suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            out[controllers] = path
    return out


def _join(mount_root: str, mount_point: str, path: str) -> Path | None:
    rel = os.path.relpath(path, mount_root)
    if rel.startswith(".."):
        return None  # our cgroup is not visible through this mount
    return Path(mount_point) / rel if rel != "." else Path(mount_point)


def _candidate() -> tuple[Path | None, str, bool]:
    """(folder of the kernel's pids cgroup, why not, is v2)."""
    own = _own_cgroups()
    for root, point, fstype, options in _mounts():
        if fstype != "cgroup" or "pids" not in options:
            continue
        for controllers, path in own.items():
            if "pids" in controllers.split(","):
                folder = _join(root, point, path)
                if folder is not None:
                    return folder, "", False
    for root, point, fstype, _ in _mounts():
        if fstype != "cgroup2" or "" not in own:
            continue
        folder = _join(root, point, own[""])
        if folder is None:
            continue
        try:
            available = (folder / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "pids" not in available:
            return None, "the pids controller is not delegated to the kernel's cgroup", True
        return folder, "", True
    return None, "no cgroup file system with the pids controller is mounted", False


def pids_possible() -> bool:
    """Whether this process could make pids cgroups (no side effect)."""
    folder = _candidate()[0]
    return folder is not None and os.access(folder, os.W_OK)


def pids_folders() -> list[Path]:
    """The folders of worker cgroups that kernels on this machine made (for tests and
    operators)."""
    folder = _candidate()[0]
    if folder is None:
        return []
    with suppress(OSError):
        return sorted(folder.glob("xcore-sandbox-*"))
    return []


@functools.cache
def pids_base() -> tuple[Path | None, str]:
    """The folder workers' cgroups are made in (created once per kernel process), or
    None and why not."""
    folder, why, v2 = _candidate()
    if folder is None:
        return None, why
    _sweep(folder)
    base = folder / f"xcore-sandbox-{os.getpid()}"
    try:
        if v2 and "pids" not in (folder / "cgroup.subtree_control").read_text().split():
            # cgroup v2: our cgroup must hand the controller down (refused while it
            # holds processes itself, unless it is the root)
            (folder / "cgroup.subtree_control").write_text("+pids")
        base.mkdir(exist_ok=True)
        if v2:
            (base / "cgroup.subtree_control").write_text("+pids")
        with suppress(OSError):
            (base / "pids.max").write_text("max")
    except OSError as exc:
        with suppress(OSError):
            base.rmdir()
        return None, f"cannot create a cgroup in {folder}: {exc.strerror or exc}"
    return base, ""


def _sweep(folder: Path) -> None:
    """Remove the empty worker cgroups a kernel that died without stopping left behind."""
    with suppress(OSError):
        for old in folder.glob("xcore-sandbox-*"):
            pid = old.name.removeprefix("xcore-sandbox-")
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            with suppress(OSError):
                for leaf in old.iterdir():
                    if leaf.is_dir():
                        with suppress(OSError):
                            leaf.rmdir()
                old.rmdir()


def remove_base() -> None:
    """Remove the kernel's folder of worker cgroups (when the sandbox stops)."""
    if pids_base.cache_info().currsize:
        base, _ = pids_base()
        if base is not None:
            with suppress(OSError):
                base.rmdir()
        pids_base.cache_clear()


class PidsCgroup:
    """One worker's pids cgroup."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit

    @classmethod
    def create(cls, name: str, limit: int) -> PidsCgroup | None:
        """A new cgroup capped at ``limit`` tasks, or None (logged) where it cannot be."""
        base, _ = pids_base()
        if base is None:
            return None
        path = base / name
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(limit))
        except OSError as exc:
            log.warning("sandbox: cannot create the pids cgroup %s: %s", path, exc)
            with suppress(OSError):
                path.rmdir()
            return None
        return cls(path, limit)

    def add(self, pids: list[int]) -> None:
        """Move ``pids`` into the cgroup (raises OSError)."""
        for pid in pids:
            (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (orphans of a fork bomb included)."""
        for _ in range(100):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup (a cgroup with processes cannot go)."""
        self.kill()
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("sandbox: cannot remove the pids cgroup %s: %s", self.path, exc)
