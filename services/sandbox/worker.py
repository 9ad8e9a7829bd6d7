"""The sandbox worker: the process a sandboxed plugin's code runs in, and nothing else.

Run as ``python -I -B -m services.sandbox.worker`` by the supervisor, in a new session,
with an allowlisted environment and its working directory in the plugin's folder. In
this order, before any plugin code runs:

1. it keeps private copies of stdin and stdout for the frames (:mod:`.protocol`) and
   points fd 0 at ``/dev/null`` and fd 1 at stderr, so whatever the plugin prints goes
   to stderr (which the supervisor drains and tails) and can never corrupt a frame;
2. it reads its ``config`` frame, gives up root if told to, and sets its rlimits (address
   space, CPU, open files, processes, file size, no core files) as hard limits;
3. it imports the plugin (:mod:`.plugin`), runs ``on_load`` and answers ``ready`` with
   the plugin's routes, OpenAPI schema, tasks and hooks (or ``failed``, naming the stage
   and the culprit).

Then it serves calls, several at once, on one asyncio loop: HTTP requests (the plugin's
FastAPI router in an app of its own), task runs (``current_task()`` set as in the kernel),
hooks, no-op calls (benchmarks), pings. A ``cancel`` cancels a call; a call whose code
cannot be cancelled (sync code in a thread) is answered ``honoured: false``, and its
``result`` is sent once the thread really ends (the supervisor kills the worker if that
takes longer than its grace). A ``MemoryError`` escaping plugin code ends the worker with
a ``fatal`` frame naming the memory limit: its heap can no longer be trusted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import datetime
from typing import Any

from .plugin import Failed, Plugin
from .protocol import (
    CHUNK,
    WINDOW_BYTES,
    WINDOW_FRAMES,
    FrameError,
    FrameReader,
    decode,
    encode,
    sizes,
)

#: Threads for the plugin's sync code (hooks and tasks; sync routes: as many again).
THREADS = 8
#: Largest read from the kernel's pipe.
READ_SIZE = 256 * 1024
#: Exit status of a worker that stops because plugin code exhausted its memory.
EXIT_MEMORY = 70


# -- the wire --------------------------------------------------------------------------


def _read_exactly(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def read_frame_blocking(fd: int) -> tuple[dict[str, Any], bytes]:
    size, head = sizes(_read_exactly(fd, 8))
    body = _read_exactly(fd, size - 4)
    return decode(b"\0\0\0\0" + body, head)


class Wire:
    """Frames out of the worker; frames never interleave.

    Frames sent on the event loop are gathered and written in one write: those sent
    while the frames of one read are dispatched leave at the end of that read (a no-op
    call's answer costs no extra loop iteration), the others once per loop iteration (a
    response's start, body and result leave together). Frames sent from other threads
    (logs, a late result) and urgent ones are written at once.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pending: list[bytes] = []
        #: Frames are being dispatched: :meth:`flush` comes when they are done.
        self._held = False
        self._scheduled = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def send(self, header: dict[str, Any], payload: bytes = b"", *, urgent: bool = False) -> None:
        data = encode(header, payload)
        if self._loop is not None and threading.get_ident() == self._loop_thread:
            self._pending.append(data)
            if urgent:
                self.flush()
            elif not self._held and not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)
            return
        with self.lock:
            self._write(data)

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._held = False
        self.flush()

    def flush(self) -> None:
        """Write the frames gathered on the loop (called on the loop)."""
        self._scheduled = False
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            with self.lock:
                self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


# -- serving ------------------------------------------------------------------------------


class Server:
    """Serves the supervisor's calls on one asyncio loop."""

    def __init__(self, wire: Wire, in_fd: int, plugin: Plugin) -> None:
        self.wire = wire
        self.in_fd = in_fd
        self.plugin = plugin
        self.calls: dict[int, asyncio.Task[Any]] = {}
        #: Calls whose sync code runs in a thread (a cancel cannot stop them).
        self.threaded: set[int] = set()
        self.bodies: dict[int, asyncio.Queue[tuple[bytes, bool] | None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="plugin")
        self._reader = FrameReader()
        self._done: asyncio.Future[None] | None = None
        #: The plugin's own requests to the kernel (appends, subscriptions) by id.
        self._asks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ask_id = 0
        #: Flow control of the responses being streamed, by call id.
        self.windows: dict[int, _Window] = {}
        #: The plugin's event handlers, by subscription id.
        self.handlers: dict[int, Any] = {}
        plugin.link = self

    def open(self) -> None:
        """Start reading the kernel's frames (before the plugin's import: its
        ``on_load`` may already append or subscribe)."""
        self.loop = loop = asyncio.get_running_loop()
        self.wire.attach(loop)
        self._done = loop.create_future()
        os.set_blocking(self.in_fd, False)
        loop.add_reader(self.in_fd, self._readable)

    async def serve(self) -> None:
        """Serve until the supervisor says ``stop`` or closes the pipe."""
        assert self.loop is not None and self._done is not None
        try:
            await self._done
        finally:
            self.loop.remove_reader(self.in_fd)

    def _readable(self) -> None:
        """Read what the pipe holds and dispatch its frames, in this callback."""
        try:
            data = os.read(self.in_fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the supervisor is gone
            self._stop()
            return
        self.wire.hold()
        try:
            for header, payload in self._reader.feed(data):
                if self.dispatch(header, payload) is False:
                    self._stop()
                    return
        except FrameError as exc:
            logging.getLogger("xcore.sandbox.worker").error("bad frame from the kernel: %s", exc)
            self._stop()
        finally:
            self.wire.release()

    def _stop(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def dispatch(self, h: dict[str, Any], payload: bytes) -> bool | None:
        op = h.get("op")
        cid = h.get("id", 0)
        if op == "ping":
            self.wire.send({"op": "pong", "id": cid})
        elif op == "noop":
            self.wire.send({"op": "result", "id": cid, "ok": True, "cpu_ms": 0.0})
        elif op == "http":
            queue: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue()
            queue.put_nowait((payload, bool(h.get("more"))))
            self.bodies[cid] = queue
            self._spawn(cid, self.http(cid, h["scope"], queue))
        elif op == "body":
            q = self.bodies.get(cid)
            if q is not None:
                q.put_nowait((payload, bool(h.get("more"))))
        elif op == "disconnect":
            q = self.bodies.get(cid)
            if q is not None:
                q.put_nowait(None)
            window = self.windows.get(cid)
            if window is not None:
                window.closed = True
                window.wake.set()
        elif op == "credit":
            window = self.windows.get(cid)
            if window is not None:
                window.frames -= int(h.get("frames", 0))
                window.bytes -= int(h.get("bytes", 0))
                window.wake.set()
        elif op == "task":
            self._spawn(cid, self.task(cid, h))
        elif op == "hook":
            self._spawn(cid, self.hook(cid, h["hook"]))
        elif op == "cancel":
            target = self.calls.get(cid)
            if target is not None:
                honoured = cid not in self.threaded
                target.cancel()
                self.wire.send({"op": "cancelled", "id": cid, "honoured": honoured})
        elif op == "event":
            self._spawn(cid, self.event(cid, h))
        elif op in ("appended", "subscribed"):
            waiter = self._asks.pop(cid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(h)
        elif op == "stop":
            return False
        return None

    # -- the plugin's requests to the kernel ---------------------------------------------

    async def _ask(self, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is not loop:
            raise RuntimeError(
                f"plugin {self.plugin.name!r}: ctx.append and ctx.subscribe must be awaited "
                "on the worker's event loop (from async code)"
            )
        self._ask_id += 1
        wid = self._ask_id
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._asks[wid] = waiter
        try:
            self.wire.send({**header, "id": wid}, payload)
            answer = await waiter
        finally:
            self._asks.pop(wid, None)
        if not answer.get("ok"):
            error = str(answer.get("error", "refused"))
            raise PermissionError(error) if answer.get("refused") else RuntimeError(error)
        return answer

    async def append(self, event: Any, stream: str | None) -> list[Any]:
        data = event.__pydantic_serializer__.to_json(event)
        answer = await self._ask(
            {
                "op": "append",
                "stream": stream,
                "type": event.type_name,
                "schema": event.schema_version,
            },
            data,
        )
        return [_recorded(r) for r in answer.get("records", [])]

    async def subscribe(self, handler: Any, types: list[str] | None) -> None:
        # registered under the id _ask gives the frame: the kernel may deliver an event
        # before its answer arrives
        sid = self._ask_id + 1
        self.handlers[sid] = handler
        try:
            await self._ask({"op": "subscribe", "types": types})
        except BaseException:
            self.handlers.pop(sid, None)
            raise

    async def event(self, cid: int, h: dict[str, Any]) -> dict[str, Any]:
        from kernel.sdk import plugin_context_var

        handler = self.handlers.get(h.get("sub", -1))
        try:
            if handler is not None:
                plugin_context_var.set(self.plugin.ctx)
                await self.run_code(cid, handler, _recorded(h))
            return {"ok": True}
        except (asyncio.CancelledError, MemoryError):
            raise
        except Exception as exc:
            return _error(exc)

    def _spawn(self, cid: int, coro: Any) -> None:
        task = asyncio.ensure_future(self._guard(cid, coro))
        self.calls[cid] = task

    async def _guard(self, cid: int, coro: Any) -> None:
        cpu0 = time.process_time()
        try:
            outcome = await coro
        except asyncio.CancelledError:
            return  # the supervisor stopped waiting: nothing to answer
        except MemoryError:
            self.fatal("memory")
            return
        finally:
            self.calls.pop(cid, None)
            self.threaded.discard(cid)
            self.bodies.pop(cid, None)
            self.windows.pop(cid, None)
        cpu_ms = (time.process_time() - cpu0) * 1000
        self.wire.send({"op": "result", "id": cid, "cpu_ms": cpu_ms, **outcome})

    def fatal(self, limit: str) -> None:
        with contextlib.suppress(BaseException):
            self.wire.send({"op": "fatal", "limit": limit}, urgent=True)
        os._exit(EXIT_MEMORY)

    async def run_code(self, cid: int, fn: Any, *args: Any) -> Any:
        """Plugin code: async on the loop, sync in a thread (marked: not cancellable)."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        self.threaded.add(cid)
        cf = self.executor.submit(contextvars.copy_context().run, fn, *args)
        try:
            result = await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            if cid and not cf.done():
                # the thread runs on: say so when it really ends, so the supervisor
                # stops counting the call against its wall time
                cf.add_done_callback(
                    lambda _: self.wire.send({"op": "result", "id": cid, "ok": False, "late": True})
                )
            raise
        finally:
            self.threaded.discard(cid)
        if inspect.isawaitable(result):
            return await result
        return result

    async def http(
        self, cid: int, scope: dict[str, Any], queue: asyncio.Queue[Any]
    ) -> dict[str, Any]:
        app = self.plugin.app
        scope = dict(scope)
        scope["headers"] = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in scope["headers"]]
        scope["query_string"] = scope["query_string"].encode("latin-1")
        scope["raw_path"] = scope.get("raw_path", scope["path"]).encode("latin-1")
        scope["client"] = tuple(scope["client"]) if scope.get("client") else None
        scope["server"] = tuple(scope["server"]) if scope.get("server") else None
        scope["state"] = {}
        scope["extensions"] = {}

        async def receive() -> dict[str, Any]:
            item = await queue.get()  # after the body, only a disconnect can come
            if item is None:
                queue.put_nowait(None)  # every later receive() sees it too
                return {"type": "http.disconnect"}
            chunk, more = item
            return {"type": "http.request", "body": chunk, "more_body": more}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers", [])
                ]
                # held for this loop iteration: a response whose body follows at once
                # leaves as one frame; a stream slow to start still shows its headers
                held[0] = {
                    "op": "start",
                    "id": cid,
                    "status": message["status"],
                    "headers": headers,
                }
                asyncio.get_running_loop().call_soon(release_start)
            elif kind == "http.response.body":
                body = message.get("body", b"")
                more = message.get("more_body", False)
                start = held[0]
                if start is not None:
                    held[0] = None
                    if not more and len(body) <= CHUNK:
                        start["op"] = "whole"
                        self.wire.send(start, body)
                        return
                    self.wire.send(start)
                for i in range(0, max(len(body), 1), CHUNK):
                    if window.closed:
                        raise ClientGone(f"request {cid}: the client disconnected")
                    last = i + CHUNK >= len(body)
                    piece = body[i : i + CHUNK]
                    self.wire.send({"op": "body", "id": cid, "more": more or not last}, piece)
                    if last and not more:
                        break  # the response is whole: nothing to wait for
                    window.frames += 1
                    window.bytes += len(piece)
                    while window.frames >= WINDOW_FRAMES or window.bytes >= WINDOW_BYTES:
                        # the client has not taken what was sent: pause this response
                        if window.closed:
                            raise ClientGone(f"request {cid}: the client disconnected")
                        window.wake.clear()
                        await window.wake.wait()

        def release_start() -> None:
            start = held[0]
            if start is not None:
                held[0] = None
                self.wire.send(start)

        window = self.windows[cid] = _Window()
        held: list[dict[str, Any] | None] = [None]
        token = _request_id.set(scope.get("xcore_request_id") or str(cid))
        try:
            if app is None:
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b'{"detail":"Not Found"}'})
            else:
                from kernel.sdk import plugin_context_var

                plugin_context_var.set(self.plugin.ctx)
                await app(scope, receive, send)
            release_start()  # a start and no body
            return {"ok": True}
        except (asyncio.CancelledError, MemoryError):
            raise
        except ClientGone:
            return {"ok": True, "disconnected": True}
        except Exception as exc:
            logging.getLogger(f"xcore.plugin.{self.plugin.name}").error(
                "request %s %s failed:\n%s",
                scope.get("method"),
                scope.get("path"),
                "".join(traceback.format_exception(exc)),
            )
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            _request_id.reset(token)

    async def task(self, cid: int, h: dict[str, Any]) -> dict[str, Any]:
        from kernel.sdk import TaskContext, plugin_context_var, task_context_var

        name = h["task"]
        fn = self.plugin.tasks.get(name)
        ctx = h.get("ctx") or {}
        token = _run_id.set(ctx.get("run_id"))
        try:
            if fn is None:
                raise LookupError(f"plugin {self.plugin.name!r} has no task {name!r}")
            logger = logging.getLogger(f"xcore.plugin.{self.plugin.name}")
            task_context_var.set(
                TaskContext(
                    task_id=ctx.get("task_id", name),
                    run_id=ctx.get("run_id", ""),
                    scheduled_for=datetime.fromisoformat(ctx["scheduled_for"])
                    if ctx.get("scheduled_for")
                    else datetime.now(),
                    attempt=int(ctx.get("attempt", 1)),
                    plugin=self.plugin.name,
                    config=self.plugin.ctx.config if self.plugin.ctx else None,
                    logger=logging.LoggerAdapter(
                        logger, {"run_id": ctx.get("run_id"), "task": ctx.get("task_id")}
                    ),
                )
            )
            plugin_context_var.set(self.plugin.ctx)
            await self.run_code(cid, fn)
            return {"ok": True}
        except (asyncio.CancelledError, MemoryError):
            raise
        except Exception as exc:
            return _error(exc)
        finally:
            _run_id.reset(token)

    async def hook(self, cid: int, hook: str) -> dict[str, Any]:
        from kernel.sdk import plugin_context_var

        fn = self.plugin.hooks.get(hook)
        try:
            if fn is not None:
                plugin_context_var.set(self.plugin.ctx)
                await self.run_code(cid, fn, self.plugin.ctx)
            return {"ok": True}
        except (asyncio.CancelledError, MemoryError):
            raise
        except Exception as exc:
            return _error(exc)


class ClientGone(OSError):
    """Raised by ``send`` once the client of a streamed response has left."""


class _Window:
    """What a streamed response has sent that its client has not taken yet."""

    __slots__ = ("bytes", "closed", "frames", "wake")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.closed = False
        self.wake = asyncio.Event()


def _recorded(r: dict[str, Any]) -> Any:
    from kernel.events import Meta, Recorded

    return Recorded(
        position=int(r["position"]),
        stream=str(r["stream"]),
        version=int(r["version"]),
        type=str(r["type"]),
        schema=int(r["schema"]),
        data=r["data"],
        meta=Meta(**r["meta"]),
        timestamp=float(r["timestamp"]),
    )


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "ok": False,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
    }


# -- logging to the supervisor ---------------------------------------------------------

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)


class FrameHandler(logging.Handler):
    """Log records travel as ``log`` frames, with the call's request or run id."""

    def __init__(self, wire: Wire) -> None:
        super().__init__()
        self.wire = wire

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.wire.send(
                {
                    "op": "log",
                    "level": record.levelno,
                    "logger": record.name,
                    "message": msg[:65536],
                    "request_id": _request_id.get(),
                    "run_id": getattr(record, "run_id", None) or _run_id.get(),
                }
            )
        except Exception:
            self.handleError(record)


# -- start ------------------------------------------------------------------------------


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    if uid is None or os.getuid() != 0:
        return
    os.setgroups([])
    os.setgid(gid if gid is not None else uid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - defensive
        raise RuntimeError("could not give up root")


#: mount(2) flags.
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
#: Per-mount options of /proc/self/mountinfo a read-only remount must keep.
_KEPT = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048}


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, per-mount options, fs type) of this mount namespace, in order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for a space
            out.append((point, fields[5], right.split()[0]))
    return out


def _private_mounts(libc: Any, writable: list[str]) -> list[str]:
    """A mount namespace of the worker's own where the whole file system is read-only
    but ``writable``, and the cgroup file systems are hidden. Returns what could not be
    done (mounts left writable)."""

    import ctypes

    def mount(source: bytes | None, target: str, fstype: bytes | None, flags: int) -> int:
        data = b"size=4k" if fstype == b"tmpfs" else None
        if libc.mount(source, target.encode(), fstype, flags, data) != 0:
            return ctypes.get_errno()
        return 0

    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # nothing mounted here reaches the kernel's namespace
    if mount(None, "/", None, _MS_REC | _MS_PRIVATE):
        raise OSError(ctypes.get_errno(), "making / private")
    mounts = _mounts()
    problems = []
    for point, options, _ in mounts:
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options.split(","):
            flags |= _KEPT.get(option, 0)
        if error := mount(None, point, None, flags):
            problems.append(f"{point} ({os.strerror(error)})")
    # root owns the cgroup files (no capability is needed to write them): hide them all
    points = {p for p, _, fstype in mounts if fstype in ("cgroup", "cgroup2")}
    parents = {os.path.dirname(p) for p in points}
    hide = parents if len(parents) == 1 and os.path.ismount(next(iter(parents))) else points
    for point in sorted(hide):
        flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        if error := mount(b"none", point, b"tmpfs", flags):
            problems.append(f"{point} (cgroups not hidden: {os.strerror(error)})")
    for path in writable:
        if os.path.isdir(path) and (
            mount(path.encode(), path, None, _MS_BIND | _MS_REC)
            or mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV)
        ):
            problems.append(f"{path} (not writable: {os.strerror(ctypes.get_errno())})")
    return problems


def _confine_root(uid: int, gid: int, writable: list[str]) -> list[str]:
    """Confine a worker that must keep root's file access (at the ``rlimits`` level, when
    the interpreter is private to root). Before giving up its capabilities it

    - makes, in a mount namespace of its own, the whole file system read-only but its
      data folder and ``/tmp`` (``writable``), and hides the cgroup file systems (so it
      cannot write its ``pids.max`` nor leave its pids cgroup);
    - becomes ``uid``/``gid`` for everything but files (its file-system ids stay root's,
      to reach the interpreter), so it can no longer signal the kernel nor any other
      process of root, and ``RLIMIT_NPROC`` counts it (a program it executes runs as
      ``uid``: the file-system ids follow the effective ones on ``execve``);
    - sets ``no_new_privs``, so a set-user-ID program gives it nothing back.

    Where the mount namespace cannot be made (a container without ``CAP_SYS_ADMIN``),
    the rest still holds; the returned warnings say what is missing.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        problems = _private_mounts(libc, writable)
    except OSError as exc:
        problems = [
            f"no mount namespace of its own ({exc.strerror or exc}): root's files "
            "stay writable and its cgroup files too"
        ]
    # PR_SET_SECUREBITS(SECBIT_NO_SETUID_FIXUP): the capabilities stay through the switch
    # (needed for the file-system ids, then dropped for good below)
    if libc.prctl(28, 1 << 2, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "keeping capabilities through setuid")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc.setfsuid(0)
    libc.setfsgid(0)
    if libc.setfsuid(-1) != 0 or libc.setfsgid(-1) != 0:  # -1 only reads them back
        raise OSError("could not keep root's file access")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "setting no_new_privs")
    if not _drop_capabilities():
        raise OSError("could not drop the capabilities of a worker keeping root's files")
    return problems


def _die_with(kernel_pid: int | None) -> None:
    """Die with the kernel even if it is killed (a worker looping forever would never
    read the end of its pipe). Set after giving up root: a change of user clears it.
    ``kernel_pid`` is the expected parent (None under bubblewrap, whose own
    ``--die-with-parent`` covers it)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if kernel_pid is not None and os.getppid() != kernel_pid:
        os._exit(4)  # the kernel died before the signal was armed


def _drop_capabilities() -> bool:
    """A worker that keeps root gives up every capability (so it cannot read another
    process's memory or environment, nor override file permissions)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last one)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    return bool(libc.capset(ctypes.byref(header), ctypes.byref(data)) == 0)


def main() -> None:
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    wire = Wire(out_fd)
    try:
        header, _ = read_frame_blocking(in_fd)
    except (EOFError, OSError):
        os._exit(2)
    cfg = header["config"]
    try:
        _drop_privileges(cfg.get("uid"), cfg.get("gid"))
        unconfined: list[str] = []
        if cfg.get("uid") is None and os.getuid() == 0 and cfg.get("signal_uid") is not None:
            writable = [cfg["data_dir"], "/tmp"]
            unconfined = _confine_root(int(cfg["signal_uid"]), int(cfg["signal_gid"]), writable)
        _die_with(cfg.get("kernel_pid"))
        from .limits import apply

        applied = apply(cfg["limits"])
        # Python ignores SIGXFSZ (writes past RLIMIT_FSIZE then fail with EFBIG); a
        # breach must end the worker like any other, so the signal gets its default back
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        if os.getuid() == 0 and not _drop_capabilities():
            raise OSError("could not drop the capabilities of a worker running as root")
        threading.stack_size(2 * 1024 * 1024)
    except Exception as exc:
        wire.send(
            {
                "op": "failed",
                "stage": "mode",
                "error": f"plugin {cfg['name']!r}: the sandbox could not set its limits: {type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        )
        os._exit(3)
    root = logging.getLogger()
    root.handlers[:] = [FrameHandler(wire)]
    root.setLevel(cfg.get("log_level", "INFO"))
    for problem in unconfined:
        logging.getLogger("xcore.sandbox.worker").warning(
            "plugin %r: the worker is less confined than it should be: %s", cfg["name"], problem
        )
    plugin = Plugin(cfg)
    server = Server(wire, in_fd, plugin)

    async def start() -> None:
        import anyio.to_thread

        # sync routes run in anyio's thread pool: keep it well inside the process limit
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        server.open()
        try:
            described = plugin.load()
            hook = plugin.hooks.get("on_load")
            if hook is not None:
                try:
                    await server.run_code(0, hook, plugin.ctx)
                except MemoryError:
                    raise
                except Exception as exc:
                    raise Failed(
                        "hook",
                        f"plugin {plugin.name!r}: run.py: on_load raised {type(exc).__name__}: {exc}",
                        "".join(traceback.format_exception(exc)),
                    ) from None
        except Failed as failed:
            wire.send(
                {
                    "op": "failed",
                    "stage": failed.stage,
                    "error": failed.message,
                    "traceback": failed.tb,
                }
            )
            return
        except MemoryError:
            server.fatal("memory")
        wire.send(
            {
                "op": "ready",
                "pid": os.getpid(),
                "uid": os.getuid(),
                "rlimits": applied,
                "hooks": sorted(plugin.hooks),
                **described,
            }
        )
        await server.serve()

    try:
        asyncio.run(start())
    except MemoryError:
        server.fatal("memory")
    wire.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
