"""The loader's settings: ``services.loader`` in ``xcore.yaml`` (or ``XCORE_SERVICES__LOADER__*``).

services:
  loader:
    debounce_ms: 50
    max_archive_mb: 20
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LoaderSettings"]


class LoaderSettings(BaseModel):
    """Validated with ``settings.section("loader", LoaderSettings)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The watcher waits this long without a new change before it asks for a reload.
    debounce_ms: int = Field(default=50, ge=1, le=10_000)
    #: ... but never groups changes for longer than this.
    max_debounce_ms: int = Field(default=1_000, ge=1, le=60_000)
    #: Largest upload / unpacked plugin accepted by an install, in MiB.
    max_archive_mb: float = Field(default=20.0, gt=0)
    #: Most files a plugin may hold.
    max_files: int = Field(default=2_000, ge=1)
    #: How long the loader waits for the router's answer to a mount.
    mount_timeout: float = Field(default=10.0, gt=0)
    #: How long an on_load / on_unload hook may run before the step counts as failed.
    hook_timeout: float = Field(default=30.0, gt=0)
    #: How long importing a plugin (its package, run.py, router.py) may take.
    import_timeout: float = Field(default=30.0, gt=0)
    #: How long reading a plugin's files (manifest, config, digest) may take.
    io_timeout: float = Field(default=10.0, gt=0)
    #: Watcher reloads of one plugin allowed per minute before its reloads are paused.
    max_reloads_per_minute: int = Field(default=60, ge=1)
    #: While a generation is built, the interpreter's switch interval is lowered to
    #: this (ms), so the event loop gets the interpreter back from the building thread
    #: quickly; 0 keeps the interpreter's (see services/loader/priority.py).
    build_switch_interval_ms: float = Field(default=0.25, ge=0, le=100)
    #: While a generation is built, full collections of the cyclic GC are deferred (one
    #: runs every few builds instead of one or two per build).
    defer_full_gc: bool = True
    #: FastAPI's per-field validators of a plugin's routes are built at the end of its
    #: import, one at a time and paced, before it is mounted (services/loader/lazy.py);
    #: false: each while its route is declared. Either way a type pydantic cannot build
    #: refuses the plugin at load; routes declared outside a plugin build are FastAPI's.
    lazy_validators: bool = True
    #: While a generation is built, threads building routes compute at most this share
    #: of the wall time, pausing between routes (kernel/pacing.py); 1 turns it off.
    build_cpu_share: float = Field(default=0.3, gt=0, le=1)
    #: While a generation is built (and paced), a thread building routes waits up to
    #: this (ms) per route or validator while the event loop has work (plugin requests
    #: in flight, uvicorn reading or writing, the kernel's tasks), so requests find at
    #: most one unit of build work in their way (kernel/pacing.py); 0: off.
    build_yield_ms: float = Field(default=5.0, ge=0, le=1000)
    #: Whether the wait above also counts the event loop's own work (its selector is
    #: watched: kernel/pacing.py ``watch_loop``), not only plugin requests in flight.
    #: ``build_fine_yield`` (on by default) watches the loop too; alone, looking only
    #: between units, it made reloads 1.1-1.5x longer for a neighbour p99 that did not
    #: move beyond the noise (the hand-overs happen inside units).
    build_watch_loop: bool = False
    #: Whether a paced build thread also looks for the event loop's work between every
    #: two function calls it makes, not only between units, and gives way then
    #: (kernel/pacing.py ``_new_hook``): requests stop paying an interpreter hand-over
    #: at each of their system calls. Costs the build about twice its CPU time (a profile
    #: function in the build threads while the window is paced).
    build_fine_yield: bool = True
    #: Whether plugin files over ~12 lines are parsed, compiled and run in pieces with
    #: the event loop served between two (services/loader/source.py), instead of one
    #: parse of 20-30 ms per 900 lines that holds the interpreter. Off: each file is
    #: one code object, as Python imports it (docs/plugins.md lists the differences).
    parse_in_pieces: bool = True
    #: The mode of plugins installed from an archive (``xcore plugin install``, the
    #: admin API's upload): ``manifest`` keeps the one their manifest declares;
    #: ``sandboxed`` runs third-party code sandboxed whatever its manifest says.
    archive_mode: Literal["manifest", "sandboxed"] = "manifest"
    #: How long an admin request (reload, install, uninstall, enable, disable) waits for
    #: its outcome before it is answered 202 with its place in the loader's queue and a
    #: URL to follow it; default: the kernel's ``request_timeout``.
    admin_wait: float | None = Field(default=None, gt=0)
    #: Most requests (reload, install, uninstall, enable, disable) waiting in the loader's
    #: line: past it the admin API refuses a new one at once (429 with Retry-After,
    #: nothing recorded); a reload that joins one already queued is not a new one.
    max_queued: int = Field(default=1_000, ge=1, le=100_000)
