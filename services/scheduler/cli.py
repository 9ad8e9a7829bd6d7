"""``xcore task ...``: the scheduler's commands, talking to a running server's admin API.

    xcore task list [--json]
    xcore task show ID
    xcore task run ID | pause ID | resume ID

The server is ``--url`` (default ``http://127.0.0.1:8000``); the admin token comes
from ``--token`` or ``XCORE_ADMIN_TOKEN``. Only the standard library is used (urllib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kernel.client import ServerUnreachable, admin_call

__all__ = ["register"]

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("task", help="list and run scheduled tasks (admin API)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    parser.add_argument("--token", help="admin token (default: $XCORE_ADMIN_TOKEN)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    ls = actions.add_parser("list", help="the task table")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, text in (
        ("show", "one task with its recent runs"),
        ("run", "run a task now"),
        ("pause", "pause a task"),
        ("resume", "resume a task"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("id", help="task id, e.g. hello.cleanup")
    parser.set_defaults(func=main, _parser=parser)


def _call(args: argparse.Namespace, method: str, path: str) -> tuple[int, Any]:
    token = args.token or os.environ.get("XCORE_ADMIN_TOKEN")
    if not token:
        raise _Fail("no admin token: pass --token or set XCORE_ADMIN_TOKEN")
    try:
        return admin_call(args.url, token, method, path)
    except ServerUnreachable as exc:
        raise _Fail(str(exc)) from None


class _Fail(Exception):
    pass


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "id",
        "trigger",
        "next_run",
        "last_run",
        "last_outcome",
        "successes",
        "failures",
        "paused",
    ]
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "-" for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.action is None:
        args._parser.print_help()
        return 2
    try:
        if args.action == "list":
            status, body = _call(args, "GET", "/tasks")
            if status == 200 and not args.json:
                print(_table(body) if body else "no tasks")
                return 0
        elif args.action == "show":
            status, body = _call(args, "GET", f"/tasks/{urllib.parse.quote(args.id)}")
        else:
            status, body = _call(
                args, "POST", f"/tasks/{urllib.parse.quote(args.id)}/{args.action}"
            )
    except _Fail as exc:
        print(f"xcore task: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        detail = body.get("detail", body) if isinstance(body, dict) else body
        print(f"xcore task {args.action}: HTTP {status}: {detail}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0
