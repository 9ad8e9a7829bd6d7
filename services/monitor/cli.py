"""``xcore logs``: stored log lines of a running server, optionally followed live.

    xcore logs [--plugin P] [--task T] [--run-id R] [--request-id I] [--level L]
               [--since T] [--until T] [--grep TEXT] [--limit N] [--json] [--follow]

Prints the newest ``--limit`` matching lines oldest first, then (``--follow``) new ones
as they are stored, resuming after a disconnect. ``--url`` and ``--token`` (or
``XCORE_ADMIN_TOKEN``) as for the other commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from typing import Any

from kernel.client import ServerUnreachable, SSEMessage, StreamRefused, admin_call, follow

__all__ = ["format_line", "register"]

DEFAULT_URL = "http://127.0.0.1:8000"
_FILTERS = {
    "plugin": "plugin",
    "task": "task",
    "run_id": "run_id",
    "request_id": "request_id",
    "level": "level",
    "since": "since",
    "until": "until",
    "grep": "q",
    "logger": "logger",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("logs", help="stored log lines of a running server (admin API)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    p.add_argument("--token", help="admin token (default: $XCORE_ADMIN_TOKEN)")
    p.add_argument("--plugin", help="only this plugin's lines")
    p.add_argument("--task", help="only this task's lines (plugin.task)")
    p.add_argument("--run-id", dest="run_id", help="only this task run's lines")
    p.add_argument("--request-id", dest="request_id", help="only this HTTP request's lines")
    p.add_argument("--logger", help="only this logger and its children")
    p.add_argument(
        "--level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    )
    p.add_argument("--since", help="ISO 8601 time or Unix seconds")
    p.add_argument("--until", help="ISO 8601 time or Unix seconds")
    p.add_argument("--grep", help="text in the message (any case)")
    p.add_argument("--limit", type=int, default=50, help="lines to print first (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.set_defaults(func=main)


def format_line(line: dict[str, Any]) -> str:
    where = " ".join(
        f"{k}={line[k]}" for k in ("plugin", "task", "run_id", "request_id") if line.get(k)
    )
    text = f"{line['time']} {line['level']:<7} {line['logger']}: {line['message']}"
    if where:
        text += f"  [{where}]"
    if line.get("exc"):
        text += "\n" + line["exc"]
    return text


def main(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("XCORE_ADMIN_TOKEN")
    if not token:
        print("xcore logs: no admin token: pass --token or set XCORE_ADMIN_TOKEN", file=sys.stderr)
        return 1
    if not 1 <= args.limit <= 1000:
        print("xcore logs: --limit must be between 1 and 1000", file=sys.stderr)
        return 2
    filters = {q: getattr(args, a) for a, q in _FILTERS.items() if getattr(args, a) is not None}

    def show(line: dict[str, Any]) -> None:
        print(json.dumps(line) if args.json else format_line(line), flush=True)

    try:
        query = urllib.parse.urlencode({**filters, "limit": args.limit})
        status, body = admin_call(args.url, token, "GET", f"/logs?{query}")
        if status >= 400:
            detail = body.get("detail", body) if isinstance(body, dict) else body
            print(f"xcore logs: HTTP {status}: {detail}", file=sys.stderr)
            return 1
        lines = body["lines"]
        for line in reversed(lines):
            show(line)
        if not args.follow:
            return 0
        newest = lines[0]["id"] if lines else body["store"].get("newest_id") or 0

        def on_message(message: SSEMessage) -> None:
            if message.event == "log" and isinstance(message.data, dict):
                show(message.data)

        follow(args.url, token, on_message, path="/logs/stream", params=filters, after=newest)
    except (ServerUnreachable, StreamRefused) as exc:
        print(f"xcore logs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
