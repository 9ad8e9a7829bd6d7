"""The sandbox's settings: ``services.sandbox`` in ``xcore.yaml`` (or ``XCORE_SERVICES__SANDBOX__*``).

services:
  sandbox:
    level: auto            # auto | bwrap | rlimits
    memory_mb: 1024        # defaults a manifest's ``limits`` may lower, or raise up to max_*
    max_memory_mb: 4096
    allow_network: false   # a manifest's ``network: true`` is honoured only when true

Units: sizes in MiB, times in seconds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SandboxSettings"]


class SandboxSettings(BaseModel):
    """Validated with ``settings.section("sandbox", SandboxSettings)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Isolation: ``bwrap`` (namespaces + rlimits; needs bubblewrap), ``rlimits`` (limits
    #: and an allowlisted environment only), ``auto`` (bwrap when it works here).
    level: Literal["auto", "bwrap", "rlimits"] = "auto"
    #: The user workers run as when the kernel runs as root (``auto``: ``nobody``);
    #: ``""`` keeps the kernel's user. Ignored when the kernel is not root.
    user: str = "auto"

    #: Address space of a worker (RLIMIT_AS).
    memory_mb: float = Field(default=1024, ge=128)
    #: CPU seconds a worker may use in its life (RLIMIT_CPU); reaching it restarts it.
    cpu_s: float = Field(default=3600, gt=0)
    #: Wall time of one call (a request, a task run, a hook), enforced by the supervisor.
    wall_time_s: float = Field(default=30, gt=0)
    #: Open files of a worker (RLIMIT_NOFILE).
    open_files: int = Field(default=256, ge=32)
    #: Processes and threads a worker may add (RLIMIT_NPROC above what its user runs).
    processes: int = Field(default=64, ge=16)
    #: Largest file a worker may write (RLIMIT_FSIZE).
    file_size_mb: float = Field(default=64, gt=0)

    #: Ceilings: how far a manifest's ``limits`` may raise the defaults above.
    max_memory_mb: float = Field(default=4096, gt=0)
    max_cpu_s: float = Field(default=86400, gt=0)
    max_wall_time_s: float = Field(default=600, gt=0)
    max_open_files: int = Field(default=4096, ge=32)
    max_processes: int = Field(default=512, ge=16)
    max_file_size_mb: float = Field(default=4096, gt=0)

    #: Whether a manifest's ``network: true`` gets a network (bwrap level).
    allow_network: bool = False
    #: Largest request body a sandboxed route accepts (larger: 413).
    max_body_mb: float = Field(default=10, gt=0)
    #: Environment variables passed to workers besides the fixed allowlist.
    env_allow: list[str] = Field(default_factory=list)
    #: Types of the kernel's and services' own events that sandboxed plugins may
    #: subscribe to (by default they see only plugins' events: the kernel's describe
    #: tokens and other plugins).
    kernel_events: list[str] = Field(default_factory=list)

    #: How often the supervisor pings a worker, and how long a pong may take.
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_timeout_s: float = Field(default=10.0, gt=0)
    #: How long a worker may take to import the plugin and run ``on_load``.
    start_timeout_s: float = Field(default=30.0, gt=0)
    #: How long a stopping worker may take (``on_unload`` included) before it is killed.
    stop_grace_s: float = Field(default=5.0, gt=0)
    #: How long a cancelled call's code may take to stop before the worker is killed.
    cancel_grace_s: float = Field(default=2.0, gt=0)

    #: Restart backoff: first delay, doubled per crash, capped.
    restart_backoff_s: float = Field(default=0.5, ge=0)
    restart_backoff_max_s: float = Field(default=30.0, ge=0)
    #: The circuit opens after this many crashes within ``circuit_window_s``.
    circuit_crashes: int = Field(default=3, ge=1)
    circuit_window_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _ceilings(self) -> SandboxSettings:
        for key in ("memory_mb", "cpu_s", "wall_time_s", "open_files", "processes", "file_size_mb"):
            if getattr(self, key) > getattr(self, f"max_{key}"):
                raise ValueError(f"{key} ({getattr(self, key)}) exceeds max_{key}")
        return self
