"""Three real ``xcore serve`` nodes on one PostgreSQL log act as one cluster.

- many tasks firing every second: no run doubled, none lost, while one node is killed
  with SIGKILL mid-way — its runs in progress are failed (node lost) and its tasks are
  taken over by the others;
- a plugin installed through node A answers on node C; a reload asked of node B is
  applied by all three.

The CI variant runs ``TASKS`` tasks for ``SECONDS`` seconds; the issue's full size (200
tasks for a minute) is the ``slow`` variant, run with ``TEST_CLUSTER_FULL=1``.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import signal
import textwrap
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import Server, serve
from tests.pg import pg_schema, require_pg

pytestmark = pytest.mark.postgres

TOKEN = "cluster-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def ticker_plugin(folder: Path, tasks: int, runs_file: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text(
        textwrap.dedent(
            f"""
            import asyncio, os
            from kernel.sdk import current_task, task

            PLUGIN_INFO = {{"version": "1.0.0", "author": "tests"}}
            RUNS = {str(runs_file)!r}
            NODE = os.environ.get("XCORE_NODE", "?")

            def make(i):
                async def tick():
                    ctx = current_task()
                    line = f"t{{i}} {{ctx.scheduled_for.timestamp():.3f}} {{NODE}}\\n"
                    fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    try:
                        os.write(fd, line.encode())
                    finally:
                        os.close(fd)
                    # longer than the period: a node always holds runs in progress
                    # when it dies (with 0.8 s, runs due together left a gap each second
                    # in which the killed node held none, and nothing was failed)
                    await asyncio.sleep(1.5)
                tick.__name__ = f"t{{i}}"
                return task(every="1s", misfire="run_once", max_instances=3)(tick)

            for _i in range({tasks}):
                globals()[f"t{{_i}}"] = make(_i)
            """
        )
    )


def greeter_zip(text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("greet/__init__.py", "")
        z.writestr(
            "greet/run.py",
            'PLUGIN_INFO = {"version": "1.0.0", "author": "tests", "api_prefix": "/app/greet"}\n',
        )
        z.writestr(
            "greet/router.py",
            "from fastapi import APIRouter\n"
            'router = APIRouter(prefix="/app/greet")\n'
            '@router.get("/hi")\n'
            f"def hi():\n    return {{'text': {text!r}}}\n",
        )
    return buf.getvalue()


@contextmanager
def cluster_dsn() -> Iterator[str]:
    require_pg()
    loop = asyncio.new_event_loop()
    ctx = pg_schema()
    try:
        dsn = loop.run_until_complete(ctx.__aenter__())
        yield dsn
    finally:
        loop.run_until_complete(ctx.__aexit__(None, None, None))
        loop.close()


def start_node(tmp: Path, name: str, dsn: str, plugins: Path, stale_after: float = 3) -> Any:
    env = {
        "XCORE_ADMIN_TOKEN": TOKEN,
        "XCORE_DSN": dsn,
        "XCORE_STORE": "postgres",
        "XCORE_NODE": name,
        "XCORE_SERVICES__CLUSTER__HEARTBEAT_S": "0.5",
        "XCORE_SERVICES__CLUSTER__STALE_AFTER_S": str(stale_after),
        "XCORE_SERVICES__SCHEDULER__MAX_CONCURRENCY": "400",
    }
    (tmp / name).mkdir(exist_ok=True)
    return serve(tmp / name, plugins_dir=plugins, env=env, args=("--no-reload",), timeout=90)


def start_nodes(
    stack: ExitStack, tmp: Path, dsn: str, plugins: dict[str, Path], stale_after: float = 3
) -> dict[str, Server]:
    """Start the nodes side by side (each start waits for its health check)."""
    managers = {
        name: start_node(tmp, name, dsn, folder, stale_after) for name, folder in plugins.items()
    }
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = {name: pool.submit(cm.__enter__) for name, cm in managers.items()}
    servers: dict[str, Server] = {}
    failed: BaseException | None = None
    for name, future in futures.items():
        try:
            servers[name] = future.result()
        except Exception as exc:
            failed = failed or exc
        else:
            stack.push(managers[name].__exit__)  # stopped even if another failed to start
    if failed is not None:
        raise failed
    return servers


def events(server: Server, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = httpx.get(
            f"{server.url}/admin/events",
            params={**params, "after": after, "limit": 1000},
            headers=AUTH,
            timeout=30,
        ).json()["events"]
        out.extend(page)
        if len(page) < 1000:
            return out
        after = page[-1]["position"]


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_scheduling(
    tmp_path: Path, tasks: int, seconds: float, stale_after: float = 3, overloaded: bool = False
) -> None:
    runs_file = tmp_path / "runs.txt"
    with cluster_dsn() as dsn, ExitStack() as stack:
        folders = {name: tmp_path / f"plugins-{name}" for name in ("a", "b", "c")}
        for folder in folders.values():
            ticker_plugin(folder / "ticker", tasks, runs_file)
        nodes = start_nodes(stack, tmp_path, dsn, folders, stale_after)
        a, c = nodes["a"], nodes["c"]
        # every node sees the whole cluster
        for server in nodes.values():
            listed = wait_for(
                lambda s=server: (
                    (r := httpx.get(f"{s.url}/admin/nodes", headers=AUTH, timeout=10).json())
                    and len(r["alive"]) == 3
                    and r
                ),
                30,
                "three live nodes",
            )
            assert {n["node"] for n in listed["nodes"]} == {"a", "b", "c"}
        time.sleep(seconds / 2)
        # kill c while it holds runs (its code is sleeping in them)
        c_runs = wait_for(
            lambda: (
                (r := httpx.get(f"{c.url}/admin/nodes/c", headers=AUTH, timeout=10).json())["runs"]
                and r
            ),
            30,
            "c to hold runs",
        )
        killed_at = time.time()
        os.kill(c.process.pid, signal.SIGKILL)
        c.process.wait()
        # the survivors record the loss once and fail what c held
        lost = wait_for(lambda: events(a, type="NodeLost"), 30, "NodeLost of c")
        time.sleep(seconds / 2)
        stopped_at = time.time()
        for name in ("a", "b"):
            nodes[name].process.send_signal(signal.SIGTERM)
        for name in ("a", "b"):
            nodes[name].process.wait(timeout=30)
        # read the log from a fresh node (it sees the whole cluster's history)
        with start_node(tmp_path, "reader", dsn, tmp_path / "plugins-reader") as reader:
            log = events(reader)
    assert [e["data"]["node"] for e in lost] == ["c"]
    assert len([e for e in log if e["type"] == "NodeLost"]) == 1
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in log:
        by_type[e["type"]].append(e)

    # no run doubled: one TaskStarted per (task, slot), and one execution of each
    started = Counter(
        (e["data"]["task"], round(e["data"]["scheduled_for"], 3)) for e in by_type["TaskStarted"]
    )
    doubled = {k: n for k, n in started.items() if n > 1}
    assert not doubled, f"runs started twice: {list(doubled)[:5]}"
    executed = Counter(tuple(line.split()[:2]) for line in runs_file.read_text().splitlines())
    assert max(executed.values()) == 1, "a run executed twice"

    # none lost: every task ran every second, without a hole, across the kill
    missed: Counter[str] = Counter()
    for e in by_type["TaskMissed"]:
        missed[e["data"]["task"]] += e["data"]["count"]
    for e in by_type["TaskSkipped"]:
        missed[e["data"]["task"]] += 1
    per_task: dict[str, list[float]] = defaultdict(list)
    for task, due in started:
        per_task[task].append(due)
    assert len(per_task) == tasks
    for task, dues in per_task.items():
        dues.sort()
        window = [d for d in dues if d < stopped_at - 2]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(window)]
        # a loaded machine can fall behind: a slot not run must then be recorded as
        # missed (misfire run_once) or skipped (max_instances), never silently lost
        holes = sum(round(g) - 1 for g in gaps)
        assert holes <= missed[task], f"{task}: {holes} slots neither run nor accounted for"
        if not overloaded:
            assert holes <= 2, f"{task}: holes in its runs: {gaps}"
        assert any(d > killed_at + 5 for d in window), f"{task} stopped after the kill"

    # the runs c held when it died were failed (node lost), by a survivor
    failed = {
        e["data"]["run_id"]: e for e in by_type["TaskFailed"] if e["data"]["kind"] == "node_lost"
    }
    assert failed, "no run of the killed node was failed"
    for e in failed.values():
        assert e["meta"]["node"] in ("a", "b")
        assert "node lost: c" in e["data"]["error"]
    ended = {e["data"]["run_id"] for t in ("TaskSucceeded", "TaskFailed") for e in by_type[t]}
    c_started = [e for e in by_type["TaskStarted"] if e["meta"]["node"] == "c"]
    assert c_started and c_runs["node"] == "c"
    assert all(e["data"]["run_id"] in ended for e in c_started), "a run of c never ended"
    # the work was spread: every node ran tasks
    assert {e["meta"]["node"] for e in by_type["TaskStarted"]} == {"a", "b", "c"}


@pytest.mark.timeout(400)
def test_three_nodes_fire_each_run_once_and_survive_a_kill(tmp_path: Path) -> None:
    run_scheduling(tmp_path, tasks=40, seconds=16)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.environ.get("TEST_CLUSTER_FULL"), reason="set TEST_CLUSTER_FULL=1")
def test_full_size_200_tasks_for_a_minute(tmp_path: Path) -> None:
    # 200 tasks load this 2-core machine: heartbeats may queue behind runs for seconds
    run_scheduling(tmp_path, tasks=200, seconds=60, stale_after=15, overloaded=True)


@pytest.mark.timeout(400)
def test_plugins_are_the_same_on_every_node(tmp_path: Path) -> None:
    with cluster_dsn() as dsn, ExitStack() as stack:
        nodes = start_nodes(
            stack, tmp_path, dsn, {n: tmp_path / f"plugins-{n}" for n in ("a", "b", "c")}
        )
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        upload = httpx.post(
            f"{a.url}/admin/plugins",
            files={"file": ("greet.zip", greeter_zip("hello from a"))},
            headers=AUTH,
            timeout=60,
        )
        assert upload.status_code in (200, 201), upload.text
        # installed through a, it answers on c (materialized from the database)
        for server in (a, b, c):
            body = wait_for(
                lambda s=server: (
                    (r := httpx.get(f"{s.url}/app/greet/hi", timeout=10)).status_code == 200
                    and r.json()
                ),
                60,
                f"the plugin on {server.url}",
            )
            assert body == {"text": "hello from a"}
        assert (tmp_path / "plugins-c" / "greet" / "router.py").exists()
        # a reload asked of b is applied by all three
        reloaded = httpx.post(f"{b.url}/admin/plugins/greet/reload", headers=AUTH, timeout=60)
        assert reloaded.status_code == 200, reloaded.text
        by_node = wait_for(
            lambda: (
                {
                    e["meta"]["node"]
                    for e in events(a, type="PluginReloaded")
                    if e["meta"]["actor"] != "cluster"
                    and e["meta"]["causation_id"] is not None
                    and e["data"]["name"] == "greet"
                }
                >= {"a", "b", "c"}
            ),
            60,
            "a reload on every node",
        )
        assert by_node
        # every node lists the same digest for it (once c has folded the reloads)
        nodes = wait_for(
            lambda: (
                (r := httpx.get(f"{c.url}/admin/nodes", headers=AUTH, timeout=10).json())[
                    "plugin_digest_differences"
                ]
                == {}
                and r
            ),
            60,
            "the same digest on every node",
        )
        digests = {n["node"]: n["plugins"]["greet"]["digest"] for n in nodes["nodes"]}
        assert len(set(digests.values())) == 1, digests
        listed = httpx.get(f"{b.url}/admin/plugins/greet", headers=AUTH, timeout=10).json()
        assert listed["digest_differs"] is False and set(listed["nodes"]) == {"a", "b", "c"}
        # a node whose copy was changed by hand serves another digest: it shows
        (tmp_path / "plugins-c" / "greet" / "run.py").write_text(
            'PLUGIN_INFO = {"version": "1.0.1", "author": "hand", "api_prefix": "/app/greet"}\n'
        )
        assert httpx.post(f"{c.url}/admin/plugins/greet/reload", headers=AUTH, timeout=60)
        differs = wait_for(
            lambda: (
                (r := httpx.get(f"{a.url}/admin/plugins/greet", headers=AUTH, timeout=10).json())[
                    "digest_differs"
                ]
                and r
            ),
            60,
            "the changed digest to show",
        )
        assert differs["nodes"]["c"] != differs["nodes"]["a"] == differs["nodes"]["b"]
        nodes = httpx.get(f"{a.url}/admin/nodes", headers=AUTH, timeout=10).json()
        assert set(nodes["plugin_digest_differences"]["greet"]) == {"a", "b", "c"}
        # a node that starts later materializes it before it loads its plugins
        with start_node(tmp_path, "d", dsn, tmp_path / "plugins-d") as d:
            body = wait_for(
                lambda: (
                    (r := httpx.get(f"{d.url}/app/greet/hi", timeout=10)).status_code == 200
                    and r.json()
                ),
                60,
                "the plugin on the late node",
            )
            assert body == {"text": "hello from a"}
