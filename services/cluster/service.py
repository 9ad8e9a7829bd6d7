"""The cluster service: this node's membership, its watch over the others, shared plugins.

Guarantees, with several nodes on one PostgreSQL log (docs/cluster.md):

- every node records ``NodeStarted``, a ``NodeHeartbeat`` every ``heartbeat_s`` and
  ``NodeStopped``; ``GET /admin/nodes`` shows every node, caught up from the log;
- a node whose stream showed no new heartbeat in this node's view for ``stale_after_s``
  seconds of this node's own clock (never by comparing this clock with the other node's
  timestamps: a node whose clock is behind by more was lost at every beat) is recorded
  ``NodeLost`` by exactly one survivor (an append expecting the version of the node's stream it last
  saw: a late heartbeat or another survivor's claim makes it fail), which then records
  each run the lost node held as ``TaskFailed(kind="node_lost")``;
- a plugin installed through any node is packed, stored content-addressed in the
  database (``PluginArchiveStored``) and materialized by every other node, now or when
  it starts later, before its loader boots; the other requests (reload, enable,
  disable, uninstall) are applied by every node's loader from the shared log.

Mechanism: one asyncio task per node runs an anyio task group with the heartbeat and
the watch; a subscription reacts to installs. Everything stops with the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio

from kernel.errors import ConcurrencyError, XcoreError
from kernel.events import NewEvent, Recorded
from kernel.placement import Alone
from services.cluster import archives
from services.cluster.config import ClusterSettings
from services.cluster.events import (
    ARCHIVES_STREAM,
    NodeHeartbeat,
    NodeLost,
    NodeStarted,
    NodeStopped,
    PluginArchiveStored,
    node_stream,
)
from services.cluster.placement import Rendezvous
from services.cluster.projection import ClusterView, HeldRun, NodeRow, iso
from services.loader import installer
from services.loader.events import PluginInstalled, PluginReloadRequested
from services.loader.events import stream_of as plugin_stream
from services.scheduler.events import TaskFailed
from services.scheduler.events import stream_of as task_stream

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["ACTOR", "ClusterService"]

log = logging.getLogger("xcore.cluster")

#: The actor of the node-local requests this service records (the loader of another
#: node ignores them).
ACTOR = "cluster"


class ClusterService:
    name = "cluster"
    #: Before the scheduler (100) claims runs and before the loader (200) boots plugins.
    order = 50

    def __init__(self) -> None:
        self.kernel: Kernel | None = None
        self.settings = ClusterSettings()
        self.view: ClusterView | None = None
        self.enabled = False
        self._task: asyncio.Task[None] | None = None
        self._archive_lock = asyncio.Lock()
        #: node -> (boot, version of its stream, this node's monotonic time when the view
        #: first showed that version): staleness is judged on one clock, this node's
        self._seen: dict[str, tuple[str, int, float]] = {}

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        self.kernel = kernel
        settings = self.settings = kernel.settings.section("cluster", ClusterSettings)
        self.enabled = (
            settings.enabled
            if settings.enabled is not None
            else kernel.settings.store == "postgres"
        )
        if not self.enabled:
            return
        if settings.stale_after_s <= settings.heartbeat_s:
            raise XcoreError(
                "services.cluster.stale_after_s must be longer than heartbeat_s "
                f"({settings.stale_after_s} <= {settings.heartbeat_s})"
            )
        view = self.view = await kernel.add_projection(ClusterView())
        kernel.placement = Rendezvous(
            view, kernel.node, settings.claim_grace_s, max_lag=settings.stale_after_s
        )
        stack.callback(setattr, kernel, "placement", Alone())
        await self._record_started()
        stack.push_async_callback(self._record_stopped)
        await self._materialize_all()
        await kernel.subscribe(
            self._on_event,
            start="now",
            types=[PluginInstalled, PluginArchiveStored, NodeLost, NodeStarted],
        )
        self._task = asyncio.create_task(self._run(), name="xcore-cluster")
        stack.push_async_callback(self._stop_task)

        from services.cluster.admin import build_router

        kernel.http.add_admin_router(build_router(self))

    def _kernel(self) -> Kernel:
        if self.kernel is None:
            raise RuntimeError("the cluster service is not started")
        return self.kernel

    # -- membership ----------------------------------------------------------------------

    async def _record_started(self) -> None:
        kernel = self._kernel()
        s = kernel.settings
        await kernel.append(
            NodeStarted(
                node=kernel.node,
                boot=kernel.boot,
                version=kernel.version,
                pid=os.getpid(),
                host=socket.gethostname(),
                port=s.port,
                heartbeat_s=self.settings.heartbeat_s,
                stale_after_s=self.settings.stale_after_s,
            ),
            stream=node_stream(kernel.node),
            actor=ACTOR,
        )
        await kernel.settle()

    async def _record_stopped(self) -> None:
        kernel = self._kernel()
        try:
            await kernel.append(
                NodeStopped(node=kernel.node, boot=kernel.boot),
                stream=node_stream(kernel.node),
                actor=ACTOR,
            )
        except Exception:
            log.exception("could not record NodeStopped")

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats)
            tg.start_soon(self._watch)

    async def _heartbeats(self) -> None:
        kernel = self._kernel()
        assert self.view is not None
        while True:
            await anyio.sleep(self.settings.heartbeat_s)
            me = self.view.nodes.get(kernel.node)
            runs = list(me.runs) if me is not None else []
            try:
                await kernel.append(
                    NodeHeartbeat(node=kernel.node, boot=kernel.boot, runs=runs),
                    stream=node_stream(kernel.node),
                    actor=ACTOR,
                )
            except Exception as exc:  # the store retries and reports; keep beating
                log.warning("node %s: heartbeat not recorded: %s", kernel.node, exc)

    async def _watch(self) -> None:
        """Record as lost the nodes whose heartbeat went stale (one survivor does)."""
        kernel = self._kernel()
        view = self.view
        assert view is not None
        # judge others once every service of this node runs (the scheduler must have its
        # tasks to retry the runs of a lost node)
        while not kernel.started:  # noqa: ASYNC110 - a flag of the Kernel, not an event
            await anyio.sleep(0.05)
        while True:
            await anyio.sleep(self.settings.heartbeat_s / 2)
            now = time.monotonic()
            for row in list(view.nodes.values()):
                if row.node != kernel.node and row.state == "lost" and row.runs:
                    # recorded lost, but its runs not (yet) failed: the survivor that
                    # recorded it may have died in between; each survivor fails them,
                    # under ids that make the log store each failure once
                    try:
                        await self._fail_runs(row)
                    except Exception:
                        log.exception("could not fail the runs of lost node %s", row.node)
                if row.node == kernel.node or row.state != "up":
                    continue
                # the view (which the NodeLost append expects the version of) shows a
                # new beat: its silence is timed from now on, on this node's clock
                seen = self._seen.get(row.node)
                if seen is None or seen[:2] != (row.boot, row.stream_version):
                    self._seen[row.node] = (row.boot, row.stream_version, now)
                    continue
                if now - seen[2] <= row.stale_after_s:
                    continue
                try:
                    await self._declare_lost(row.node)
                except Exception:
                    log.exception("could not record node %s as lost", row.node)

    async def _declare_lost(self, node: str) -> None:
        kernel = self._kernel()
        view = self.view
        assert view is not None
        row = view.nodes[node]
        if row.state != "up":
            return
        runs = list(row.runs.values())
        try:
            await kernel.append(
                NodeLost(
                    node=node,
                    boot=row.boot,
                    last_heartbeat=row.last_heartbeat,
                    by=kernel.node,
                    runs_failed=[r.run_id for r in runs],
                ),
                stream=node_stream(node),
                expected_version=row.stream_version,
                actor=ACTOR,
            )
        except ConcurrencyError:
            return  # it beat again, or another survivor recorded it
        log.warning(
            "node %s lost (last heartbeat %s); failing its %d run(s)",
            node,
            iso(row.last_heartbeat),
            len(runs),
        )
        await self._fail_runs(row, runs)

    async def _fail_runs(self, row: NodeRow, runs: list[HeldRun] | None = None) -> None:
        """Record each run lost node ``row`` held as ``TaskFailed(kind="node_lost")``.

        Each failure's id is derived from the node's boot and the run, so any number of
        survivors may record them, at any time after ``NodeLost``: the log keeps one."""
        kernel = self._kernel()
        for run in runs if runs is not None else list(row.runs.values()):
            failed = TaskFailed(
                task=run.task,
                run_id=run.run_id,
                attempt=run.attempt,
                error=(
                    f"node lost: {row.node} stopped heartbeating at {iso(row.last_heartbeat)} "
                    "while this run was in progress"
                ),
                kind="node_lost",
                scheduled_for=run.scheduled_for,
            )
            key = hashlib.blake2b(
                f"node_lost|{row.node}|{row.boot}|{run.run_id}".encode(), digest_size=16
            ).hexdigest()
            await kernel.append(
                NewEvent.of(failed, kernel._meta(ACTOR, None, id=key), explicit_id=True),
                stream=task_stream(run.task),
            )

    # -- shared plugins --------------------------------------------------------------------

    async def _on_event(self, r: Recorded) -> None:
        kernel = self._kernel()
        if r.type == PluginInstalled.type_name and r.meta.node == kernel.node:
            await self._store_archive(r)
        elif r.type == PluginArchiveStored.type_name and r.data["node"] != kernel.node:
            if await self._materialize(r.data["name"], r.data["digest"]):
                await kernel.append(
                    PluginReloadRequested(
                        name=r.data["name"],
                        reason=f"installed through node {r.data['node']} (archive {r.data['digest'][:12]})",
                    ),
                    stream=plugin_stream(r.data["name"]),
                    actor=ACTOR,
                    cause=r,
                )
        elif r.type == NodeStarted.type_name:
            if r.data["node"] == kernel.node and r.data["boot"] != kernel.boot:
                log.error(
                    "another process (pid %s on %s) started with this node's id %r: node ids "
                    "must be unique in a cluster (setting 'node')",
                    r.data["pid"],
                    r.data["host"],
                    kernel.node,
                )
        elif r.type == NodeLost.type_name and (r.data["node"], r.data["boot"]) == (
            kernel.node,
            kernel.boot,
        ):
            # we were presumed dead (a pause, a partition): say we are back
            log.error("this node was recorded as lost by %s; rejoining", r.data["by"])
            await self._record_started()

    async def _store_archive(self, r: Recorded) -> None:
        kernel = self._kernel()
        put = getattr(kernel.store, "put_archive", None)
        if put is None:
            return  # a store without blobs: one machine, nothing to share
        name = r.data["name"]
        folder = kernel.settings.plugins_dir / name
        try:
            digest, data = await anyio.to_thread.run_sync(
                archives.pack, folder, self.settings.max_archive_bytes
            )
        except (archives.ArchiveError, OSError) as exc:
            log.error("plugin %r: not shared with the other nodes: %s", name, exc)
            return
        await put(digest, name, data)
        await kernel.append(
            PluginArchiveStored(name=name, digest=digest, size=len(data), node=kernel.node),
            stream=ARCHIVES_STREAM,
            actor=ACTOR,
            cause=r,
        )

    async def _materialize(self, name: str, digest: str) -> bool:
        """Make ``plugins_dir/name`` hold archive ``digest``; True if it changed."""
        kernel = self._kernel()
        get = getattr(kernel.store, "get_archive", None)
        if get is None:
            return False
        folder = kernel.settings.plugins_dir / name
        async with self._archive_lock:
            if folder.is_dir():
                local = await anyio.to_thread.run_sync(archives.tree_digest, folder)
                if local == digest:
                    return False
            data = await get(digest)
            if data is None:
                log.error("plugin %r: archive %s is not in the database", name, digest[:12])
                return False
            try:
                await anyio.to_thread.run_sync(
                    archives.materialize, name, digest, data, kernel.settings.plugins_dir
                )
            except (archives.ArchiveError, OSError) as exc:
                log.error("plugin %r: cannot materialize archive %s: %s", name, digest[:12], exc)
                return False
        log.info("plugin %r: materialized archive %s", name, digest[:12])
        return True

    async def _materialize_all(self) -> None:
        """At start, before the loader boots: every installed plugin as the cluster has it,
        and no copy of a plugin the cluster uninstalled while this node was down."""
        assert self.view is not None
        for name, digests in sorted(self.view.uninstalled.items()):
            await self._remove_uninstalled(name, digests)
        for name, (digest, _, _) in sorted(self.view.archives.items()):
            await self._materialize(name, digest)

    async def _remove_uninstalled(self, name: str, digests: set[str]) -> None:
        """Remove this node's copy of ``name``, uninstalled in the cluster, if it is one
        the cluster put there (a folder changed by hand is left, and said so)."""
        folder = self._kernel().settings.plugins_dir / name
        if not folder.is_dir():
            return
        try:
            local = await anyio.to_thread.run_sync(archives.tree_digest, folder)
            if local not in digests:
                log.warning(
                    "plugin %r was uninstalled in the cluster, but this node's copy (%s) is "
                    "not one the cluster installed: left in place",
                    name,
                    local[:12],
                )
                return
            await anyio.to_thread.run_sync(installer.remove_plugin, folder)
        except OSError as exc:
            log.error(
                "plugin %r: uninstalled in the cluster, cannot remove %s: %s", name, folder, exc
            )
            return
        log.info("plugin %r: uninstalled in the cluster while this node was down: removed", name)

    # -- reading -----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        kernel = self._kernel()
        view = self.view
        assert view is not None
        now = time.time()
        return {
            "node": kernel.node,
            "alive": view.alive(now),
            "nodes": [row.to_dict(now) for _, row in sorted(view.nodes.items())],
            "plugin_digest_differences": view.digest_differences(),
        }
