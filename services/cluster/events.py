"""The cluster's events: the public contract of ``services/cluster``.

A node's life is on its own stream ``node-<id>``: ``NodeStarted``, then a
``NodeHeartbeat`` every ``heartbeat_s``, then ``NodeStopped`` — or ``NodeLost``,
recorded by a surviving node once the heartbeats went stale (claimed with an expected
version on that stream, so one survivor records it). Plugin archives installed through
one node are stored content-addressed in the database: ``PluginArchiveStored`` tells
the other nodes where to materialize them from.
"""

from __future__ import annotations

from kernel.events import Event

__all__ = [
    "ARCHIVES_STREAM",
    "NodeHeartbeat",
    "NodeLost",
    "NodeStarted",
    "NodeStopped",
    "PluginArchiveStored",
    "node_stream",
]

ARCHIVES_STREAM = "cluster-archives"


def node_stream(node: str) -> str:
    return f"node-{node}"


class NodeStarted(Event):
    node: str
    boot: str
    version: str
    pid: int
    host: str
    port: int
    #: Seconds between heartbeats; a node is stale after ``stale_after_s`` without one.
    heartbeat_s: float
    stale_after_s: float


class NodeHeartbeat(Event):
    node: str
    boot: str
    #: Runs this node holds (started and not ended), by run id.
    runs: list[str] = []


class NodeStopped(Event):
    node: str
    boot: str


class NodeLost(Event):
    """``node`` stopped heartbeating; its runs in progress are recorded as failed."""

    node: str
    boot: str
    last_heartbeat: float
    #: The node that noticed and recorded it.
    by: str
    runs_failed: list[str] = []


class PluginArchiveStored(Event):
    """The content of plugin ``name`` (as installed through ``node``) is in the database."""

    name: str
    #: The sha256 of the plugin folder's files (``archives.tree_digest``): the key.
    digest: str
    size: int
    node: str
