"""A worker's limits: the operator's defaults, a manifest's ``limits``, the ceilings.

The defaults come from ``services.sandbox``; a manifest may lower any of them, or raise
it up to the operator's ceiling (``max_*``). Asking for more than the ceiling refuses the
load with the key and the ceiling named: silently granting less would make the plugin
fail later for a reason nobody sees.

The worker applies them to itself (:func:`apply`) before it imports plugin code, as hard
limits equal to the soft ones, so nothing the plugin does can lift them (an unprivileged
process cannot raise a hard limit, and the worker gives up root first).
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from typing import Any

from .settings import SandboxSettings

__all__ = ["LimitError", "Limits", "apply", "resolve"]

MIB = 1024 * 1024


class LimitError(Exception):
    """A manifest asks for more than the operator allows."""


@dataclass(frozen=True)
class Limits:
    """What one worker may use (bytes, seconds, counts)."""

    memory: int
    cpu: float
    wall_time: float
    open_files: int
    processes: int
    file_size: int
    network: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: manifest key -> (settings default, settings ceiling, scale from settings units)
_KEYS: dict[str, tuple[str, float]] = {
    "memory": ("memory_mb", MIB),
    "cpu": ("cpu_s", 1),
    "wall_time": ("wall_time_s", 1),
    "open_files": ("open_files", 1),
    "processes": ("processes", 1),
    "file_size": ("file_size_mb", MIB),
}


def resolve(
    plugin: str, settings: SandboxSettings, manifest: dict[str, float], network: bool
) -> Limits:
    """The limits of ``plugin``'s worker; raises :class:`LimitError` above a ceiling."""
    values: dict[str, float] = {}
    for key, (field, scale) in _KEYS.items():
        default = float(getattr(settings, field)) * scale
        ceiling = float(getattr(settings, f"max_{field}")) * scale
        asked = manifest.get(key)
        if asked is None:
            values[key] = default
            continue
        if asked > ceiling:
            raise LimitError(
                f"plugin {plugin!r}: run.py: key 'limits.{key}': {_show(key, asked)} exceeds "
                f"the operator's ceiling services.sandbox.max_{field} ({_show(key, ceiling)})"
            )
        values[key] = asked
    return Limits(
        memory=int(values["memory"]),
        cpu=values["cpu"],
        wall_time=values["wall_time"],
        open_files=int(values["open_files"]),
        processes=int(values["processes"]),
        file_size=int(values["file_size"]),
        network=network and settings.allow_network,
    )


def _show(key: str, value: float) -> str:
    if key in ("memory", "file_size"):
        return f"{value / MIB:g} MiB"
    if key in ("cpu", "wall_time"):
        return f"{value:g}s"
    return f"{value:g}"


def _tasks_of(uid: int) -> int:
    """How many threads the user ``uid`` runs right now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        real = threads = None
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                real = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
        if real == uid and threads:
            count += threads
    return count


def apply(limits: dict[str, Any]) -> dict[str, int]:
    """Set the limits on this process (soft = hard); returns what was set, by rlimit."""
    cpu = max(1, int(limits["cpu"] + 0.999))
    nproc = _tasks_of(os.getuid()) + int(limits["processes"])
    wanted = {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_AS": (int(limits["memory"]),) * 2,
        # the soft limit sends SIGXCPU (recorded as the cpu limit); the hard one kills
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_NOFILE": (int(limits["open_files"]),) * 2,
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_FSIZE": (int(limits["file_size"]),) * 2,
    }
    applied = {}
    for name, (soft, hard) in wanted.items():
        which = getattr(resource, name)
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))
        applied[name] = soft
    return applied
