"""``xcore plugin ...``: the loader's commands.

    xcore plugin new NAME           scaffold a working plugin in the plugins directory
    xcore plugin list               every plugin and its state
    xcore plugin validate PATH      check a plugin folder or archive (nothing is run)
    xcore plugin install PATH       install a folder or archive [--replace]
    xcore plugin uninstall NAME
    xcore plugin reload [NAME]      (no name: all)
    xcore plugin enable NAME / disable NAME
    xcore plugin request ID         where a queued request stands (queued, running, ...)
    xcore plugin request            the loader's queue: in hand, then every request in line

A change the server cannot finish within its admin wait (the loader answers requests
one at a time) is accepted: the command prints "accepted, position N" and exits 0;
with ``--wait [--timeout S]`` it follows the request to its outcome instead (exit 0 on
success, 1 with the failure's stage, file and reason).

Commands that change a running server go through its admin API (``--url``, default
``http://<host>:<port>`` from the settings; the token from ``--token`` or
``XCORE_ADMIN_TOKEN``). When no server answers, ``list``, ``install`` and ``uninstall``
work offline on the plugins directory and the log; ``new`` and ``validate`` always do.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from kernel.cli import add_settings_arguments, load_settings
from kernel.client import ServerUnreachable, admin_call
from kernel.errors import XcoreError
from kernel.events import Meta, NewEvent
from kernel.http import HttpSurface
from kernel.projections import state_at
from kernel.settings import Settings
from kernel.store import EventStore

from . import installer
from .events import PluginInstalled, PluginUninstalled, stream_of
from .manifest import ManifestError, read_manifest, valid_name
from .projection import PluginTable
from .scaffold import scaffold
from .settings import LoaderSettings

__all__ = ["register"]


ServerDown = ServerUnreachable


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("plugin", help="create, check, install and manage plugins")
    sub = parser.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)

    def command(name: str, help: str, func: Any, server: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        add_settings_arguments(p)
        if server:
            p.add_argument("--url", help="the server (default http://<host>:<port>)")
            p.add_argument("--token", help="admin token (default $XCORE_ADMIN_TOKEN)")
        p.set_defaults(func=func)
        return p

    command("new", "scaffold a new plugin", cmd_new, server=False).add_argument("name")
    command("list", "list plugins and their state", cmd_list).add_argument(
        "--json", action="store_true", help="print JSON"
    )
    command("validate", "validate a plugin folder or archive", cmd_validate, server=False)
    sub.choices["validate"].add_argument("path", type=Path)
    p = command("install", "install a plugin folder or archive", cmd_install)
    p.add_argument("path", type=Path)
    p.add_argument("--replace", action="store_true", help="replace an installed plugin")
    _waits(p)
    _waits(command("uninstall", "uninstall a plugin", cmd_uninstall)).add_argument("name")
    _waits(command("reload", "reload a plugin (or all)", cmd_reload)).add_argument(
        "name", nargs="?"
    )
    _waits(command("enable", "enable a plugin", cmd_enable)).add_argument("name")
    _waits(command("disable", "disable a plugin", cmd_disable)).add_argument("name")
    p = _waits(command("request", "where a request to the loader stands", cmd_request))
    p.add_argument(
        "id", type=int, nargs="?", help="the request's id (its log position); none: the queue"
    )
    p.add_argument(
        "--page",
        type=int,
        default=500,
        metavar="N",
        help="without ID: read the queue N requests at a time (1-1000, default 500)",
    )
    p.add_argument("--json", action="store_true", help="without ID: print the queue as JSON")


def _waits(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--wait",
        action="store_true",
        help="if the server accepts the request for later, follow it to its outcome",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="with --wait: give up after S seconds"
    )
    return p


# -- talking to the server -----------------------------------------------------------------


def _url(args: argparse.Namespace, settings: Settings) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def _token(args: argparse.Namespace, settings: Settings) -> str:
    if args.token:
        return str(args.token)
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    return ""  # the server answers 401, and _report says where a token comes from


def _call(
    args: argparse.Namespace,
    settings: Settings,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, Any]:
    return admin_call(
        _url(args, settings),
        _token(args, settings),
        method,
        path,
        body=body,
        content_type=content_type,
        # the server answers within its admin wait (202 after it: accepted for later)
        timeout=max(settings.request_timeout, _limits_settings(settings).admin_wait or 0) + 5,
    )


def _report(status: int, body: Any, token: str | None = None) -> int:
    if status in (401, 403):
        if not token:
            msg = "no admin token was given: pass it with --token or XCORE_ADMIN_TOKEN"
        else:
            msg = (
                "the server refused the admin token given (wrong token for this server; "
                "check --token or XCORE_ADMIN_TOKEN)"
            )
        print(f"xcore: error ({status}): {msg}", file=sys.stderr)
        return 1
    if isinstance(body, dict) and "detail" in body and status >= 400:
        print(f"xcore: error ({status}): {body['detail']}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0 if status < 400 else 1


FINAL = ("succeeded", "failed")


def _answer(args: argparse.Namespace, settings: Settings, status: int, body: Any) -> int:
    """Report an answer; a 202 (accepted, queued) is followed with ``--wait``."""
    if status != 202 or not isinstance(body, dict):
        return _report(status, body, _token(args, settings))
    pending = (
        [body]
        if "results" not in body
        else [r for r in body["results"] if r.get("status") not in FINAL]
    )
    if not getattr(args, "wait", False):
        if "results" in body:
            print(json.dumps(body, indent=2))
        for r in pending:
            merged = " (joined a reload already queued)" if r.get("merged") else ""
            print(
                f"accepted, position {r.get('queue_position')}: request {r['id']} "
                f"({r.get('request')} {r.get('name') or r.get('source') or ''}){merged}; "
                f"follow it with `xcore plugin request {r['id']} --wait`"
            )
        return 0
    if "results" in body:
        print(json.dumps(body, indent=2))
    code = 0 if "results" not in body or not body.get("failed") else 1
    for r in pending:
        code = max(code, _follow(args, settings, r))
    return code


def _follow(args: argparse.Namespace, settings: Settings, body: dict[str, Any]) -> int:
    """Poll the request's status until its outcome: 0 if it succeeded, 1 otherwise."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    delay = 0.05
    seen = None
    while True:
        where = body.get("queue_position")
        state = body.get("status")
        if state != seen:
            seen = state
            place = f", position {where}" if state == "queued" else ""
            print(f"request {body['id']}: {state}{place}", file=sys.stderr)
        if state in FINAL:
            print(json.dumps(body, indent=2))
            if state == "succeeded":
                return 0
            at = body.get("file") or ""
            if at and body.get("line"):
                at = f"{at}:{body['line']}"
            stage = f"[{body.get('stage')}] " if body.get("stage") else ""
            at = f"{at}: " if at else ""
            print(f"xcore: failed: {stage}{at}{body.get('error', 'failed')}", file=sys.stderr)
            return 1
        if deadline is not None and time.monotonic() > deadline:
            print(
                f"xcore: request {body['id']} is still {state} after {args.timeout:g}s (it "
                f"goes on: `xcore plugin request {body['id']} --wait` follows it)",
                file=sys.stderr,
            )
            return 1
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
        try:
            status, fresh = _call(args, settings, "GET", f"/loader/requests/{int(body['id'])}")
        except ServerUnreachable as exc:
            raise XcoreError(
                f"lost the server while following request {body['id']} ({exc}); once it is "
                f"back, `xcore plugin request {body['id']}` says where the request stands"
            ) from None
        if status != 200:
            return _report(status, fresh, _token(args, settings))
        body = fresh


# -- commands ---------------------------------------------------------------------------------


def cmd_new(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    name = args.name
    if not valid_name(name):
        raise XcoreError(f"{name!r} is not a valid plugin name (a letter, then letters, digits, _)")
    reserved = HttpSurface().is_reserved(f"/app/{name}")
    if reserved:
        raise XcoreError(f"/app/{name} collides with {reserved}")
    folder = settings.plugins_dir / name
    if folder.exists():
        raise XcoreError(f"{folder} already exists")
    for path in scaffold(folder, name):
        print(f"created {path}")
    installer.validate_folder(folder, name)
    print(f"plugin {name!r} is ready: GET /app/{name}/status once loaded")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    limits = _limits(settings)
    path: Path = args.path
    try:
        if path.is_dir():
            manifest = installer.validate_folder(path, None, limits)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                staged = installer.stage(path, Path(tmp), limits)
                manifest = staged.manifest
        reserved = HttpSurface().is_reserved(manifest.prefix) if manifest.prefix else None
        if reserved:
            raise ManifestError(
                manifest.name, "run.py", f"collides with the kernel's {reserved}", "api_prefix"
            )
    except (ManifestError, installer.InstallError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {manifest.name} {manifest.version} ({manifest.mode}, prefix {manifest.prefix})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    try:
        status, rows = _call(args, settings, "GET", "/plugins")
        if status >= 400:
            return _report(status, rows, _token(args, settings))
        where = "server"
    except ServerDown:
        rows = asyncio.run(_offline_rows(settings))
        where = "offline (no server answers: the state last recorded in the log)"
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"plugins ({where}):")
    for r in rows:
        error = (
            f"  [{r['last_error']['stage']}] {r['last_error']['error']}"
            if r.get("last_error")
            else ""
        )
        print(
            f"  {r['name']:<20} {r.get('status', '?'):<9} v{r.get('version') or '?':<10} "
            f"gen {r.get('generation') or '-':<4} {r.get('prefix') or '-':<24}{error}"
        )
    return 0


async def _offline_rows(settings: Settings) -> list[dict[str, Any]]:
    from kernel.store.sqlite import SQLiteStore

    rows: dict[str, dict[str, Any]] = {}
    store: EventStore | None = None
    if settings.store == "postgres":  # the cluster's log: read it there
        from kernel.kernel import store_from_settings

        store = store_from_settings(settings)
    elif settings.database_path.exists():
        store = SQLiteStore(settings.database_path, readonly=True)
    if store is not None:
        await store.open()
        try:
            table = await state_at(store, PluginTable, await store.last_position())
        finally:
            await store.close()
        rows = {r["name"]: r for r in table.all()}
    if settings.plugins_dir.is_dir():
        for p in sorted(settings.plugins_dir.iterdir()):
            if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in rows:
                rows[p.name] = {"name": p.name, "status": "unloaded", "version": None}
    for r in rows.values():
        folder = settings.plugins_dir / r["name"]
        r["installed"] = folder.is_dir()
        if r["installed"]:
            try:  # the version on disk (what the next start loads), read without running it
                r["version"] = read_manifest(folder, r["name"]).version
            except ManifestError as exc:
                r.setdefault("last_error", {"stage": "manifest", "error": str(exc)})
        if r.get("status") == "loaded":
            r["status"] = "stopped"
    return [rows[n] for n in sorted(rows)]


def cmd_install(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    path: Path = args.path
    if not path.exists():
        raise XcoreError(f"{path}: no such file or folder")
    if path.is_dir():
        try:  # links and special files are refused here exactly as an offline install does
            installer.check_tree(path, _limits(settings), str(path))
        except installer.InstallError as exc:
            raise XcoreError(f"install refused, nothing changed: {exc}") from None
    data, filename = _archive_bytes(path)
    boundary = uuid.uuid4().hex
    body = _multipart(boundary, filename, data, {"replace": "true" if args.replace else "false"})
    try:
        status, out = _call(
            args,
            settings,
            "POST",
            "/plugins",
            body=body,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
    except ServerDown as down:
        _refuse_offline_in_a_cluster(settings, f"install {path.name}", down)
        return asyncio.run(_offline_install(settings, path, args.replace))
    return _answer(args, settings, status, out)


def _archive_bytes(path: Path) -> tuple[bytes, str]:
    if path.is_file():
        return path.read_bytes(), path.name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(installer._files(path)):
            zf.write(file, f"{path.name}/{file.relative_to(path).as_posix()}")
    return buf.getvalue(), f"{path.name}.zip"


def _multipart(boundary: str, filename: str, data: bytes, fields: dict[str, str]) -> bytes:
    parts = []
    for key, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def _refuse_offline_in_a_cluster(settings: Settings, what: str, down: Exception) -> None:
    """With the cluster's PostgreSQL log, a plugin change goes through a running node:
    done offline it reached this machine's plugins folder and a local SQLite file that
    no node reads (the other nodes never got it, this one lost it at its next start)."""
    if settings.store == "postgres":
        raise XcoreError(
            f"{what}: {down}; this node uses the cluster's PostgreSQL log, where a plugin "
            "change must go through a running node so that every node applies it (offline "
            "it would reach this machine only): start a node, or give --url of a running "
            "one; nothing changed"
        )


async def _record_offline(settings: Settings, event: Any, name: str) -> None:
    from kernel.store.sqlite import SQLiteStore

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(settings.database_path, synchronous=settings.synchronous)
    await store.open()
    try:
        await store.append(
            [NewEvent.of(event, Meta(actor="cli", node=settings.node))], stream=stream_of(name)
        )
    finally:
        await store.close()


async def _offline_install(settings: Settings, path: Path, replace: bool) -> int:
    plugins_dir = settings.plugins_dir
    plugins_dir.mkdir(parents=True, exist_ok=True)
    try:
        staged = installer.stage(path, plugins_dir, _limits(settings))
        installer.commit(staged, plugins_dir, replace)
        installer.discard(staged)
    except (installer.InstallError, ManifestError) as exc:
        raise XcoreError(f"install refused, nothing changed: {exc}") from None
    await _record_offline(
        settings,
        PluginInstalled(
            name=staged.name,
            version=staged.manifest.version,
            source=str(path),
            digest=staged.digest,
        ),
        staged.name,
    )
    print(f"installed {staged.name} {staged.manifest.version} (offline: loads at next start)")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    try:
        status, out = _call(args, settings, "DELETE", f"/plugins/{args.name}")
    except ServerDown as down:
        _refuse_offline_in_a_cluster(settings, f"uninstall {args.name}", down)
        folder = settings.plugins_dir / args.name
        if not valid_name(args.name) or not folder.is_dir():
            raise XcoreError(f"no plugin named {args.name!r} in {settings.plugins_dir}") from None
        installer.remove_plugin(folder)
        asyncio.run(_record_offline(settings, PluginUninstalled(name=args.name), args.name))
        print(f"uninstalled {args.name} (offline)")
        return 0
    return _answer(args, settings, status, out)


def cmd_reload(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    path = f"/plugins/{args.name}/reload" if args.name else "/plugins/reload"
    return _answer(args, settings, *_call(args, settings, "POST", path))


def cmd_enable(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    return _answer(args, settings, *_call(args, settings, "POST", f"/plugins/{args.name}/enable"))


def cmd_disable(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    return _answer(args, settings, *_call(args, settings, "POST", f"/plugins/{args.name}/disable"))


def cmd_request(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if args.id is None:
        return _list_requests(args, settings)
    status, body = _call(args, settings, "GET", f"/loader/requests/{args.id}")
    if status != 200 or not isinstance(body, dict):
        return _report(status, body, _token(args, settings))
    if args.wait or body.get("status") in FINAL:
        return _follow(args, settings, body)
    print(json.dumps(body, indent=2))
    return 0


#: Pages read at most by ``xcore plugin request`` (a line that keeps moving ends somewhere).
MAX_PAGES = 10_000


def _list_requests(args: argparse.Namespace, settings: Settings) -> int:
    """The loader's queue, following its pages (``next_cursor``) to the end of the line."""
    if not 1 <= args.page <= 1000:
        raise XcoreError(f"--page {args.page}: give a page size from 1 to 1000")
    queued: list[dict[str, Any]] = []
    cursor: str | None = None
    running = None
    total = 0
    for _ in range(MAX_PAGES):
        query = f"?limit={args.page}" + (f"&cursor={cursor}" if cursor is not None else "")
        status, body = _call(args, settings, "GET", f"/loader/requests{query}")
        if status != 200 or not isinstance(body, dict):
            return _report(status, body, _token(args, settings))
        if cursor is None:
            running = body.get("running")
        total = body.get("total", total)
        queued.extend(body.get("queued", []))
        following = body.get("next_cursor")
        if following is None or following == cursor:
            break
        cursor = str(following)
    if args.json:
        print(json.dumps({"running": running, "queued": queued, "total": total}, indent=2))
        return 0
    if running is None:
        print("in hand: nothing")
    else:
        print(f"in hand: request {running['id']} ({_said(running)})")
    print(f"in line: {len(queued)}")
    for r in queued:
        print(f"  {r.get('queue_position')}. request {r['id']} ({_said(r)})")
    return 0


def _said(r: dict[str, Any]) -> str:
    return f"{r.get('request')} {r.get('name') or r.get('source') or ''}".rstrip()


def _limits_settings(settings: Settings) -> LoaderSettings:
    return settings.section("loader", LoaderSettings)


def _limits(settings: Settings) -> installer.Limits:
    return installer.Limits.of(_limits_settings(settings))
