"""PostgreSQL and cluster benchmarks (issue 12).

- ``pg_append_100_producers``: durable appends/s with 100 concurrent producers (one event
  per append) on the PostgreSQL store. Peers in the same run and on the same server:
  ``eventsourcing`` (its PostgreSQL application recorder, 100 threads, one event per
  call) and ``asyncpg_limit`` (raw asyncpg inserting 100-row transactions of the same
  rows into the same table, indexes included: what the server and its disk allow;
  without the ordering lock, the version and id checks and the notification that
  xcore's promises need). Alternating pairs, medians.
- ``pg_wakeup_p50_ms`` / ``pg_wakeup_p99_ms``: from the commit of an append on one node
  (its own store, connections and follower) until a subscriber of another node has it.
- ``cluster_lateness_p99_ms``: start minus due time of runs with three ``xcore`` nodes
  (separate processes) sharing 1,000 tasks every second, against ``one_node`` running
  them alone, on the same server.

The server: ``XCORE_BENCH_PG_DSN`` or ``TEST_PG_DSN``; without either a private one
is started with ``.ci/postgres`` (as in CI). Each measurement uses a fresh schema.
``XCORE_BENCH_PAIRS`` / ``XCORE_BENCH_SECONDS`` / ``XCORE_BENCH_CLUSTER_SECONDS``
shorten the runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson

from bench.common import Result, median, percentile, result
from kernel.events import Meta, NewEvent
from kernel.store.postgres import SCHEMA, PostgresStore

PAIRS = int(os.environ.get("XCORE_BENCH_PAIRS", "7"))
RUN_SECONDS = float(os.environ.get("XCORE_BENCH_SECONDS", "1.5"))
CLUSTER_SECONDS = float(os.environ.get("XCORE_BENCH_CLUSTER_SECONDS", "30"))
CLUSTER_TASKS = int(os.environ.get("XCORE_BENCH_CLUSTER_TASKS", "1000"))
#: Each of the 1,000 tasks runs this often (all in phase: a burst of 1,000 runs).
CLUSTER_EVERY = os.environ.get("XCORE_BENCH_CLUSTER_EVERY", "5s")
ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = {"plugin": "hello", "path": "/app/hello/status", "status": 200, "ms": 1.25}


# -- the server and fresh schemas ------------------------------------------------------------


@contextlib.contextmanager
def server() -> Iterator[str]:
    dsn = os.environ.get("XCORE_BENCH_PG_DSN") or os.environ.get("TEST_PG_DSN")
    if dsn:
        yield dsn
        return
    out = subprocess.run(
        [str(ROOT / ".ci" / "postgres"), "start"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    env = {k: v.strip("'") for k, v in env.items()}
    try:
        yield env["TEST_PG_DSN"]
    finally:
        subprocess.run([str(ROOT / ".ci" / "postgres"), "stop", env["TEST_PG_DIR"]])


async def _schema(base: str) -> tuple[str, str]:
    name = "b_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(base)
    await conn.execute(f"CREATE SCHEMA {name}")
    await conn.close()
    sep = "&" if "?" in base else "?"
    return name, f"{base}{sep}search_path={name}"


async def _drop(base: str, name: str) -> None:
    conn = await asyncpg.connect(base)
    await conn.execute(f"DROP SCHEMA {name} CASCADE")
    await conn.close()


def _event() -> NewEvent:
    return NewEvent("RequestServed", orjson.dumps(PAYLOAD), Meta())


# -- appends -----------------------------------------------------------------------------------


async def _xcore_appends(base: str, producers: int, seconds: float) -> float:
    name, dsn = await _schema(base)
    store = PostgresStore(dsn)
    await store.open()
    count = 0
    deadline = time.perf_counter() + seconds

    async def producer(i: int) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await store.append([_event()], stream=f"producer-{i}")
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(producer(i) for i in range(producers)))
    elapsed = time.perf_counter() - start
    await store.close()
    await _drop(base, name)
    return count / elapsed


def _es_appends(base: str, producers: int, seconds: float) -> float:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    name, _ = asyncio.run(_schema(base))
    url = urlsplit(base)
    datastore = PostgresDatastore(
        dbname=url.path.lstrip("/") or "postgres",
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        user=unquote(url.username or ""),
        password=unquote(url.password or ""),
        pool_size=producers,
        max_overflow=0,
        schema=name,
    )
    recorder = PostgresApplicationRecorder(datastore)
    recorder.create_table()
    state = orjson.dumps(PAYLOAD)
    count = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def producer() -> None:
        nonlocal count
        originator = uuid.uuid4()
        version = 0
        while time.perf_counter() < deadline:
            version += 1
            recorder.insert_events([StoredEvent(originator, version, "bench:Served", state)])
            with lock:
                count += 1

    threads = [threading.Thread(target=producer) for _ in range(producers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    datastore.close()
    asyncio.run(_drop(base, name))
    return count / elapsed


async def _asyncpg_limit(base: str, seconds: float, rows: int = 100) -> float:
    """The same rows into the same table (the store's own, with its indexes and trigger),
    ``rows`` per transaction (what 100 producers with one append each can form), at the
    same durability (the server's; both commit synchronously): one INSERT per batch,
    with neither the ordering lock, the checks nor the notification."""
    name, dsn = await _schema(base)
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    data, meta = orjson.dumps(PAYLOAD), Meta().to_json()
    streams = [f"producer-{p}" for p in range(rows)]
    position = count = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        ps = list(range(position + 1, position + rows + 1))
        position += rows
        version = position // rows
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO events (position, stream, version, type, schema, data, meta, id,"
                " recorded_at) SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[],"
                " $4::text[], $5::int[], $6::bytea[], $7::bytea[], $8::text[], $9::float8[])",
                ps,
                streams,
                [version] * rows,
                ["RequestServed"] * rows,
                [1] * rows,
                [data] * rows,
                [meta] * rows,
                [uuid.uuid4().hex for _ in ps],
                [time.time()] * rows,
            )
        count += rows
    elapsed = time.perf_counter() - start
    await conn.close()
    await _drop(base, name)
    return count / elapsed


def bench_appends() -> list[Result]:
    xs: list[float] = []
    es: list[float] = []
    limits: list[float] = []
    with server() as base:
        # rounds of the three, so a change of the machine's load hits each alike
        for _ in range(PAIRS):
            xs.append(asyncio.run(_xcore_appends(base, 100, RUN_SECONDS)))
            limits.append(asyncio.run(_asyncpg_limit(base, RUN_SECONDS)))
            es.append(_es_appends(base, 100, RUN_SECONDS))
    return [
        result(
            "pg_append_100_producers",
            median(xs),
            "events/s",
            {"eventsourcing": median(es), "asyncpg_limit": median(limits)},
            min=min(xs),
            max=max(xs),
            pair_ratio_median=median([a / b for a, b in zip(xs, es, strict=True)]),
            ratio_to_limit=median(xs) / median(limits),
            round_ratio_to_limit_median=median([a / b for a, b in zip(xs, limits, strict=True)]),
        )
    ]


# -- wake-up on another node ----------------------------------------------------------------------


async def _wakeup(base: str, samples: int) -> list[float]:
    name, dsn = await _schema(base)
    writer, reader = PostgresStore(dsn, scope="writer"), PostgresStore(dsn, scope="reader")
    await writer.open()
    await reader.open()
    delays: list[float] = []
    try:
        for _ in range(samples):
            after = await reader.last_position()
            waiting = asyncio.ensure_future(reader.wait(after, timeout=10))
            await asyncio.sleep(0)
            [r] = await writer.append([_event()], stream="wake")
            committed = time.perf_counter()
            await waiting
            woke = time.perf_counter()
            assert await reader.last_position() >= r.position
            # the reader may wake before the writer hears its commit acknowledged
            delays.append(max(woke - committed, 0.0))
            await asyncio.sleep(0.002)
    finally:
        await writer.close()
        await reader.close()
        await _drop(base, name)
    return delays


def bench_wakeup() -> list[Result]:
    with server() as base:
        delays = asyncio.run(_wakeup(base, 1000))
    return [
        result("pg_wakeup_p50_ms", percentile(delays, 50) * 1000, "ms", samples=len(delays)),
        result("pg_wakeup_p99_ms", percentile(delays, 99) * 1000, "ms", samples=len(delays)),
    ]


# -- scheduler lateness, one node and three ---------------------------------------------------------

NODE = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from kernel import Kernel, Settings
    from kernel.sdk import current_task, task
    from services.cluster.service import ClusterService
    from services.scheduler.service import SchedulerService

    dsn, node, tasks, seconds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    EVERY = sys.argv[6]
    late = []
    begin = time.time()

    async def tick():
        due = current_task().scheduled_for.timestamp()
        if due > begin + 8:  # past the boot of the nodes
            late.append(time.time() - due)

    def spec(i):
        async def fn():
            await tick()
        fn.__name__ = f"t{i}"
        return task(every=EVERY)(fn).__xcore_task__

    async def main():
        scheduler = SchedulerService()
        settings = Settings(store="postgres", dsn=dsn, node=node, reload=False,
                            services={"scheduler": {"max_concurrency": 2000},
                                      "cluster": {"heartbeat_s": 1.0, "stale_after_s": 10.0}})
        try:
            async with Kernel(settings, services=[ClusterService(), scheduler]):
                await scheduler.register("bench", [spec(i) for i in range(tasks)])
                await asyncio.sleep(seconds)
        finally:
            with open(out, "w") as f:
                f.write("\\n".join(repr(x) for x in late))

    asyncio.run(main())
    """
)


def _lateness(base: str, nodes: int, seconds: float, tasks: int) -> tuple[list[float], int]:
    name, dsn = asyncio.run(_schema(base))
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-cluster-"))
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    NODE,
                    dsn,
                    f"n{i}",
                    str(tasks),
                    str(seconds),
                    str(tmp / f"n{i}"),
                    CLUSTER_EVERY,
                ],
                cwd=ROOT,
            )
            for i in range(nodes)
        ]
        for p in procs:
            p.wait(timeout=seconds + 120)
        late: list[float] = []
        for i in range(nodes):
            path = tmp / f"n{i}"
            if path.exists() and path.read_text().strip():
                late.extend(float(x) for x in path.read_text().split())
        return late, len(late)
    finally:
        asyncio.run(_drop(base, name))
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def bench_cluster() -> list[Result]:
    with server() as base:
        one, n1 = _lateness(base, 1, CLUSTER_SECONDS, CLUSTER_TASKS)
        three, n3 = _lateness(base, 3, CLUSTER_SECONDS, CLUSTER_TASKS)
    return [
        result(
            "cluster_lateness_p99_ms",
            percentile(three, 99) * 1000,
            "ms",
            {"one_node": percentile(one, 99) * 1000},
            p50_ms=percentile(three, 50) * 1000,
            one_node_p50_ms=percentile(one, 50) * 1000,
            runs=n3,
            one_node_runs=n1,
            tasks=CLUSTER_TASKS,
            every=CLUSTER_EVERY,
            seconds=CLUSTER_SECONDS,
        )
    ]


BENCHMARKS: list[tuple[str, Callable[[], Any]]] = [
    ("pg_append", bench_appends),
    ("pg_wakeup", bench_wakeup),
    ("cluster_lateness", bench_cluster),
]
