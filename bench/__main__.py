"""Run the benchmarks: ``python -m bench [--only SUBSTRING] [--list]``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
import time
import traceback

from bench.common import Result, save_results, table

MODULES = [
    "bench.store",
    "bench.routes",
    "bench.plugins",
    "bench.scheduler",
    "bench.ui",
    "bench.monitor",
    "bench.sandbox",
    "bench.replay",
    "bench.postgres",
    "bench.reload",
]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", help="run only benchmarks whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()

    selected = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        for name, fn in getattr(module, "BENCHMARKS", []):
            if args.only and args.only not in name:
                continue
            selected.append((name, fn))
    if args.list:
        for name, _ in selected:
            print(name)
        return 0
    if not selected:
        print(f"no benchmark matches {args.only!r}", file=sys.stderr)
        return 2

    results: list[Result] = []
    failed = 0
    for name, fn in selected:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            out = asyncio.run(fn()) if inspect.iscoroutinefunction(fn) else fn()
        except Exception:
            failed += 1
            traceback.print_exc()
            continue
        for r in out:
            print(f"   {r['name']}: {r['value']:.4g} {r['unit']}  peers={r.get('peers', {})}")
        results.extend(out)
        print(f"   ({time.perf_counter() - start:.0f}s)", flush=True)
    if results:
        save_results(results)
    print()
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
