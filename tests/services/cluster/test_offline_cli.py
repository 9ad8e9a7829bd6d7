"""``xcore plugin`` with the server down, on a node of a cluster (``store: postgres``).

Offline, an install or uninstall wrote the plugins folder of this machine and a local
SQLite log no node reads: the other nodes never got the change and this node's next
start did not see its record. It is refused now, naming the way (a running node);
``list`` reads the cluster's log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest

from kernel.events import Meta, NewEvent
from kernel.store.postgres import PostgresStore
from services.loader.events import PluginInstalled, stream_of
from tests.services.loader.conftest import write_plugin
from tests.services.loader.test_cli import xcore as plugin_cli

pytestmark = pytest.mark.postgres


def xcore(cwd: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return plugin_cli(cwd, *args, store="postgres", dsn=dsn, node="n1")


def stray_logs(root: Path) -> list[Path]:
    """SQLite logs under ``root`` (an offline change made one nobody reads)."""
    return list(root.rglob("*.db"))


async def test_offline_changes_are_refused_in_a_cluster_and_list_reads_its_log(
    tmp_path: Path, pg_dsn: str
) -> None:
    src = write_plugin(tmp_path / "src", "offline")
    out = await anyio.to_thread.run_sync(xcore, tmp_path, pg_dsn, "install", str(src))
    assert out.returncode == 1
    assert "install offline: no xcore server answers" in out.stderr
    assert "must go through a running node" in out.stderr
    assert not (tmp_path / "plugins" / "offline").exists()
    (tmp_path / "plugins" / "kept").mkdir(parents=True)
    out = await anyio.to_thread.run_sync(xcore, tmp_path, pg_dsn, "uninstall", "kept")
    assert out.returncode == 1 and "must go through a running node" in out.stderr
    assert (tmp_path / "plugins" / "kept").is_dir()
    assert not stray_logs(tmp_path)
    # a plugin the cluster installed (through a running node) is listed from its log
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        installed = PluginInstalled(name="shared", version="2.0.0", source="x", digest="d")
        await store.append([NewEvent.of(installed, Meta(node="n2"))], stream=stream_of("shared"))
    finally:
        await store.close()
    listed = await anyio.to_thread.run_sync(xcore, tmp_path, pg_dsn, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "shared" in {r["name"] for r in json.loads(listed.stdout)}
