"""The cluster as every node sees it: a fold of the shared log.

Nodes (their boot, last heartbeat, state), the plugin generations and digests each
serves (``PluginLoaded``/``PluginUnloaded`` carry the node in their metadata), the runs
each holds (``TaskStarted`` claimed by it and not yet ended), and the plugin archives
that make up the cluster's installed plugins. Being a fold of the shared log, it is the
same on every node once caught up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kernel import Projection, Recorded, handles
from kernel.errors import XcoreError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["ClusterView", "HeldRun", "NodeRow", "served_digests"]


#: How many recent claims a node remembers (a run claimed earlier is long done).
MAX_CLAIMS = 100_000
#: The claim lag is the largest delay of the claims committed in this many seconds.
LAG_WINDOW_S = 10.0


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


@dataclass
class HeldRun:
    task: str
    run_id: str
    attempt: int
    scheduled_for: float
    started_at: float


@dataclass
class NodeRow:
    node: str
    boot: str = ""
    state: str = "up"  # up | stopped | lost
    host: str = ""
    port: int = 0
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    heartbeat_s: float = 2.0
    stale_after_s: float = 10.0
    #: version of the node's stream (a NodeLost claim expects it)
    stream_version: int = 0
    #: plugin name -> {"generation", "version", "digest"}
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, HeldRun] = field(default_factory=dict)

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "boot": self.boot,
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "version": self.version,
            "started_at": iso(self.started_at),
            "last_heartbeat": iso(self.last_heartbeat),
            "heartbeat_age_s": round(now - self.last_heartbeat, 3),
            "stale": self.state == "up" and now - self.last_heartbeat > self.stale_after_s,
            "plugins": dict(sorted(self.plugins.items())),
            "runs": [
                {
                    "task": r.task,
                    "run_id": r.run_id,
                    "attempt": r.attempt,
                    "scheduled_for": iso(r.scheduled_for),
                    "started_at": iso(r.started_at),
                }
                for r in self.runs.values()
            ],
        }


class ClusterView(Projection):
    name = "cluster"

    def reset(self) -> None:
        self.nodes: dict[str, NodeRow] = {}
        #: run id -> node holding it
        self.holders: dict[str, str] = {}
        #: plugin name -> (digest, size, node) of its installed archive
        self.archives: dict[str, tuple[str, int, str]] = {}
        #: plugin name -> every archive digest the cluster stored for it
        self.stored: dict[str, set[str]] = {}
        #: plugin name -> the digests of the copies the cluster put on its nodes, for a
        #: plugin uninstalled since (a node that was down then removes its copy at start)
        self.uninstalled: dict[str, set[str]] = {}
        #: ids of the recent ``TaskStarted`` (claims), oldest first, bounded
        self.claims: dict[str, None] = {}
        #: (commit time, delay) of recent claims, a sliding-window maximum: delays
        #: decrease from front to back, so the front is the largest of the window
        self._lags: deque[tuple[float, float]] = deque()

    def node(self, name: str) -> NodeRow:
        row = self.nodes.get(name)
        if row is None:
            row = self.nodes[name] = NodeRow(node=name)
        return row

    def alive(self, now: float) -> list[str]:
        return sorted(
            n.node
            for n in self.nodes.values()
            if n.state == "up" and now - n.last_heartbeat <= n.stale_after_s
        )

    def claim_lag(self, now: float) -> float:
        """How late after their due time the cluster's claims commit: the largest delay
        of the claims committed in the last ``LAG_WINDOW_S`` seconds (0 without any).

        A node that is not first in a run's ranking waits this long on top of its
        grace: a loaded cluster claims seconds late, and racing the first node then
        only adds a losing claim per run to the load (see ``placement.py``).
        """
        lags = self._lags
        while lags and lags[0][0] < now - LAG_WINDOW_S:
            lags.popleft()
        return lags[0][1] if lags else 0.0

    def _note_lag(self, committed: float, lag: float) -> None:
        lags = self._lags
        while lags and lags[-1][1] <= lag:
            lags.pop()
        lags.append((committed, lag))
        while lags[0][0] < committed - LAG_WINDOW_S:
            lags.popleft()

    def digest_differences(self) -> dict[str, dict[str, str | None]]:
        """Plugins whose digest is not the same on every live node: name -> node -> digest."""
        up = [n for n in self.nodes.values() if n.state == "up"]
        names = {p for n in up for p in n.plugins}
        out: dict[str, dict[str, str | None]] = {}
        for name in sorted(names):
            digests = {n.node: n.plugins.get(name, {}).get("digest") for n in up}
            if len(set(digests.values())) > 1:
                out[name] = digests
        return out

    # -- nodes -------------------------------------------------------------------------

    @handles("NodeStarted")
    def _started(self, r: Recorded) -> None:
        d = r.data
        row = self.node(d["node"])
        row.boot, row.state, row.host, row.port = d["boot"], "up", d["host"], d["port"]
        row.pid, row.version = d["pid"], d["version"]
        row.heartbeat_s, row.stale_after_s = d["heartbeat_s"], d["stale_after_s"]
        row.started_at = row.last_heartbeat = r.timestamp
        row.stream_version = r.version
        row.plugins = {}  # a new process serves nothing yet

    @handles("NodeHeartbeat")
    def _heartbeat(self, r: Recorded) -> None:
        row = self.node(r.data["node"])
        if r.data["boot"] == row.boot:
            row.last_heartbeat = r.timestamp
        row.stream_version = r.version

    @handles("NodeStopped")
    def _stopped(self, r: Recorded) -> None:
        row = self.node(r.data["node"])
        if r.data["boot"] == row.boot:
            row.state = "stopped"
            row.plugins = {}
        row.stream_version = r.version

    @handles("NodeLost")
    def _lost(self, r: Recorded) -> None:
        row = self.node(r.data["node"])
        if r.data["boot"] == row.boot:
            row.state = "lost"
            row.plugins = {}
        row.stream_version = r.version

    # -- what each node serves and holds -------------------------------------------------

    @handles("PluginLoaded")
    def _plugin_loaded(self, r: Recorded) -> None:
        if r.meta.node is None:
            return
        d = r.data
        self.node(r.meta.node).plugins[d["name"]] = {
            "generation": d["generation"],
            "version": d["version"],
            "digest": d.get("digest"),
        }

    @handles("PluginUnloaded")
    def _plugin_unloaded(self, r: Recorded) -> None:
        if r.meta.node is None:
            return
        plugins = self.node(r.meta.node).plugins
        current = plugins.get(r.data["name"])
        if current is not None and current["generation"] == r.data["generation"]:
            del plugins[r.data["name"]]

    @handles("TaskStarted")
    def _run_started(self, r: Recorded) -> None:
        if r.meta.node is None:
            self.claims[r.meta.id] = None
            return
        d = r.data
        self.node(r.meta.node).runs[d["run_id"]] = HeldRun(
            d["task"], d["run_id"], d.get("attempt", 1), d["scheduled_for"], r.timestamp
        )
        self.holders[d["run_id"]] = r.meta.node
        self.claims[r.meta.id] = None
        # a due time to be late for; a takeover's delay is its node's wait, which
        # depends on the lag: counting it made the lag feed itself (grace + 2 * lag per
        # takeover, up to stale_after_s within seconds of a node's death)
        if d.get("trigger", "schedule") == "schedule" and not d.get("takeover"):
            self._note_lag(r.timestamp, max(0.0, r.timestamp - d["scheduled_for"]))
        if len(self.claims) > MAX_CLAIMS:
            del self.claims[next(iter(self.claims))]

    @handles("TaskSucceeded", "TaskFailed", "TaskReleased")
    def _run_ended(self, r: Recorded) -> None:
        holder = self.holders.pop(r.data["run_id"], None)
        if holder is not None:
            self.nodes[holder].runs.pop(r.data["run_id"], None)

    # -- the cluster's installed plugins ---------------------------------------------------

    @handles("PluginArchiveStored")
    def _archive(self, r: Recorded) -> None:
        d = r.data
        self.archives[d["name"]] = (d["digest"], d["size"], d["node"])
        self.stored.setdefault(d["name"], set()).add(d["digest"])
        self.uninstalled.pop(d["name"], None)

    @handles("PluginUninstalled")
    def _uninstalled(self, r: Recorded) -> None:
        name = r.data["name"]
        self.archives.pop(name, None)
        if name in self.stored:
            self.uninstalled[name] = self.stored[name]


def served_digests(kernel: Kernel, name: str) -> dict[str, str | None] | None:
    """The digest of ``name`` each live node serves, or None outside a cluster.

    For the loader's ``/admin/plugins``: a plugin whose digests differ is flagged.
    """
    try:
        view = kernel.projection(ClusterView)
    except XcoreError:
        return None
    return {
        n.node: n.plugins.get(name, {}).get("digest")
        for n in sorted(view.nodes.values(), key=lambda n: n.node)
        if n.state == "up"
    }
