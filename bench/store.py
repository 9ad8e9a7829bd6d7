"""Event log benchmarks (issue 2): durable appends, append latency, replay, wake-up.

Peers, run in the same process and the same run:
- ``eventsourcing``: the eventsourcing library's SQLite application recorder (9.x) on the
  same work (same producers, same events per call, its default WAL settings);
- ``sqlite3_limit``: raw ``sqlite3`` committing transactions of the same rows with the
  same durability setting — the physical limit of the disk and SQLite on this machine.
  It commits as many rows per transaction as xcore's producers can form: 100 for 100
  one-event producers (a group commit can never hold more than the appends waiting on
  it), 1 for one producer; ``sqlite3_limit_1000`` keeps the 1,000-row figure, the limit
  of the disk itself.

Throughputs alternate xcore and the peer in pairs (this machine is shared and noisy) and
report medians.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.common import Result, median, percentile, result
from kernel.events import Meta, NewEvent, Recorded
from kernel.projections import Projection, fold, handles
from kernel.store.sqlite import SQLiteStore

PAIRS = int(os.environ.get("XCORE_BENCH_PAIRS", "7"))
RUN_SECONDS = float(os.environ.get("XCORE_BENCH_SECONDS", "1.5"))
REPLAY_EVENTS = int(os.environ.get("XCORE_BENCH_REPLAY_EVENTS", "1000000"))

PAYLOAD = {"plugin": "hello", "path": "/app/hello/status", "status": 200, "ms": 1.25}


def _event() -> NewEvent:
    return NewEvent("RequestServed", orjson.dumps(PAYLOAD), Meta())


# -- xcore -------------------------------------------------------------------------------


async def _xcore_appends(
    path: Path, producers: int, seconds: float, sync: str, per_call: int = 1
) -> tuple[float, list[float]]:
    store = SQLiteStore(path, synchronous=sync)  # type: ignore[arg-type]
    await store.open()
    latencies: list[float] = []
    count = 0
    deadline = time.perf_counter() + seconds

    async def producer(i: int) -> None:
        nonlocal count
        stream = f"producer-{i}"
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await store.append([_event() for _ in range(per_call)], stream=stream)
            latencies.append(time.perf_counter() - t0)
            count += per_call

    start = time.perf_counter()
    await asyncio.gather(*(producer(i) for i in range(producers)))
    elapsed = time.perf_counter() - start
    await store.close()
    return count / elapsed, latencies


# -- eventsourcing ------------------------------------------------------------------------


def _es_appends(path: Path, producers: int, seconds: float, per_call: int = 1) -> float:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(str(path), pool_size=producers, max_overflow=producers)
    recorder = SQLiteApplicationRecorder(datastore)
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
            batch = []
            for _ in range(per_call):
                version += 1
                batch.append(StoredEvent(originator, version, "bench:RequestServed", state))
            recorder.insert_events(batch)
            with lock:
                count += per_call

    threads = [threading.Thread(target=producer) for _ in range(producers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    datastore.close()
    return count / elapsed


# -- raw sqlite3 ----------------------------------------------------------------------------


def _sqlite_limit(path: Path, seconds: float, sync: str, rows: int = 1000) -> float:
    """Raw sqlite3 committing ``rows``-row transactions of the benchmark's rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(
        "CREATE TABLE e (position INTEGER PRIMARY KEY, stream TEXT, version INT, type TEXT,"
        " data BLOB, id TEXT UNIQUE)"
    )
    data = orjson.dumps(PAYLOAD)
    streams = [f"producer-{i}" for i in range(100)]
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO e (stream, version, type, data, id) VALUES (?, ?, ?, ?, ?)",
            [
                (streams[i % 100], count + i, "RequestServed", data, uuid.uuid4().hex)
                for i in range(rows)
            ],
        )
        conn.execute("COMMIT")
        count += rows
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def _fresh(tmp: Path, name: str) -> Path:
    d = tmp / f"{name}-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    return d / "log.db"


def _alternate(
    pairs: int, a: Callable[[], float], b: Callable[[], float]
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for _ in range(pairs):
        xs.append(a())
        ys.append(b())
    return xs, ys


def bench_appends() -> list[Result]:
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-"))
    out: list[Result] = []
    try:
        # 1 producer, FULL: every append is its own fsync.
        x1, e1 = _alternate(
            PAIRS,
            lambda: asyncio.run(_xcore_appends(_fresh(tmp, "x1"), 1, RUN_SECONDS, "FULL"))[0],
            lambda: _es_appends(_fresh(tmp, "e1"), 1, RUN_SECONDS),
        )
        limit_full = median(
            [_sqlite_limit(_fresh(tmp, "l"), RUN_SECONDS, "FULL") for _ in range(3)]
        )
        limit_1 = median(
            [_sqlite_limit(_fresh(tmp, "l1"), RUN_SECONDS, "FULL", rows=1) for _ in range(3)]
        )
        out.append(
            result(
                "append_1_producer_full",
                median(x1),
                "events/s",
                {
                    "eventsourcing": median(e1),
                    "sqlite3_limit": limit_1,
                    "sqlite3_limit_1000": limit_full,
                },
                min=min(x1),
                max=max(x1),
                pair_ratio_median=median([a / b for a, b in zip(x1, e1, strict=True)]),
            )
        )

        # 100 producers, FULL and NORMAL: group commit at work.
        lat_all: list[float] = []

        def x100_full() -> float:
            rate, lat = asyncio.run(_xcore_appends(_fresh(tmp, "x100"), 100, RUN_SECONDS, "FULL"))
            lat_all.extend(lat)
            return rate

        x100: list[float] = []
        e100: list[float] = []
        l100: list[float] = []
        for _ in range(PAIRS):
            x100.append(x100_full())
            e100.append(_es_appends(_fresh(tmp, "e100"), 100, RUN_SECONDS))
            l100.append(_sqlite_limit(_fresh(tmp, "l100"), RUN_SECONDS, "FULL", rows=100))
        out.append(
            result(
                "append_100_producers_full",
                median(x100),
                "events/s",
                {
                    "eventsourcing": median(e100),
                    "sqlite3_limit": median(l100),
                    "sqlite3_limit_1000": limit_full,
                },
                min=min(x100),
                max=max(x100),
                pair_ratio_median=median([a / b for a, b in zip(x100, e100, strict=True)]),
                limit_ratio_median=median([a / b for a, b in zip(x100, l100, strict=True)]),
                limit_rows_per_transaction=100,
                events_per_call=1,
            )
        )
        # The same with 10 events per call (a command that records several facts).
        x10b, e10b = _alternate(
            max(3, PAIRS // 2),
            lambda: asyncio.run(_xcore_appends(_fresh(tmp, "x10b"), 100, RUN_SECONDS, "FULL", 10))[
                0
            ],
            lambda: _es_appends(_fresh(tmp, "e10b"), 100, RUN_SECONDS, 10),
        )
        out.append(
            result(
                "append_100_producers_x10_full",
                median(x10b),
                "events/s",
                {"eventsourcing": median(e10b), "sqlite3_limit": limit_full},
                min=min(x10b),
                max=max(x10b),
                events_per_call=10,
            )
        )
        out.append(
            result(
                "append_latency_p50_ms",
                percentile(lat_all, 50) * 1000,
                "ms",
                producers=100,
            )
        )
        out.append(
            result("append_latency_p99_ms", percentile(lat_all, 99) * 1000, "ms", producers=100)
        )

        limit_normal = median(
            [_sqlite_limit(_fresh(tmp, "ln"), RUN_SECONDS, "NORMAL", rows=100) for _ in range(3)]
        )
        xn = [
            asyncio.run(_xcore_appends(_fresh(tmp, "xn"), 100, RUN_SECONDS, "NORMAL"))[0]
            for _ in range(max(3, PAIRS // 2))
        ]
        out.append(
            result(
                "append_100_producers_normal",
                median(xn),
                "events/s",
                {"sqlite3_limit": limit_normal},
                min=min(xn),
                max=max(xn),
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- replay --------------------------------------------------------------------------------


class TrafficByPlugin(Projection):
    """Requests and errors per plugin: a typical monitoring projection."""

    name = "bench-traffic"

    def reset(self) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    @handles("RequestServed")
    def _served(self, r: Recorded) -> None:
        d = r.data
        plugin = d["plugin"]
        self.requests[plugin] = self.requests.get(plugin, 0) + 1
        if d["status"] >= 500:
            self.errors[plugin] = self.errors.get(plugin, 0) + 1


async def _build_log(path: Path, n: int) -> None:
    store = SQLiteStore(path, synchronous="NORMAL")
    await store.open()
    batch = 10_000
    for i in range(0, n, batch):
        await store.append([_event() for _ in range(min(batch, n - i))], stream=f"s-{i // batch}")
    await store.close()


async def _xcore_replay(path: Path) -> float:
    store = SQLiteStore(path, readonly=True)
    await store.open()
    projection = TrafficByPlugin()
    start = time.perf_counter()
    count = await fold(store, projection)
    elapsed = time.perf_counter() - start
    await store.close()
    assert projection.requests["hello"] == count
    return count / elapsed


def _raw_replay(path: Path, columns: str = "position, type, data") -> float:
    """Raw sqlite3 reading the rows in order and decoding their JSON, no records.

    By default it reads what a fold cannot do without — the position (where it is),
    the type (which handler) and the data — decodes every payload as the fold does, and
    does the projection's work inline (``TrafficByPlugin._served``: the request count
    and the error count per plugin); ``columns="data"`` reads the payload alone (the
    figure before issue 14's review).
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    start = time.perf_counter()
    count = 0
    requests: dict[str, int] = {}
    errors: dict[str, int] = {}
    loads = orjson.loads
    for row in conn.execute(f"SELECT {columns} FROM events ORDER BY position"):
        d = loads(row[-1])
        plugin = d["plugin"]
        requests[plugin] = requests.get(plugin, 0) + 1
        if d["status"] >= 500:
            errors[plugin] = errors.get(plugin, 0) + 1
        count += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def _es_build(path: Path, n: int) -> None:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(str(path))
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    state = orjson.dumps(PAYLOAD)
    for _ in range(0, n, 1000):
        originator = uuid.uuid4()
        recorder.insert_events(
            [StoredEvent(originator, v + 1, "bench:RequestServed", state) for v in range(1000)]
        )
    datastore.close()


def _es_replay(path: Path) -> float:
    from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(str(path))
    recorder = SQLiteApplicationRecorder(datastore)
    requests: dict[str, int] = {}
    count = 0
    start = time.perf_counter()
    position: int | None = None
    while True:
        notes = recorder.select_notifications(position, 10_000, inclusive_of_start=position is None)
        if not notes:
            break
        for note in notes:
            d = orjson.loads(note.state)
            requests[d["plugin"]] = requests.get(d["plugin"], 0) + 1
        count += len(notes)
        position = notes[-1].id
    elapsed = time.perf_counter() - start
    datastore.close()
    return count / elapsed


def bench_replay() -> list[Result]:
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-replay-"))
    try:
        xpath = tmp / "xcore.db"
        epath = tmp / "es.db"
        asyncio.run(_build_log(xpath, REPLAY_EVENTS))
        _es_build(epath, REPLAY_EVENTS)
        xs, es, raws, datas = [], [], [], []
        for _ in range(max(3, PAIRS // 2)):
            xs.append(asyncio.run(_xcore_replay(xpath)))
            es.append(_es_replay(epath))
            raws.append(_raw_replay(xpath))
            datas.append(_raw_replay(xpath, "data"))
        return [
            result(
                "replay_events_per_s",
                median(xs),
                "events/s",
                {
                    "eventsourcing": median(es),
                    "sqlite3_limit": median(raws),
                    "sqlite3_data_only": median(datas),
                },
                events=REPLAY_EVENTS,
                min=min(xs),
                max=max(xs),
                limit_ratio_median=median([a / b for a, b in zip(xs, raws, strict=True)]),
                limit_columns="position, type, data",
            )
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- wake-up -------------------------------------------------------------------------------


async def _wakeup(path: Path, samples: int) -> list[float]:
    from kernel.subscriptions import Subscription

    store = SQLiteStore(path)
    await store.open()
    committed: dict[int, float] = {}
    tail = store._tail
    original_push = tail.push

    def timed_push(records: Any) -> None:
        now = time.perf_counter()
        records = list(records)
        for row in records:
            committed[row[0]] = now
        original_push(records)

    tail.push = timed_push  # type: ignore[method-assign]
    delays: list[float] = []

    def handler(r: Recorded) -> None:
        delays.append(time.perf_counter() - committed[r.position])

    sub = Subscription(store, handler, start="now")
    await sub.start()
    for _ in range(samples):
        await store.append([_event()], stream="wake")
        await asyncio.sleep(0.001)
    await sub.wait_for(await store.last_position(), 10)
    await sub.stop()
    await store.close()
    return delays


def bench_wakeup() -> list[Result]:
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-wake-"))
    try:
        delays = asyncio.run(_wakeup(tmp / "log.db", 3000))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        result("wakeup_p50_ms", percentile(delays, 50) * 1000, "ms", samples=len(delays)),
        result("wakeup_p99_ms", percentile(delays, 99) * 1000, "ms", samples=len(delays)),
    ]


# -- subscriber fan-out ----------------------------------------------------------------------

FANOUT_SUBSCRIBERS = 50


async def _fanout(path: Path, subscribers: int, seconds: float) -> tuple[float, float]:
    """100 producers append for ``seconds`` while ``subscribers`` live subscriptions follow.

    Returns the writer's throughput (events/s) and the slowest subscriber's delivery rate
    (events delivered / time until it had seen the last event).
    """
    from kernel.subscriptions import Subscription

    store = SQLiteStore(path, synchronous="FULL")
    await store.open()
    seen = [0] * subscribers
    subs = []
    for i in range(subscribers):

        def handler(r: Recorded, i: int = i) -> None:
            seen[i] += 1

        sub = Subscription(store, handler, start="now")
        await sub.start()
        subs.append(sub)
    start = time.perf_counter()
    rate, _ = await _producers(store, 100, seconds)
    last = await store.last_position()
    for sub in subs:
        await sub.wait_for(last, 60)
    delivered_in = time.perf_counter() - start
    for sub in subs:
        await sub.stop()
    await store.close()
    return rate, (min(seen) / delivered_in) if subscribers else 0.0


async def _producers(store: SQLiteStore, producers: int, seconds: float) -> tuple[float, int]:
    count = 0
    deadline = time.perf_counter() + seconds

    async def producer(i: int) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await store.append([_event()], stream=f"producer-{i}")
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(producer(i) for i in range(producers)))
    return count / (time.perf_counter() - start), count


def bench_fanout() -> list[Result]:
    tmp = Path(tempfile.mkdtemp(prefix="xcore-bench-fanout-"))
    try:
        with_subs: list[float] = []
        without: list[float] = []
        per_sub: list[float] = []
        for _ in range(max(3, PAIRS // 2)):
            rate, delivered = asyncio.run(
                _fanout(_fresh(tmp, "f50"), FANOUT_SUBSCRIBERS, RUN_SECONDS)
            )
            with_subs.append(rate)
            per_sub.append(delivered)
            without.append(asyncio.run(_fanout(_fresh(tmp, "f0"), 0, RUN_SECONDS))[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        result(
            "fanout_writer_events_per_s",
            median(with_subs),
            "events/s (100 producers, 50 live subscribers)",
            {"no_subscribers": median(without)},
            subscribers=FANOUT_SUBSCRIBERS,
            pair_ratio_median=median([a / b for a, b in zip(with_subs, without, strict=True)]),
        ),
        result(
            "fanout_delivered_per_subscriber_per_s",
            median(per_sub),
            "events/s delivered to the slowest of 50 subscribers",
            subscribers=FANOUT_SUBSCRIBERS,
        ),
    ]


BENCHMARKS = [
    ("append", bench_appends),
    ("replay", bench_replay),
    ("wakeup", bench_wakeup),
    ("fanout", bench_fanout),
]
