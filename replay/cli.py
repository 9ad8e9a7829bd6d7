"""``xcore replay ...``: the replay tool's command line (registered through the
``xcore.commands`` entry point group; see ``pyproject.toml``).

Exit codes: 0 done; 1 ``verify`` found defects; 2 bad input (not an xcore log, a
position past the end, a bad time or expression), always as one line on stderr.
Defects met while replaying (a gap, a corrupted row) are warned about on stderr with
their position and the replay goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from replay.errors import DamagedLog, Defect, ReplayError

__all__ = ["register"]

EXIT_DEFECTS = 1
EXIT_BAD_INPUT = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "replay",
        help="debug from a log: timeline, state, diff, why, bisect, verify, export",
        description="Inspect an xcore event log read-only: a running kernel's or a copy. "
        "Runs no plugin or task code. See docs/replay.md.",
    )
    commands = parser.add_subparsers(dest="replay_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))

    def command(
        name: str, fn: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(func=_guarded(fn))
        return p

    def log_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "log", metavar="LOG", help="the SQLite log file (e.g. var/events.db) or a .jsonl slice"
        )

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--from",
            dest="start",
            metavar="POS|TIME",
            help="first position, or a time (ISO 8601, UTC unless a zone is given)",
        )
        p.add_argument("--to", dest="end", metavar="POS|TIME", help="last position, or a time")
        p.add_argument(
            "--type",
            dest="types",
            action="append",
            metavar="T",
            help="only this event type (repeatable)",
        )
        p.add_argument("--stream", help="only this stream")
        p.add_argument(
            "--plugin",
            help="only events about this plugin (its stream, its tasks, events naming it)",
        )
        p.add_argument("--task", help="only events of this task (plugin.task)")

    def projections(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--projection",
            dest="projections",
            action="append",
            metavar="NAME|module:Class",
            help="an installed projection by name, or your own class by import path (repeatable)",
        )

    def cache(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--no-cache", action="store_true", help="do not read or write replay's snapshot cache"
        )
        p.add_argument(
            "--cache-dir",
            type=Path,
            help="where replay keeps its snapshots (default: ~/.cache/xcore/replay)",
        )

    def color(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--color",
            choices=["auto", "always", "never"],
            default="auto",
            help="colour the output (auto: on a terminal)",
        )

    p = command("timeline", cmd_timeline, "the events as a table, or JSON lines")
    log_arg(p)
    filters(p)
    p.add_argument(
        "--follow", action="store_true", help="keep printing new events (a running kernel's log)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--limit", type=_count(0), help="print at most this many events")
    color(p)

    p = command("state", cmd_state, "the projections as they were at a position or time")
    log_arg(p)
    p.add_argument("--at", metavar="POS|TIME", help="position or time (default: the end)")
    projections(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    cache(p)
    color(p)

    p = command("diff", cmd_diff, "what changed in each projection between two points")
    log_arg(p)
    p.add_argument(
        "--at",
        dest="points",
        action="append",
        metavar="POS|TIME",
        required=True,
        help="give it twice: from, then to",
    )
    projections(p)
    p.add_argument("--json", action="store_true", help="print the changes as JSON")
    color(p)

    p = command("why", cmd_why, "the causes of an event, back to its origin, and what it caused")
    log_arg(p)
    p.add_argument("position", metavar="POS", help="the event's position")
    p.add_argument("--json", action="store_true", help="print JSON")
    color(p)

    p = command("bisect", cmd_bisect, "the first position at which a condition on the state holds")
    log_arg(p)
    p.add_argument(
        "--until",
        dest="expression",
        metavar="EXPR",
        required=True,
        help="e.g. 'tasks.tasks[\"hello.cleanup\"].failures > 3' (see docs/replay.md)",
    )
    projections(p)
    p.add_argument(
        "--every",
        type=_count(1),
        default=10_000,
        help="positions between saved snapshots (default 10000)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    cache(p)

    p = command(
        "verify", cmd_verify, "check the log and the kernel's snapshots; exit 1 on any defect"
    )
    log_arg(p)
    projections(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="count unknown event types as defects")
    cache(p)

    p = command("export", cmd_export, "write a slice of the log as JSON lines")
    log_arg(p)
    filters(p)
    p.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")

    p = command("import", cmd_import, "write a slice into a new SQLite log")
    p.add_argument("slice", metavar="SLICE", help="a .jsonl slice written by export")
    p.add_argument("target", metavar="NEWLOG", help="the SQLite file to create (must not exist)")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_BAD_INPUT


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (argparse exits 2 otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from replay.projections import import_events

        import_events()
        try:
            return fn(args)
        except ReplayError as exc:
            print(f"xcore replay: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except BrokenPipeError:
            # the reader (head, less) went away: stop quietly
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            return 130
        except OSError as exc:  # a full disk, a folder that does not exist...
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"xcore replay: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1

    return run


def _open(args: argparse.Namespace) -> Any:
    from replay.source import open_log

    return open_log(args.log)


def _warn(defects: list[Defect]) -> None:
    from replay.timeline import clean

    for d in defects[:50]:
        print(f"xcore replay: warning: {clean(str(d))}", file=sys.stderr)
    if len(defects) > 50:
        print(f"xcore replay: warning: ... and {len(defects) - 50} more defects", file=sys.stderr)


def _cache(args: argparse.Namespace, log: Any) -> Any:
    if getattr(args, "no_cache", False):
        return None
    from replay.cache import SnapshotCache
    from replay.source import SQLiteLog

    c = SnapshotCache(log, args.cache_dir)
    if not c.enabled and isinstance(log, SQLiteLog) and log.last_position():
        print(f"xcore replay: note: snapshot cache not used: {c.problem}", file=sys.stderr)
    return c if c.enabled else None


def _filter(args: argparse.Namespace) -> Any:
    from replay.timeline import Filter

    return Filter(args.types, args.stream, args.plugin, args.task)


def _range(args: argparse.Namespace, log: Any) -> tuple[int, int]:
    from replay.positions import resolve

    last = log.last_position()
    after = 0
    if args.start is not None:
        after = resolve(log, args.start, start=True, last=last) - 1
        after = max(after, 0)
    end = resolve(log, args.end, last=last)
    if args.start is not None and args.end is not None and after >= end and after < last:
        raise ReplayError(f"--from {args.start} comes after --to {args.end}: nothing between them")
    return after, end


def _painter(args: argparse.Namespace) -> Any:
    from replay.timeline import Painter

    return Painter.for_stream(sys.stdout, getattr(args, "color", "auto"))


def _describe(log: Any, position: int) -> str:
    if position == 0:
        return "position 0 (before the first event)"
    r = log.get(position)
    if r is None:
        return f"position {position}"
    when = datetime.fromtimestamp(r.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    from replay.timeline import clean

    return f"position {position} ({when} UTC, {clean(r.type)} on {clean(r.stream)})"


# -- commands -----------------------------------------------------------------------------


def cmd_timeline(args: argparse.Namespace) -> int:
    from replay.timeline import format_row, header, iterate, write_json

    with _open(args) as log:
        after, end = _range(args, log)
        painter = _painter(args)
        keep = _filter(args)
        until = None if args.follow and args.end is None else end
        before = len(log.defects)
        printed = 0
        if not args.json and sys.stdout.isatty():
            print(painter.paint(header(), "1"))
        try:
            for r in iterate(log, after=after, until=until, keep=keep, follow=args.follow):
                if args.limit is not None and printed >= args.limit:
                    break
                try:
                    if args.json:
                        write_json(r)
                    else:
                        sys.stdout.write(format_row(r, painter) + "\n")
                except (ValueError, KeyError, TypeError) as exc:  # orjson errors are ValueErrors
                    log.defects.append(
                        Defect("corrupt", r.position, f"{r.type}: metadata does not decode: {exc}")
                    )
                    continue
                printed += 1
                if args.follow:
                    sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.flush()
        _warn(log.defects[before:])
    return 0


def _render_tree(value: Any, painter: Any, indent: int = 0, key: str = "") -> list[str]:
    from replay.timeline import clean

    pad = "  " * indent
    key = clean(key)  # a key is event data too: no raw escapes or line breaks
    if isinstance(value, dict):
        if not value:
            return [f"{pad}{key}: {{}}" if key else f"{pad}{{}}"]
        lines = [f"{pad}{painter.paint(key, '1')}:"] if key else []
        inner = indent + (1 if key else 0)
        for k, v in value.items():
            lines.extend(_render_tree(v, painter, inner, str(k)))
        return lines
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        lines = [f"{pad}{painter.paint(key, '1')}:"] if key else []
        for i, v in enumerate(value):
            lines.extend(_render_tree(v, painter, indent + 1, f"[{i}]"))
        return lines
    text = orjson.dumps(value).decode() if not isinstance(value, str) else clean(value)
    if (
        isinstance(value, float)
        and 1e9 < value < 4e9
        and (key.endswith(("_at", "_run", "_for", "at")) or key in ("at", "timestamp"))
    ):
        text += painter.paint(
            f"  ({datetime.fromtimestamp(value, UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC)", "2"
        )
    return [f"{pad}{key}: {text}" if key else f"{pad}{text}"]


def cmd_state(args: argparse.Namespace) -> int:
    from replay.fold import fold, instantiate
    from replay.positions import resolve

    with _open(args) as log:
        position = resolve(log, args.at)
        warnings: list[str] = []
        instances = instantiate(args.projections, warnings)
        for w in warnings:
            print(f"xcore replay: warning: {w}", file=sys.stderr)
        cache = _cache(args, log)
        restored = 0
        if cache is not None:
            for name, p in list(instances.items()):
                positions = cache.positions(type(p), position)
                for pos in reversed(positions):
                    loaded = cache.load(type(p), pos)
                    if loaded is not None:
                        instances[name] = loaded
                        restored += 1
                        break
        state = fold(log, list(instances.values()), until=position, progress=True)
        if cache is not None:
            for p in state.projections.values():
                cache.save(p, position)
            cache.close()
        _warn(state.defects)
        views = state.view()
        if args.json:
            out = {
                "log": log.location,
                "position": position,
                "projections": views,
                "defects": [
                    {"kind": d.kind, "position": d.position, "message": d.message}
                    for d in state.defects
                ],
            }
            sys.stdout.write(
                orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
                + "\n"
            )
            return 0
        painter = _painter(args)
        print(painter.paint(f"state at {_describe(log, position)}", "1"))
        if not views:
            print("(no projection installed: give one with --projection module:Class)")
        for name, v in views.items():
            print()
            lines = _render_tree(v, painter, 1)
            print(painter.paint(name, "1;36"))
            print("\n".join(lines) if lines else "  (empty)")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from replay.diff import diff_views, render
    from replay.fold import fold, instantiate
    from replay.positions import resolve

    if len(args.points) != 2:
        raise ReplayError("diff takes --at twice: --at FROM --at TO")
    with _open(args) as log:
        a, b = (resolve(log, p) for p in args.points)
        if a > b:
            a, b = b, a
        instances = instantiate(args.projections)
        first = fold(log, list(instances.values()), until=a, progress=True)
        view_a = first.view()
        second = fold(log, list(first.projections.values()), until=b, progress=True, gaps=False)
        _warn(first.defects + second.defects)
        changes = diff_views(view_a, second.view())
        if args.json:
            out = {"from": a, "to": b, "changes": [c.to_dict() for c in changes]}
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
        else:
            print(render(changes, _painter(args), a, b))
    return 0


def cmd_why(args: argparse.Namespace) -> int:
    from replay.timeline import clean, format_row
    from replay.why import why

    text = str(args.position).strip()
    if not text.isdigit():
        raise ReplayError(f"bad position {args.position!r}: give the event's position (an integer)")
    with _open(args) as log:
        w = why(log, int(text), progress=True)
        if args.json:
            out = {
                "event": w.event.to_dict(),
                "chain": [r.to_dict() for r in w.chain],
                "missing_cause": w.missing_cause,
                "effects": [{"depth": d, **r.to_dict()} for d, r in w.effects],
                "correlated": [r.to_dict() for r in w.correlated],
                "correlated_total": w.correlated_total,
            }
            sys.stdout.write(orjson.dumps(out).decode() + "\n")
            return 0
        painter = _painter(args)
        origin = w.chain[0]
        m = origin.meta
        print(painter.paint(f"why {_describe(log, w.event.position)}", "1"))
        if w.missing_cause:
            print(clean(f"origin: not in this log (caused by event id {w.missing_cause})"))
        else:
            from replay.timeline import clean

            print(
                clean(
                    f"origin: {origin.type} at position {origin.position}, actor "
                    f"{m.actor or 'unknown'}, node {m.node or '?'}"
                )
            )
        print(painter.paint("chain of causes:", "1"))
        for i, r in enumerate(w.chain):
            mark = "=>" if r.position == w.event.position else ("  " if i == 0 else "->")
            actor = f"  actor={clean(r.meta.actor)}" if r.meta.actor else ""
            print(f"  {mark} {format_row(r, painter)}{actor}")
        print(painter.paint("what it caused:", "1"))
        if not w.effects:
            print("  nothing recorded")
        for depth, r in w.effects:
            print(f"  {'  ' * (depth - 1)}-> {format_row(r, painter)}")
        if w.correlated_total:
            print(
                painter.paint(f"same correlation, outside the chain ({w.correlated_total}):", "1")
            )
            for r in w.correlated[:20]:
                print(f"     {format_row(r, painter)}")
            if w.correlated_total > 20:
                print(f"     ... and {w.correlated_total - 20} more (--json lists up to 200)")
    return 0


def cmd_bisect(args: argparse.Namespace) -> int:
    from replay.bisect import bisect

    with _open(args) as log:
        cache = _cache(args, log)
        try:
            result = bisect(
                log,
                args.expression,
                projections=args.projections,
                cache=cache,
                every=args.every,
                progress=True,
            )
        finally:
            if cache is not None:
                cache.close()
        _warn(result.defects)
        if args.json:
            out = {
                "expression": result.expression,
                "position": result.position,
                "event": result.record.to_dict() if result.record else None,
                "last_position": result.last,
                "probes": result.probes,
                "folded": result.folded,
                "snapshots_used": result.snapshots_used,
            }
            sys.stdout.write(orjson.dumps(out).decode() + "\n")
            return 0
        if result.position is None:
            print(f"{result.expression!r} never holds up to position {result.last}")
        elif result.position == 0:
            print(f"{result.expression!r} already holds on the empty state (position 0)")
        else:
            print(f"{result.expression!r} first holds at {_describe(log, result.position)}")
            print(
                f"  (false just before it; {result.folded:,} events folded, {result.snapshots_used} snapshots used)"
            )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from replay.projections import import_events

    failures = import_events()
    try:
        return _verify(args, failures)
    except DamagedLog as exc:  # damage is what verify looks for: a finding, not bad input
        if args.json:
            found = {"log": args.log, "ok": False, "damaged": str(exc)}
            sys.stdout.write(orjson.dumps(found).decode() + "\n")
        else:
            print(f"DAMAGED {exc}")
        return EXIT_DEFECTS


def _verify(args: argparse.Namespace, failures: list[str]) -> int:
    from replay.verify import verify

    with _open(args) as log:
        cache = _cache(args, log)
        try:
            report = verify(log, projections=args.projections, progress=True, cache=cache)
        finally:
            if cache is not None:
                cache.close()
        report.warnings[:0] = [f"event module unavailable: {f}" for f in failures]
        if args.json:
            sys.stdout.write(orjson.dumps(report.to_dict()).decode() + "\n")
        else:
            from replay.timeline import clean

            print("\n".join(clean(line) for line in report.render().splitlines()))
        unknown = any(w.startswith("unknown event type") for w in report.warnings)
        if not report.ok or (args.strict and unknown):
            return EXIT_DEFECTS
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from replay.slices import export_slice

    with _open(args) as log:
        after, end = _range(args, log)
        keep = _filter(args)
        needs_keep = args.plugin is not None or args.task is not None or args.stream is not None
        if args.output is not None:
            if args.output.exists() or args.output.is_symlink():
                raise ReplayError(f"{args.output} already exists: export never overwrites a file")
            if not args.output.parent.is_dir():
                raise ReplayError(f"{args.output.parent}: no such directory")
            # written beside the target and renamed when complete: no half slice is left
            partial = args.output.with_name(f".{args.output.name}.partial-{os.getpid()}")
            try:
                with partial.open("w") as out:
                    count, defects = export_slice(
                        log,
                        out,
                        after=after,
                        until=end,
                        types=args.types,
                        keep=keep if needs_keep else None,
                        progress=True,
                    )
                os.replace(partial, args.output)
            finally:
                partial.unlink(missing_ok=True)
            print(
                f"exported {count} events (positions {after + 1}..{end}) to {args.output}",
                file=sys.stderr,
            )
        else:
            count, defects = export_slice(
                log,
                sys.stdout,
                after=after,
                until=end,
                types=args.types,
                keep=keep if needs_keep else None,
                progress=True,
            )
        _warn(defects)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from replay.slices import import_slice

    defects: list[Defect] = []
    count = import_slice(args.slice, args.target, defects)
    print(f"imported {count} events into {args.target}")
    _warn(defects)
    return 0
