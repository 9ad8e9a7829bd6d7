"""``xcore token ...``: scoped API tokens, through a running server's admin API.

    xcore token create --name ci --scope admin:read [--scope ...] [--expires 30d]
    xcore token list [--json]
    xcore token revoke ID

The server is ``--url`` (default ``http://127.0.0.1:8000``); the admin token comes
from ``--token`` or ``XCORE_ADMIN_TOKEN``. The new token is printed once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from kernel.client import ServerUnreachable, admin_call

__all__ = ["parse_duration", "register"]

DEFAULT_URL = "http://127.0.0.1:8000"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 3600, 15m, 12h, 30d or 2w"
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("token", help="issue, list and revoke scoped API tokens")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    parser.add_argument("--token", help="admin token (default: $XCORE_ADMIN_TOKEN)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    create = actions.add_parser("create", help="issue a token (printed once)")
    create.add_argument("--name", default="api", help="a label for the token")
    create.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        required=True,
        help="a scope the token holds (repeatable): admin:read, admin:write, or a plugin's",
    )
    create.add_argument("--expires", type=parse_duration, help="lifetime: 3600, 15m, 12h, 30d")
    ls = actions.add_parser("list", help="every token issued")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = actions.add_parser("revoke", help="revoke a token")
    revoke.add_argument("id", help="the token's id (from 'xcore token list')")
    parser.set_defaults(func=main, _parser=parser)


def main(args: argparse.Namespace) -> int:
    if args.action is None:
        args._parser.print_help()
        return 2
    token = args.token or os.environ.get("XCORE_ADMIN_TOKEN")
    if not token:
        print("xcore token: no admin token: pass --token or set XCORE_ADMIN_TOKEN", file=sys.stderr)
        return 1
    try:
        if args.action == "create":
            payload = {"name": args.name, "scopes": args.scopes, "expires_in": args.expires}
            status, body = admin_call(
                args.url,
                token,
                "POST",
                "/tokens",
                body=json.dumps(payload).encode(),
                content_type="application/json",
            )
        elif args.action == "list":
            status, body = admin_call(args.url, token, "GET", "/tokens")
        else:
            status, body = admin_call(args.url, token, "DELETE", f"/tokens/{args.id}")
    except ServerUnreachable as exc:
        print(f"xcore token: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        detail = body.get("detail", body) if isinstance(body, dict) else body
        print(f"xcore token {args.action}: HTTP {status}: {detail}", file=sys.stderr)
        return 1
    if args.action == "list" and not args.json:
        print(_table(body) if body else "no tokens")
    elif args.action == "create":
        print(body["token"])
        print(
            f"token {body['id']} ({', '.join(body['scopes'])}) issued; it is shown only once",
            file=sys.stderr,
        )
    else:
        print(json.dumps(body, indent=2))
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    def when(ts: float | None) -> str:
        return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))

    cols = ["id", "name", "scopes", "expires", "state"]
    cells = [
        [
            r["id"],
            r["name"],
            ",".join(r["scopes"]),
            when(r["expires_at"]),
            "active" if r["active"] else ("revoked" if r["revoked_at"] else "expired"),
        ]
        for r in rows
    ]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
