"""Events of the sandbox supervisor: its public contract (other services may import this).

Stream: ``sandbox-<plugin>``. Every worker's life is recorded: ``SandboxStarted`` (with
its pid, isolation level and limits), then one of ``SandboxStopped`` (asked to stop),
``SandboxLimitExceeded`` (a limit was breached: the process group was killed) or
``SandboxCrashed`` (it died on its own: exit code, signal, the last lines of its stderr).
After a breach or a crash the supervisor records ``SandboxRestarted`` when the next
worker is up, or ``SandboxCircuitOpened`` when it gives up (too many crashes in a
window) until an operator reloads or enables the plugin.
"""

from __future__ import annotations

from typing import Any, Literal

from kernel.events import Event

__all__ = [
    "LimitName",
    "SandboxCircuitOpened",
    "SandboxCrashed",
    "SandboxLimitExceeded",
    "SandboxRestarted",
    "SandboxStarted",
    "SandboxStopped",
    "stream_of",
]

#: memory: address space exhausted; cpu: CPU seconds (RLIMIT_CPU); wall: a call ran
#: longer than its wall time; timeout: a cancelled call's code did not stop (e.g. a task
#: timeout in sync code); heartbeat: the worker stopped answering pings; file_size: a
#: file grew past RLIMIT_FSIZE; processes/files: the worker died of those limits.
LimitName = Literal[
    "memory", "cpu", "wall", "timeout", "heartbeat", "file_size", "processes", "files"
]


def stream_of(plugin: str) -> str:
    return f"sandbox-{plugin}"


class SandboxStarted(Event):
    """A worker of a plugin generation imported the plugin and is serving."""

    plugin: str
    generation: int
    pid: int
    #: ``bwrap`` or ``rlimits``: the isolation in force.
    level: str
    limits: dict[str, Any]
    #: The uid the plugin's code runs as.
    uid: int
    network: bool = False
    duration_ms: float = 0.0
    #: What holds the worker's processes and threads to ``limits.processes``:
    #: ``pids-cgroup`` (holds for root too), ``rlimit`` (RLIMIT_NPROC of an unprivileged
    #: user), or ``watch`` (a root worker without a cgroup: only the supervisor's
    #: once-a-second count, which a fast fork bomb outruns for that second).
    process_limit: str = ""


class SandboxStopped(Event):
    """A worker was stopped on purpose (unload, reload, kernel stop)."""

    plugin: str
    generation: int
    pid: int
    reason: str


class SandboxLimitExceeded(Event):
    """A worker breached a limit; its process group was killed."""

    plugin: str
    generation: int
    pid: int
    limit: LimitName
    #: The limit's value (bytes, seconds or a count).
    value: float
    detail: str = ""


class SandboxCrashed(Event):
    """A worker died on its own (not asked, no limit recognised), or was killed for
    breaking the wire (``detail`` says how)."""

    plugin: str
    generation: int
    pid: int
    exit: int | None = None
    signal: int | None = None
    #: The last lines the worker wrote to stderr.
    stderr: str = ""
    #: Why the supervisor killed it, when it did (it broke the wire: a malformed frame).
    detail: str = ""


class SandboxRestarted(Event):
    """A new worker replaced one that crashed or breached a limit."""

    plugin: str
    generation: int
    pid: int
    attempt: int
    delay_s: float


class SandboxCircuitOpened(Event):
    """Too many crashes in the window: no new worker until a reload or an enable."""

    plugin: str
    generation: int
    crashes: int
    window_s: float
    reason: str
