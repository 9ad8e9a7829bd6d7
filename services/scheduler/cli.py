"""``xcore task ...``: the scheduler's commands, talking to a running server's admin API.

    xcore task list [--json]
    xcore task show ID
    xcore task run ID [--wait [--timeout S]]   accepted with its place in the queue;
                                               --wait follows the run to its outcome
    xcore task runs ID [--limit N] [--offset N] [--json]
    xcore task cancel ID RUN_ID
    xcore task pause ID | resume ID
    xcore task add ID --function NAME (--cron EXPR | --every DUR | --trigger JSON)
                      [--tz ZONE] [--args JSON] [--kwargs JSON]
    xcore task change ID [--cron | --every | --trigger] [--args] [--kwargs]
    xcore task remove ID                       (a schedule added at runtime)

The server is ``--url`` (default ``http://127.0.0.1:8000``); the admin token comes
from ``--token`` or ``XCORE_ADMIN_TOKEN``. Only the standard library is used (urllib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
        ("runs", "a task's runs, newest first"),
        ("cancel", "cancel a run in progress"),
        ("pause", "pause a task"),
        ("resume", "resume a task"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("id", help="task id, e.g. hello.cleanup")
        if name == "run":
            p.add_argument("--wait", action="store_true", help="wait for the run's outcome")
            p.add_argument(
                "--timeout", type=float, default=None, help="give up waiting after S seconds"
            )
        elif name == "runs":
            p.add_argument("--limit", type=int, default=20)
            p.add_argument("--offset", type=int, default=0)
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        elif name == "cancel":
            p.add_argument("run_id", help="the run's id (see `xcore task runs ID`)")
    for name, text in (
        ("add", "add a schedule at runtime (it calls a declared task's function)"),
        ("change", "change a schedule's trigger or arguments at runtime"),
        ("remove", "remove a schedule added at runtime"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("id", help="task id, e.g. hello.nightly")
        if name == "remove":
            continue
        if name == "add":
            p.add_argument("--function", required=True, help="the declared task to call")
        p.add_argument("--cron", help="cron expression (5 fields, 6 with seconds, or @daily...)")
        p.add_argument("--every", help="interval, e.g. 30s, 10m")
        p.add_argument("--trigger", help='trigger as JSON, e.g. \'{"calendar": {"months": 1}}\'')
        p.add_argument("--tz", help="time zone of --cron")
        p.add_argument("--args", help="positional arguments as a JSON list")
        p.add_argument("--kwargs", help="keyword arguments as a JSON object")
    parser.set_defaults(func=main, _parser=parser)


def _schedule_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    given = [x for x in ("cron", "every", "trigger") if getattr(args, x, None)]
    if len(given) > 1:
        raise _Fail(f"give one of --cron, --every, --trigger (not {', '.join(given)})")
    try:
        if args.trigger:
            body["trigger"] = json.loads(args.trigger)
        elif args.cron:
            body["trigger"] = {"cron": args.cron, **({"tz": args.tz} if args.tz else {})}
        elif args.every:
            body["trigger"] = {"every": args.every}
        for key in ("args", "kwargs"):
            if getattr(args, key):
                body[key] = json.loads(getattr(args, key))
    except json.JSONDecodeError as exc:
        raise _Fail(f"bad JSON: {exc}") from None
    if getattr(args, "function", None):
        body["function"] = args.function
    return body


_FINAL = ("succeeded", "failed", "skipped", "released")


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    token = args.token or os.environ.get("XCORE_ADMIN_TOKEN")
    if not token:
        raise _Fail("no admin token: pass --token or set XCORE_ADMIN_TOKEN")
    try:
        if body is None:
            return admin_call(args.url, token, method, path)
        data = json.dumps(body).encode()
        return admin_call(args.url, token, method, path, body=data, content_type="application/json")
    except ServerUnreachable as exc:
        raise _Fail(str(exc)) from None


class _Fail(Exception):
    pass


def _follow(args: argparse.Namespace, run_id: str) -> int:
    """Poll the run until its outcome; exit 0 if it succeeded, 1 otherwise."""
    path = f"/tasks/{urllib.parse.quote(args.id)}/runs/{urllib.parse.quote(run_id)}"
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    delay = 0.05
    seen = None
    while True:
        status, body = _call(args, "GET", path)
        if status == 200:
            if body["status"] != seen:
                seen = body["status"]
                print(f"run {run_id}: {seen}", file=sys.stderr)
            if body["status"] in _FINAL:
                print(json.dumps(body, indent=2))
                return 0 if body["status"] == "succeeded" else 1
        elif status != 404:  # 404: the acceptance is not folded in yet
            raise _Fail(f"HTTP {status} while following run {run_id}: {body}")
        if deadline is not None and time.monotonic() > deadline:
            raise _Fail(f"run {run_id} still {seen or 'queued'} after {args.timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _runs_table(runs: list[dict[str, Any]]) -> str:
    cols = ["run_id", "status", "trigger", "scheduled_for", "duration_ms", "lateness_ms"]
    rows = []
    for r in runs:
        row = {**r, "detail": r.get("error") or json.dumps(r.get("result"))}
        rows.append(row)
    return _grid(rows, [*cols, "detail"])


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
    return _grid(rows, cols)


def _grid(rows: list[dict[str, Any]], cols: list[str]) -> str:
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
        elif args.action == "runs":
            query = urllib.parse.urlencode({"limit": args.limit, "offset": args.offset})
            status, body = _call(args, "GET", f"/tasks/{urllib.parse.quote(args.id)}/runs?{query}")
            if status == 200 and not args.json:
                print(_runs_table(body["runs"]) if body["runs"] else "no runs")
                print(f"({len(body['runs'])} of {body['total']} from {body['offset']})")
                return 0
        elif args.action == "cancel":
            tid, rid = urllib.parse.quote(args.id), urllib.parse.quote(args.run_id)
            status, body = _call(args, "POST", f"/tasks/{tid}/runs/{rid}/cancel")
        elif args.action == "add":
            body_in = {"id": args.id, **_schedule_body(args)}
            status, body = _call(args, "POST", "/tasks", body_in)
        elif args.action == "change":
            tid = urllib.parse.quote(args.id)
            status, body = _call(args, "PATCH", f"/tasks/{tid}", _schedule_body(args))
        elif args.action == "remove":
            status, body = _call(args, "DELETE", f"/tasks/{urllib.parse.quote(args.id)}")
        elif args.action == "run":
            status, body = _call(args, "POST", f"/tasks/{urllib.parse.quote(args.id)}/run")
            if status < 400 and args.wait:
                print(json.dumps(body, indent=2))
                return _follow(args, body["run_id"])
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
