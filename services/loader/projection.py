"""The state of every plugin, folded from the log: what the admin API and the CLI show.

One row per plugin ever seen: whether it is enabled (the desired state, kept across
restarts), which generation serves (if any), its version, mode, prefix, routes, tasks
and the last error. ``KernelStarted`` marks every generation of the previous process as
gone: after a restart nothing is loaded until this boot's loader records it again.
"""

from __future__ import annotations

import copy
from typing import Any

from kernel.events import Recorded
from kernel.projections import Projection, handles

from .events import (
    PluginDisabled,
    PluginDiscovered,
    PluginEnabled,
    PluginInstalled,
    PluginLoaded,
    PluginLoadFailed,
    PluginReloaded,
    PluginReloadFailed,
    PluginUninstalled,
    PluginUnloaded,
)

__all__ = ["PluginTable"]


def _empty(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "unloaded",  # loaded | failed | unloaded | disabled
        "enabled": True,
        "version": None,
        "mode": None,
        "generation": None,
        "prefix": None,
        "routes": [],
        "tasks": [],
        "digest": None,
        "path": None,
        "source": None,
        "last_error": None,
        "loaded_at": None,
        "reloads": 0,
        "last_generation": 0,
    }


class PluginTable(Projection):
    """``rows[name]``: the public state of each plugin; ``live[name]``: loaded generations."""

    name = "loader.plugins"
    schema = 1
    snapshot_every = 1000

    def reset(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        #: generation -> the PluginLoaded data of each generation loaded right now
        self.live: dict[str, dict[int, dict[str, Any]]] = {}

    def row(self, name: str) -> dict[str, Any]:
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = _empty(name)
        return row

    def get(self, name: str) -> dict[str, Any] | None:
        row = self.rows.get(name)
        return copy.deepcopy(row) if row is not None else None

    def all(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(self.rows[n]) for n in sorted(self.rows)]

    def disabled(self) -> set[str]:
        return {n for n, r in self.rows.items() if not r["enabled"]}

    # -- folding ---------------------------------------------------------------------

    def _serve(self, row: dict[str, Any], data: dict[str, Any], at: float) -> None:
        row.update(
            status="loaded",
            version=data["version"],
            mode=data["mode"],
            generation=data["generation"],
            prefix=data.get("prefix"),
            routes=list(data.get("routes", [])),
            tasks=list(data.get("tasks", [])),
            digest=data.get("digest"),
            loaded_at=at,
        )

    def _idle(self, row: dict[str, Any]) -> str:
        return "unloaded" if row["enabled"] else "disabled"

    @handles("KernelStarted")
    def _boot(self, r: Recorded) -> None:
        self.live.clear()
        for row in self.rows.values():
            row.update(generation=None, routes=[], status=self._idle(row))

    @handles(PluginDiscovered)
    def _discovered(self, r: Recorded) -> None:
        row = self.row(r.data["name"])
        row["path"] = r.data["path"]
        if row["version"] is None:
            row["version"] = r.data["version"]

    @handles(PluginInstalled)
    def _installed(self, r: Recorded) -> None:
        row = self.row(r.data["name"])
        row.update(source=r.data["source"], version=r.data["version"], digest=r.data["digest"])

    @handles(PluginUninstalled)
    def _uninstalled(self, r: Recorded) -> None:
        self.rows.pop(r.data["name"], None)
        self.live.pop(r.data["name"], None)

    @handles(PluginEnabled)
    def _enabled(self, r: Recorded) -> None:
        row = self.row(r.data["name"])
        row["enabled"] = True
        if row["status"] == "disabled":
            row["status"] = "unloaded"

    @handles(PluginDisabled)
    def _disabled(self, r: Recorded) -> None:
        row = self.row(r.data["name"])
        row["enabled"] = False
        if row["generation"] is None:
            row["status"] = "disabled"

    @handles(PluginLoaded)
    def _loaded(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["name"])
        live = self.live.setdefault(d["name"], {})
        live[d["generation"]] = d
        row["last_generation"] = max(row["last_generation"], d["generation"])
        if row["generation"] is None:
            # a first load; during a reload the old generation serves until it is unloaded
            self._serve(row, d, r.timestamp)
            row["last_error"] = None

    @handles(PluginUnloaded)
    def _unloaded(self, r: Recorded) -> None:
        name, gen = r.data["name"], r.data["generation"]
        row = self.row(name)
        live = self.live.setdefault(name, {})
        live.pop(gen, None)
        if row["generation"] == gen:
            if live:  # the new generation of a reload takes over
                self._serve(row, live[max(live)], r.timestamp)
            else:
                row.update(generation=None, routes=[], status=self._idle(row))

    @handles(PluginLoadFailed)
    def _load_failed(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["name"])
        row["last_error"] = {"stage": d["stage"], "error": d["error"], "at": r.timestamp}
        if d.get("generation"):
            row["last_generation"] = max(row["last_generation"], d["generation"])
        if row["generation"] is None:
            row["status"] = "failed"

    @handles(PluginReloaded)
    def _reloaded(self, r: Recorded) -> None:
        row = self.row(r.data["name"])
        row["reloads"] += 1
        row["last_error"] = None

    @handles(PluginReloadFailed)
    def _reload_failed(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["name"])
        row["last_error"] = {"stage": d["stage"], "error": d["error"], "at": r.timestamp}
        if d.get("generation"):
            row["last_generation"] = max(row["last_generation"], d["generation"])
        if row["generation"] is None and d["stage"] != "disabled":
            row["status"] = "failed"

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> Any:
        return {
            "rows": self.rows,
            "live": {n: {str(g): d for g, d in gens.items()} for n, gens in self.live.items()},
        }

    def restore(self, state: Any) -> None:
        self.rows = state["rows"]
        self.live = {n: {int(g): d for g, d in gens.items()} for n, gens in state["live"].items()}
