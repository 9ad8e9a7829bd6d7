"""Instructions per durable append, counted with callgrind: a figure a loaded machine
does not move.

Wall-clock append figures on this shared 2-core machine vary by tens of percent from one
run to the next; the number of instructions the CPU executes for the same work does
not (within ~0.5%). This script runs the same workload twice under
``valgrind --tool=callgrind`` against a given source tree:

- the *warm-up* run opens a log on tmpfs (``/dev/shm``), appends ``--warmup`` one-event
  appends from ``--producers`` concurrent producers, and closes it;
- the *full* run does the same, then ``--events`` more appends the same way.

The difference of the two counts, divided by ``--events``, is the cost of one event:
interpreter start-up, imports, opening and closing the log cancel out. tmpfs keeps the
disk out of it (fsync is a system call: callgrind counts user-space instructions only).
Both runs use ``PYTHONHASHSEED=0`` so the count is repeatable.

Usage::

    python -m bench.instructions                      # this tree
    python -m bench.instructions --tree /work/wt/base # another checkout of xcore
    python -m bench.instructions --tree A --tree B    # several, one table

The tree under test only needs ``kernel.events.NewEvent``/``Meta`` and
``kernel.store.sqlite.SQLiteStore``; it is imported through ``PYTHONPATH`` with this
tree's interpreter and dependencies (the child checks it imported the right one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


# -- the workload (run in the child, under valgrind) ------------------------------------


async def _appends(store: object, producers: int, events: int) -> None:
    from kernel.events import Meta, NewEvent

    data = b'{"plugin":"hello","path":"/app/hello/status","status":200,"ms":1.25}'
    per = events // producers

    async def producer(i: int) -> None:
        stream = f"producer-{i}"
        for _ in range(per):
            await store.append([NewEvent("RequestServed", data, Meta())], stream=stream)  # type: ignore[attr-defined]

    await asyncio.gather(*(producer(i) for i in range(producers)))


async def _workload(
    path: Path, producers: int, warmup: int, events: int, limit: float, hold: float
) -> None:
    from kernel.store.sqlite import SQLiteStore

    store = SQLiteStore(path, synchronous="FULL")
    await store.open()
    # the writer's time-based policies, set on the writer (a tree may predate them):
    # under callgrind a commit is ~50 times slower, so the defaults decide otherwise
    writer = store._writer  # type: ignore[attr-defined]
    if limit >= 0 and hasattr(writer, "inline_limit"):
        writer.inline_limit = limit
    if hold >= 0 and hasattr(writer, "inline_hold"):
        writer.inline_hold = hold
    await _appends(store, producers, warmup)
    if events:
        await _appends(store, producers, events)
    await store.close()


def _child(argv: list[str]) -> None:
    tree, path, producers, warmup, events, limit, hold = argv
    import kernel

    where = Path(kernel.__file__).resolve()
    if not where.is_relative_to(tree):
        raise SystemExit(f"bench.instructions: imported kernel from {where}, not from {tree}")
    asyncio.run(
        _workload(Path(path), int(producers), int(warmup), int(events), float(limit), float(hold))
    )


# -- the driver ----------------------------------------------------------------------------


def count(
    tree: Path,
    producers: int,
    warmup: int,
    events: int,
    tmp: Path,
    limit: float = -1.0,
    hold: float = -1.0,
) -> int:
    """Instructions callgrind counts for one run of the workload (all threads)."""
    log_dir = Path(tempfile.mkdtemp(prefix="xcore-instr-", dir=tmp))
    out = log_dir / "callgrind.out"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-P",
        str(Path(__file__).resolve()),
        "--child",
        str(tree),
        str(log_dir / "events.db"),
        str(producers),
        str(warmup),
        str(events),
        str(limit),
        str(hold),
    ]
    try:
        done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    found = _COLLECTED.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(
            f"bench.instructions: the run against {tree} failed (exit {done.returncode}):\n"
            + done.stderr[-4000:]
        )
    return int(found[-1])


def measure(
    tree: Path, producers: int, warmup: int, events: int, limit: float = -1.0, hold: float = -1.0
) -> dict[str, float]:
    tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    base = count(tree, producers, warmup, 0, tmp, limit, hold)
    full = count(tree, producers, warmup, events, tmp, limit, hold)
    return {"warmup_run": base, "full_run": full, "per_event": (full - base) / events}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        _child(args[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="Instructions per one-event durable append (callgrind), per source tree.",
    )
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="an xcore source tree to measure (repeatable; default: this one)",
    )
    parser.add_argument("--producers", type=int, default=100)
    parser.add_argument("--events", type=int, default=20_000, help="measured appends")
    parser.add_argument("--warmup", type=int, default=2_000, help="appends before them")
    parser.add_argument(
        "--inline-limit",
        type=float,
        default=-1.0,
        help="the writer's inline_limit in seconds (default: the tree's own; under "
        "callgrind commits look ~50 times slower: 1 keeps every lone commit inline)",
    )
    parser.add_argument(
        "--inline-hold",
        type=float,
        default=-1.0,
        help="the writer's inline_hold in seconds (default: the tree's own, which "
        "callgrind's slowness turns into a turn of the loop per append; 1e9: none)",
    )
    ns = parser.parse_args(args)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (apt-get install -y valgrind)")
    if ns.events <= 0 or ns.events % ns.producers or ns.warmup % ns.producers:
        raise SystemExit("--events and --warmup must be positive multiples of --producers")
    trees = [t.resolve() for t in (ns.tree or [HERE])]
    for tree in trees:
        if not (tree / "kernel" / "store" / "sqlite.py").is_file():
            raise SystemExit(f"{tree} is not an xcore source tree (no kernel/store/sqlite.py)")
    print(
        f"{ns.events:,} one-event appends from {ns.producers} producers after "
        f"{ns.warmup:,} warm-up appends, synchronous=FULL on tmpfs, under callgrind"
        + (f", inline_limit {ns.inline_limit:g} s" if ns.inline_limit >= 0 else "")
        + (f", inline_hold {ns.inline_hold:g} s" if ns.inline_hold >= 0 else "")
    )
    print(f"{'tree':<40} {'instructions/event':>20}")
    for tree in trees:
        figures = measure(tree, ns.producers, ns.warmup, ns.events, ns.inline_limit, ns.inline_hold)
        print(f"{tree!s:<40} {figures['per_event']:>20,.0f}", flush=True)


if __name__ == "__main__":
    main()
