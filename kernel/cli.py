"""The ``xcore`` command line.

    xcore serve [--host H] [--port P] [--plugins-dir DIR] [--data-dir DIR] [--config FILE]
    xcore events [--after N] [--limit N] [--type T] [--stream S] [--follow]
    xcore version
    xcore backup DEST / xcore restore SOURCE   (kernel/store/commands.py)

Exit codes: 0 done, 1 an error, 2 the event log cannot be used (not an xcore log,
damaged, locked, unwritable), 3 the server could not start.

Services add their own sub-commands (``xcore plugin ...``, ``xcore task ...``) through
the ``xcore.commands`` entry point group: each entry is a function
``register(subparsers)`` that adds a parser and sets ``func`` on it; ``func(args)``
returns the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import orjson

from kernel.errors import StoreError, XcoreError
from kernel.logging import configure_logging
from kernel.settings import Settings

__all__ = ["build_parser", "load_settings", "main"]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="settings file (default: ./xcore.yaml if present)"
    )
    parser.add_argument("--data-dir", type=Path, help="where the event log lives (default ./var)")
    parser.add_argument(
        "--plugins-dir", type=Path, help="the plugins directory (default ./plugins)"
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN of a shared event log (implies --store postgres; docs/cluster.md)",
    )
    parser.add_argument("--node", help="this node's id (default: host name:port)")


def load_settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        "data_dir": getattr(args, "data_dir", None),
        "plugins_dir": getattr(args, "plugins_dir", None),
        "dsn": getattr(args, "dsn", None),
        "store": "postgres" if getattr(args, "dsn", None) else None,
        "node": getattr(args, "node", None),
        **extra,
    }
    return Settings.load(getattr(args, "config", None), overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xcore", description="The xcore microkernel.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the kernel and its HTTP API with uvicorn")
    add_settings_arguments(serve)
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--no-reload", action="store_true", help="do not watch plugins for changes")
    serve.set_defaults(func=cmd_serve)

    events = sub.add_parser("events", help="print events of the log as JSON lines")
    add_settings_arguments(events)
    events.add_argument("--after", type=int, default=0, help="start after this position")
    events.add_argument("--limit", type=int, default=None, help="print at most this many")
    events.add_argument("--type", action="append", dest="types", help="only this type (repeatable)")
    events.add_argument("--stream", help="only this stream")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    events.set_defaults(func=cmd_events)

    ver = sub.add_parser("version", help="print the installed version")
    ver.set_defaults(func=cmd_version)

    for ep in entry_points(group="xcore.commands"):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken service must not break the whole CLI
            print(f"xcore: sub-command {ep.name!r} unavailable: {exc!r}", file=sys.stderr)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kernel.connections import guarded_protocol
    from kernel.http import create_app
    from kernel.kernel import Kernel

    settings = load_settings(
        args,
        host=args.host,
        port=args.port,
        reload=False if args.no_reload else None,
    )
    configure_logging(settings.log_level, settings.log_format)
    kernel = Kernel(settings)
    app = create_app(kernel)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handlers (configured above) already receive uvicorn's records
        lifespan="on",
        access_log=False,
        # idle, slow and surplus connections are closed (see kernel/connections.py)
        http=guarded_protocol(settings.http),
        timeout_keep_alive=max(1, round(settings.http.keep_alive_timeout)),
        # open streams (SSE) never end by themselves: cut them this long after a stop
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns without `started` when the lifespan (the kernel's start) failed
    return 0 if server.started else 3


def cmd_events(args: argparse.Namespace) -> int:
    from kernel.store.sqlite import SQLiteStore

    settings = load_settings(args)

    async def run() -> None:
        if settings.store == "postgres":
            from kernel.kernel import store_from_settings

            store = store_from_settings(settings)
        else:
            store = SQLiteStore(settings.database_path, readonly=True)
        await store.open()
        try:
            after, printed = args.after, 0
            while True:
                batch = await store.read(
                    after=after, types=args.types, stream=args.stream, limit=1000
                )
                for r in batch:
                    sys.stdout.write(orjson.dumps(r.to_dict()).decode() + "\n")
                    printed += 1
                    after = r.position
                    if args.limit is not None and printed >= args.limit:
                        return
                sys.stdout.flush()
                if not batch:
                    if not args.follow:
                        return
                    await asyncio.sleep(0.2)
        finally:
            await store.close()

    asyncio.run(run())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from kernel.kernel import xcore_version

    print(xcore_version())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except StoreError as exc:
        # a log that is not xcore's, is damaged, locked or unwritable: one line, exit 2
        print(f"xcore: error: {exc}", file=sys.stderr)
        return 2
    except XcoreError as exc:
        print(f"xcore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
