"""``xcore backup`` and ``xcore restore``: the way to copy a log (see ``backup.py``).

xcore backup DEST [--force]             online, while the kernel runs
xcore restore SOURCE [--force]          with the kernel stopped
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from kernel.cli import add_settings_arguments, load_settings
from kernel.store.backup import backup, restore

__all__ = ["register"]


def register(sub: Any) -> None:
    b = sub.add_parser("backup", help="copy the event log to DEST (online, consistent, verified)")
    add_settings_arguments(b)
    b.add_argument("dest", type=Path, help="the copy to write (a file, or an existing folder)")
    b.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    b.set_defaults(func=cmd_backup)

    r = sub.add_parser(
        "restore", help="put a copy of a log in place as the event log (kernel stopped)"
    )
    add_settings_arguments(r)
    r.add_argument("source", type=Path, help="a copy written by `xcore backup`")
    r.add_argument("--force", action="store_true", help="replace an existing log (kept beside it)")
    r.set_defaults(func=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    done = asyncio.run(backup(settings.database_path, args.dest, force=args.force))
    print(f"backed up {done.events} events (up to position {done.last_position}) to {done.path}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    done = asyncio.run(restore(args.source, settings.database_path, force=args.force))
    print(f"restored {done.events} events (up to position {done.last_position}) to {done.path}")
    if done.replaced is not None:
        print(f"the log it replaced is kept as {done.replaced}")
    return 0
