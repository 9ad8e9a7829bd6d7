"""One worker process seen from the kernel: its pipes, its calls in flight, its watchdog.

A :class:`Worker` is run by its plugin's supervisor in a task group (``run``): it starts
the process in a new session, sends the ``config`` frame, waits for ``ready`` (or
``failed``), then reads frames, drains stderr (keeping its tail), and watches the worker
until it exits. Everything it starts ends with it: when ``run`` returns the process group
is dead and every call still waiting has failed with :class:`WorkerGone`.

Guarantees:

- a call's frames reach only that call (routed by id); a frame for an id nobody waits
  for any more — the late reply of a cancelled call — is dropped;
- a call's wall time is enforced here: past its deadline the process group is killed and
  the breach recorded (``wall``), whether or not its caller still waits; a cancelled
  call whose code cannot stop (sync code in a thread) keeps its deadline;
- a worker that stops answering pings (stuck in C code, or an endless loop on its event
  loop) is killed (``heartbeat``); CPU and memory (RSS of its whole process tree) are
  sampled for the admin API.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from subprocess import PIPE
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process, TaskGroup

from kernel.events import Recorded

from .bridge import MAX_SUBSCRIPTIONS, Bridge, Refused, record_to_wire
from .cgroup import PidsCgroup
from .isolation import Launch
from .protocol import CHUNK, FrameError, FrameReader, encode
from .reaper import Reaper

if TYPE_CHECKING:
    from kernel.subscriptions import Subscription

__all__ = ["Exit", "Worker", "WorkerGone"]

log = logging.getLogger("xcore.sandbox")
_monotonic = time.monotonic

#: Log lines a worker may send per second (stderr included) before lines are dropped.
LOG_RATE = 200
STDERR_TAIL = 40
#: Longest log message of a worker passed on (the worker's own handler cuts at this too).
LOG_MESSAGE = 65536
#: Frames of a streaming call waiting for its caller (256 KiB each at most).
CALL_BUFFER = 64
#: Bytes queued to a worker's stdin before a sender waits for the pipe to drain.
WRITE_HIGH_WATER = 1024 * 1024
#: Appends and subscriptions of one worker being served at once.
MAX_ASKS = 256
#: Bytes queued to a worker that does not read them past which it is killed.
STUCK_BUFFER = 16 * WRITE_HIGH_WATER
#: Size asked for the buffers of the pipes to and from a worker.
PIPE_SIZE = 1024 * 1024
#: Largest read from a worker's pipe. Below glibc's mmap threshold (128 KiB): a larger
#: buffer is mapped and unmapped by every read (about 15 us each) until glibc adapts.
READ_SIZE = 64 * 1024


class WorkerGone(Exception):
    """The worker ended while the call waited (``exit`` says how, once known)."""

    def __init__(self, plugin: str, why: str, exit: Exit | None = None) -> None:
        super().__init__(f"plugin {plugin!r}: {why}")
        self.plugin = plugin
        self.why = why
        self.exit = exit


class CallAborted(WorkerGone):
    """The call was given up by the supervisor (its caller could not keep up)."""


@dataclass
class Exit:
    """How a worker ended."""

    #: ``stopped`` (asked), ``limit`` (a breach: killed), ``crash`` (died on its own),
    #: ``failed`` (never became ready).
    kind: str
    pid: int
    exit: int | None = None
    signal: int | None = None
    limit: str | None = None
    value: float = 0.0
    detail: str = ""
    stderr: str = ""

    def describe(self) -> str:
        if self.kind == "limit":
            return f"limit {self.limit} exceeded ({self.detail or self.value})"
        if self.kind == "crash" and self.detail:
            return f"worker killed: {self.detail}"
        if self.kind == "crash":
            how = f"signal {self.signal}" if self.signal else f"exit code {self.exit}"
            return f"worker crashed ({how})"
        return f"worker {self.kind}"


#: Signals the kernel raises for a breached rlimit, by limit.
_SIGNAL_LIMITS = {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "file_size"}


class _Call:
    """A call sent to the worker and not answered yet."""

    __slots__ = ("aborted", "cancelling", "deadline", "done", "label", "send")

    def __init__(
        self,
        send: _Inbox | None,
        deadline: float,
        label: str,
        done: asyncio.Future[dict[str, Any] | None] | None = None,
    ) -> None:
        #: The frames of a streaming call (HTTP), or of a cancel in progress.
        self.send = send
        #: When the worker is killed (``wall``) if the call has not ended.
        self.deadline = deadline
        self.label = label
        #: A request/answer call waits on ``done`` for its ``result`` (None: the worker
        #: ended).
        self.done = done
        self.aborted = False
        #: The kernel sent a ``cancel`` (only then may a ``cancelled`` frame end the call).
        self.cancelling = False


@dataclass
class _RateLimit:
    per_second: int
    window: float = 0.0
    used: int = 0
    dropped: int = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window >= 1.0:
            if self.dropped:
                log.warning(
                    "sandbox: %d log lines of a worker were dropped (rate limit)", self.dropped
                )
            self.window, self.used, self.dropped = now, 0, 0
        if self.used < self.per_second:
            self.used += 1
            return True
        self.dropped += 1
        return False


@dataclass(eq=False)
class Worker:
    """One worker process of one plugin generation."""

    plugin: str
    generation: int
    launch: Launch
    config: dict[str, Any]
    wall_time: float
    heartbeat_interval: float
    heartbeat_timeout: float
    start_timeout: float
    limits: dict[str, Any]
    #: Appends and subscriptions of the plugin's code (None: refused).
    bridge: Bridge | None = None
    #: How long a cancelled call's code may take to stop before the worker is killed.
    cancel_grace: float = 2.0
    #: Kills what the worker started if the kernel dies (rlimits level).
    reaper: Reaper | None = None

    pid: int = 0
    ready: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    exit: Exit | None = None
    started_at: float = 0.0
    start_ms: float = 0.0
    rss: int = 0
    rss_max: int = 0
    cpu_s: float = 0.0
    tasks: int = 0
    ready_event: anyio.Event = field(default_factory=anyio.Event)
    exited: anyio.Event = field(default_factory=anyio.Event)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL))

    def __post_init__(self) -> None:
        self._calls: dict[int, _Call] = {}
        self._next = 0
        self._flow = _Flow()
        #: The read end of the worker's pipe (-1: closed), read in :meth:`_readable`.
        self._rfd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Ready, not exited, not being killed (what :attr:`alive` says, kept as a flag:
        #: every call checks it).
        self._up = False
        self._out: asyncio.WriteTransport | None = None
        self._proc: Process | None = None
        self._kill: tuple[str, float, str] | None = None
        self._fatal: str | None = None
        self._stopping = False
        self._last_pong = 0.0
        self._t0 = 0.0
        self._logs = _RateLimit(LOG_RATE)
        self._reader = FrameReader()
        self._tg: TaskGroup | None = None
        #: Frames gathered in this loop iteration (None: the next one is written at once).
        self._batch: list[bytes] | None = None
        self._batched = 0
        self._cgroup: PidsCgroup | None = None
        #: ``pids-cgroup``, ``rlimit`` or ``watch`` (see ``SandboxStarted.process_limit``).
        self.process_limit = ""
        self._subs: list[Subscription] = []
        self._asks = 0
        self._logger = logging.getLogger(f"xcore.plugin.{self.plugin}")

    @property
    def in_flight(self) -> int:
        """Calls sent to the worker and not answered yet."""
        return len(self._calls)

    @property
    def alive(self) -> bool:
        return self._up

    # -- life ------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve and watch the process until it ends (never raises)."""
        self._t0 = time.perf_counter()
        # the wire is two pipes of our own: the worker's is read in a readable callback of
        # the loop and each frame dispatched there (no transport, task or stream between);
        # ours is written through an asyncio transport (it buffers what the pipe cannot
        # take at once)
        to_worker, from_kernel = _pipe()
        from_worker, to_kernel = _pipe()
        try:
            proc = await anyio.open_process(
                self.launch.argv,
                stdin=to_worker,
                stdout=to_kernel,
                stderr=PIPE,
                cwd=str(self.launch.cwd),
                env=self.launch.env,
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (from_kernel, from_worker):
                os.close(fd)
            self.failure = {
                "stage": "mode",
                "error": f"plugin {self.plugin!r}: the sandbox worker could not start: {exc}",
            }
            self.exit = Exit("failed", 0)
            self.ready_event.set()
            self.exited.set()
            return
        finally:
            os.close(to_worker)
            os.close(to_kernel)
        self._proc = proc
        self.pid = proc.pid
        self._rfd = from_worker
        if self.reaper is not None:
            self.reaper.watch(proc.pid)
        self._contain(proc.pid)
        self._loop = loop = asyncio.get_running_loop()
        try:
            self._out, _ = await loop.connect_write_pipe(
                lambda: self._flow, os.fdopen(from_kernel, "wb", buffering=0)
            )
            self._out.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            os.set_blocking(from_worker, False)
            loop.add_reader(from_worker, self._readable)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._read_stderr)
                await self._send({"op": "config", "config": self.config})
                with anyio.move_on_after(self.start_timeout) as timer:
                    await self.ready_event.wait()
                if self.ready is None:
                    if timer.cancelled_caught and self.failure is None:
                        self.failure = {
                            "stage": "import",
                            "error": f"plugin {self.plugin!r}: the sandbox worker did not start "
                            f"within {self.start_timeout:g}s{self._tail_note()}",
                        }
                    self._kill_group()
                    self.ready_event.set()
                else:
                    self._last_pong = time.monotonic()
                    tg.start_soon(self._watch)
                await proc.wait()
                tg.cancel_scope.cancel()
        except BaseException as exc:  # our own bug or cancellation: never leave it running
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                log.exception("sandbox worker of plugin %r: supervisor error", self.plugin)
            self._kill_group()
            with anyio.CancelScope(shield=True):
                await self._finish(proc)
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            return
        with anyio.CancelScope(shield=True):
            await self._finish(proc)

    def _contain(self, pid: int) -> None:
        """Put the new worker (not yet configured: no plugin code has run) in a pids
        cgroup of its own, and say what limits its processes."""
        allowed = int(self.limits.get("processes", 0) or 0)
        cgroup = None
        if allowed:
            # the worker itself, and bubblewrap's own processes
            extra = 1 + (2 if self.launch.level == "bwrap" else 0)
            cgroup = PidsCgroup.create(f"w{pid}", allowed + extra)
        if cgroup is not None:
            try:
                # bubblewrap may be forking its sandbox right now: until the tree holds
                # still, move what appeared (a child forked after the move is inside)
                moved: set[int] = set()
                for _ in range(10):
                    new = [p for p in _tree(pid) if p not in moved]
                    if not new:
                        break
                    cgroup.add(new)
                    moved.update(new)
            except OSError as exc:
                log.warning("sandbox: plugin %r: cannot use the pids cgroup: %s", self.plugin, exc)
                cgroup.remove()
                cgroup = None
        self._cgroup = cgroup
        if cgroup is not None:
            self.process_limit = "pids-cgroup"
        elif (
            self.config.get("uid") is not None
            or self.config.get("signal_uid") is not None
            or os.getuid() != 0
        ):
            self.process_limit = "rlimit"
        else:
            self.process_limit = "watch"

    async def _finish(self, proc: Process) -> None:
        self._kill_group()
        self._tg = None
        self._close_reader()
        if self._out is not None:
            self._out.close()
        # its CPU time, readable until it is reaped (a worker at the hard CPU limit is
        # killed between two samples)
        self.cpu_s = max(self.cpu_s, _cpu_seconds(self.pid))
        try:
            await proc.wait()
            await proc.aclose()
        except Exception:
            log.exception("sandbox: plugin %r worker %d: could not reap it", self.plugin, self.pid)
        self._up = False
        # what it started and left in its process group (a worker that exited on its own
        # leaves its children behind; no cgroup is needed to find them)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.reaper is not None:
            self.reaper.forget(self.pid)
        self.exit = self._classify(proc.returncode)
        if self._cgroup is not None:
            cgroup, self._cgroup = self._cgroup, None
            for _ in range(100):  # killed processes leave once reaped
                cgroup.kill()
                if not cgroup.pids():
                    break
                await anyio.sleep(0.02)
            cgroup.remove()
        for call in list(self._calls.values()):
            if call.send is not None:
                call.send.close()
            if call.done is not None and not call.done.done():
                call.done.set_result(None)
        self._calls.clear()
        if self.failure is None and self.ready is None:
            self.failure = {
                "stage": "import",
                "error": f"plugin {self.plugin!r}: the sandbox worker exited before it was ready "
                f"({self.exit.describe()}){self._tail_note()}",
            }
        self.ready_event.set()
        self.exited.set()
        # after the calls failed: a handler waiting on one has returned by now
        subs, self._subs = self._subs, []
        for sub in subs:
            if self.bridge is not None:
                try:
                    await self.bridge.unsubscribe(sub)
                except Exception:
                    log.exception("sandbox: plugin %r: could not end a subscription", self.plugin)

    def _tail_note(self) -> str:
        tail = "\n".join(list(self.stderr_tail)[-5:])
        return f"; its last output:\n{tail}" if tail else ""

    def _classify(self, code: int | None) -> Exit:
        tail = "\n".join(self.stderr_tail)
        sig = None
        if code is not None and code < 0:
            sig = -code
        elif code is not None and self.launch.level == "bwrap" and code > 128:
            sig = code - 128  # bubblewrap exits with 128 + the signal that killed the worker
        if self._kill is not None:
            limit, value, detail = self._kill
            if limit == "protocol":  # killed for breaking the wire: a crash of its own
                return Exit("crash", self.pid, code, sig, detail=detail, stderr=tail)
            kind = "stopped" if limit == "stop" else "limit"
            return Exit(
                kind, self.pid, code, sig, None if kind == "stopped" else limit, value, detail, tail
            )
        if self._fatal is not None:
            return Exit(
                "limit",
                self.pid,
                code,
                sig,
                self._fatal,
                float(self.limits["memory"]),
                "the plugin's code ran out of memory (address space limit)",
                tail,
            )
        if sig in _SIGNAL_LIMITS:
            limit = _SIGNAL_LIMITS[signal.Signals(sig)]
            value = float(self.limits["cpu"] if limit == "cpu" else self.limits["file_size"])
            return Exit(
                "limit",
                self.pid,
                code,
                sig,
                limit,
                value,
                f"killed by {signal.Signals(sig).name}",
                tail,
            )
        cpu = float(self.limits["cpu"])
        if sig == signal.SIGKILL and self.cpu_s >= cpu:
            # the hard CPU limit: the plugin ignored SIGXCPU at the soft one
            return Exit("limit", self.pid, code, sig, "cpu", cpu, "killed at the CPU limit", tail)
        if self._stopping and code == 0:
            return Exit("stopped", self.pid, code, sig, stderr=tail)
        return Exit("crash", self.pid, code, sig, stderr=tail)

    def kill(self, limit: str, value: float, detail: str) -> None:
        """Kill the process group, recording why (the first reason wins)."""
        self._up = False
        if self._kill is None:
            self._kill = (limit, value, detail)
            if limit != "stop":
                log.warning(
                    "sandbox: plugin %r worker %d: %s (%s); killing it",
                    self.plugin,
                    self.pid,
                    limit,
                    detail,
                )
        self._kill_group()

    def _kill_group(self) -> None:
        if self._cgroup is not None:
            self._cgroup.kill()  # orphans that left the tree too
        if self._proc is None or self._proc.returncode is not None:
            return
        for pid in _tree(self.pid):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def drain(self, timeout: float) -> None:
        """Wait, up to ``timeout``, for the calls in flight now to end (a replaced
        generation's requests finish where they started, as a trusted plugin's do)."""
        pending = set(self._calls)
        with anyio.move_on_after(timeout):
            while pending and self.alive:
                await anyio.sleep(0.02)
                pending.intersection_update(self._calls)

    async def stop(self, grace: float) -> None:
        """Ask the worker to stop; kill it if it has not within ``grace`` seconds."""
        self._stopping = True
        if self._proc is not None and not self.exited.is_set():
            with suppress(WorkerGone):
                await self._send({"op": "stop"})
            with anyio.move_on_after(grace):
                await self.exited.wait()
            if not self.exited.is_set():
                self.kill("stop", grace, "did not stop in time")
                await self.exited.wait()

    # -- frames ----------------------------------------------------------------------

    def _write(self, header: dict[str, Any], payload: bytes = b"", *, gather: bool = True) -> None:
        """Queue a frame to the worker (whole: frames never interleave).

        With ``gather`` (HTTP), the first frame of a loop iteration is written at once (a
        lone request pays no delay); the others of that iteration are gathered and
        written together at its end, so many requests arriving at once cost the worker
        one wake-up. Without, the frame is written at once (behind any gathered)."""
        out = self._out
        if out is None or out.is_closing():
            raise WorkerGone(self.plugin, "its sandbox worker is gone", self.exit)
        frame = encode(header, payload)
        batch = self._batch
        if batch is None and not gather:
            out.write(frame)  # one write of one buffer (prefix, header and payload)
        elif batch is None:
            out.write(frame)
            self._batch = []
            self._batched = 0
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            batch.append(frame)
            self._batched += len(frame)
            if self._batched >= CHUNK:  # a large body: no need to hold it back
                out.write(b"".join(batch))
                batch.clear()
                self._batched = 0

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        out = self._out
        if batch and out is not None and not out.is_closing():
            out.write(b"".join(batch))

    async def _send(
        self, header: dict[str, Any], payload: bytes = b"", *, gather: bool = False
    ) -> None:
        """Queue a frame; wait while more than ``WRITE_HIGH_WATER`` bytes are queued."""
        self._write(header, payload, gather=gather)
        if self._flow.paused:
            await self._drain()

    async def _drain(self) -> None:
        await self._flow.drain()
        if self._out is None or self._out.is_closing():
            raise WorkerGone(self.plugin, "its sandbox worker is gone", self.exit)

    async def send_frame(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send a frame belonging to a call already open (a body chunk, a disconnect)."""
        if self.exited.is_set():
            return
        with suppress(WorkerGone):
            await self._send(header, payload)

    def credit(self, cid: int, frames: int, size: int) -> None:
        """Give a streamed response's window back (its client took these frames)."""
        if cid in self._calls and not self.exited.is_set():
            with suppress(WorkerGone):
                self._write({"op": "credit", "id": cid, "frames": frames, "bytes": size})

    async def send_body(self, cid: int, chunk: bytes, more: bool) -> None:
        if self.exited.is_set():
            return
        with suppress(WorkerGone):
            await self._send({"op": "body", "id": cid, "more": more}, chunk, gather=True)

    def _readable(self) -> None:
        """The worker's pipe has data: read it and dispatch its frames, here."""
        try:
            data = os.read(self._rfd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker closed its end: it ended (or will)
            self._close_reader()
            self.ready_event.set()
            return
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            self.kill("protocol", 0, f"it sent a malformed frame: {exc}")
            self._close_reader()
            return
        for header, payload in frames:
            try:
                self._dispatch(header, payload)
            except Exception:
                log.exception(
                    "sandbox: plugin %r worker %d: frame %r failed",
                    self.plugin,
                    self.pid,
                    header.get("op"),
                )

    def _close_reader(self) -> None:
        fd, self._rfd = self._rfd, -1
        if fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(fd)
            os.close(fd)

    def _dispatch(self, h: dict[str, Any], payload: bytes) -> None:
        op = h.get("op")
        if op == "result":  # the end of a call: first, it is the most frequent
            call = self._calls.pop(h.get("id", -1), None)
            if call is None:
                return  # a late reply to a call nobody waits for: dropped
            if call.send is not None:
                self._route(call, op, h, payload)
            elif call.done is not None and not call.done.done():
                call.done.set_result(h)
        elif op == "pong":
            self._last_pong = time.monotonic()
        elif op == "log":
            self._log(h)
        elif op == "ready":
            self.ready = h
            self._up = self._kill is None and not self.exited.is_set()
            self.start_ms = (time.perf_counter() - self._t0) * 1000
            self.started_at = time.time()
            self._sample()
            self.ready_event.set()
        elif op == "failed":
            self.failure = h
            self.ready_event.set()
        elif op == "fatal":
            self._fatal = str(h.get("limit", "memory"))
        elif op in ("append", "subscribe"):
            self._ask(op, h, payload)
        else:
            call = self._calls.get(h.get("id", -1))
            if call is None:
                return  # a late reply to a call nobody waits for: dropped
            if op == "cancelled" and h.get("honoured") and call.cancelling:
                self._calls.pop(h["id"], None)
            if call.send is not None:
                self._route(call, op, h, payload)

    def _route(self, call: _Call, op: Any, h: dict[str, Any], payload: bytes) -> None:
        """A frame of a streaming call (or of a cancel in progress) to its inbox."""
        inbox = call.send
        assert inbox is not None
        # a closed inbox (its caller left: a disconnected client) drops the frame
        if not inbox.put((h, payload)):
            # the caller reads slower than the plugin writes: rather than buffer without
            # bound (or drop frames silently), the call is aborted
            log.warning(
                "sandbox: plugin %r: %s aborted: its client reads slower than the "
                "plugin writes (%d frames waiting)",
                self.plugin,
                call.label,
                CALL_BUFFER,
            )
            call.aborted = True
            inbox.close()
            return
        if op == "result":
            inbox.close()

    # -- the plugin's appends and subscriptions ------------------------------------------

    def _ask(self, op: str, h: dict[str, Any], payload: bytes) -> None:
        """Run an ``append`` or ``subscribe`` of the plugin's code (answered by id)."""
        wid = h.get("id")
        if self._tg is None or self._kill is not None:
            return
        if self._asks >= MAX_ASKS:
            self._answer_soon(
                {
                    "op": "appended" if op == "append" else "subscribed",
                    "id": wid,
                    "ok": False,
                    "error": f"plugin {self.plugin!r}: "
                    f"more than {MAX_ASKS} appends or subscriptions in flight",
                }
            )
            return
        self._asks += 1
        self._tg.start_soon(self._serve_ask, op, h, payload)

    def _answer_soon(self, header: dict[str, Any]) -> None:
        """Answer without waiting for the pipe; a worker that asks and does not read its
        answers (they pile up here) is killed."""
        out = self._out
        if out is not None and out.get_write_buffer_size() > STUCK_BUFFER:
            self.kill("protocol", 0, "it sends requests but no longer reads its pipe")
            return
        with suppress(WorkerGone):
            self._write(header)

    async def _serve_ask(self, op: str, h: dict[str, Any], payload: bytes) -> None:
        wid = h.get("id")
        answer: dict[str, Any] = {"op": "appended" if op == "append" else "subscribed", "id": wid}
        try:
            if self.bridge is None:
                raise Refused(f"plugin {self.plugin!r}: the sandbox has no access to the log here")
            if op == "append":
                records = await self.bridge.append(
                    h.get("stream"), h.get("type"), h.get("schema", 1), payload
                )
                answer.update(ok=True, records=[record_to_wire(r) for r in records])
            else:
                if len(self._subs) >= MAX_SUBSCRIPTIONS:
                    raise Refused(
                        f"plugin {self.plugin!r}: more than {MAX_SUBSCRIPTIONS} subscriptions"
                    )
                types = self.bridge.types(h.get("types"))

                async def deliver(record: Recorded, sid: Any = wid) -> None:
                    await self._deliver(sid, record)

                self._subs.append(await self.bridge.subscribe(deliver, types))
                answer.update(ok=True)
        except Refused as exc:
            answer.update(ok=False, refused=True, error=str(exc))
        except Exception as exc:
            log.exception("sandbox: plugin %r: %s failed", self.plugin, op)
            answer.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._asks -= 1
        with suppress(WorkerGone):
            await self._send(answer)

    async def _deliver(self, sid: Any, record: Recorded) -> None:
        """One event to a subscription of the plugin (raises when its handler did)."""
        h = await self.request(
            {"op": "event", "sub": sid, **record_to_wire(record)},
            label=f"event handler ({record.type})",
            grace=self.cancel_grace,
        )
        if not h.get("ok"):
            raise RuntimeError(
                f"plugin {self.plugin!r}: its event handler raised {h.get('error', 'an error')}"
            )

    def _log(self, h: dict[str, Any]) -> None:
        if not self._logs.allow():
            return
        extra = {"plugin": self.plugin, "sandbox_pid": self.pid}
        for key in ("request_id", "run_id"):
            if h.get(key):
                extra[key] = str(h[key])[:128]
        # the frame is the plugin's to forge: its logger stays under the plugin's own
        # name (``xcore.plugin.ab`` is not ``xcore.plugin.a``'s), its message is cut
        own = f"xcore.plugin.{self.plugin}"
        name = str(h.get("logger") or own)[:200]
        if name != own and not name.startswith(own + "."):
            name = f"{own}.{name}"
        level = h.get("level", logging.INFO)
        logging.getLogger(name).log(
            level if isinstance(level, int) else logging.INFO,
            "%s",
            str(h.get("message", ""))[:LOG_MESSAGE],
            extra=extra,
        )

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        pending = b""
        try:
            async for chunk in self._proc.stderr:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > 4096:
                    lines.append(pending)
                    pending = b""
                for raw in lines:
                    line = raw.decode(errors="replace")[:2000]
                    self.stderr_tail.append(line)
                    if self._logs.allow():
                        self._logger.info(
                            "stderr: %s",
                            line,
                            extra={"plugin": self.plugin, "sandbox_pid": self.pid},
                        )
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        if pending:
            self.stderr_tail.append(pending.decode(errors="replace")[:2000])

    # -- watching --------------------------------------------------------------------

    async def _watch(self) -> None:
        tick = min(0.25, self.heartbeat_interval)
        last_ping = 0.0
        last_sample = 0.0
        while self._kill is None:
            before = time.monotonic()
            await anyio.sleep(tick)
            now = time.monotonic()
            stalled = now - before - tick
            if stalled > 0.2:
                # the kernel's own loop was stalled: the worker's answers may be sitting
                # unread in the pipe, so the stall is not held against it
                self._last_pong += stalled
                for call in self._calls.values():
                    call.deadline += stalled
            if now - last_ping >= self.heartbeat_interval and not self._flow.paused:
                # never waits for the pipe: a worker that stops reading it goes without
                # pings, so without pongs, and the heartbeat ends it
                last_ping = now
                with suppress(WorkerGone):  # its exit is noticed by the reader
                    self._write({"op": "ping", "id": 0}, gather=False)
            if now - self._last_pong > self.heartbeat_timeout:
                self.kill(
                    "heartbeat",
                    self.heartbeat_timeout,
                    f"no answer to pings for {self.heartbeat_timeout:g}s",
                )
                return
            for _cid, call in list(self._calls.items()):
                if now > call.deadline:
                    self.kill(
                        "wall", self.wall_time, f"{call.label} ran longer than {self.wall_time:g}s"
                    )
                    return
            # every tick once the CPU limit is near: the hard limit's SIGKILL comes one CPU
            # second after the soft one, and only a sample inside that second tells a
            # plugin that ignored SIGXCPU from a crash (the worker may be reaped before
            # its last CPU time can be read)
            near_cpu = self.cpu_s >= float(self.limits["cpu"]) - 2.0
            if near_cpu or now - last_sample >= 1.0:
                last_sample = now
                self._sample()

    def _sample(self) -> None:
        """RSS and CPU of the worker's process tree; a tree that used up its process
        allowance (a fork bomb held back by RLIMIT_NPROC) is killed (``processes``)."""
        rss = cpu = tasks = 0
        tick = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        tree = _tree(self.pid)
        for pid in tree:
            with suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/statm", "rb") as f:
                    rss += int(f.read().split()[1]) * page
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                    cpu += int(fields[11]) + int(fields[12])
                    tasks += int(fields[17])
        self.rss = rss
        self.rss_max = max(self.rss_max, rss)
        self.cpu_s = cpu / tick
        self.tasks = tasks
        allowed = int(self.limits["processes"])
        # RLIMIT_NPROC counts every process of the worker's user, so the tree may be held
        # below ``allowed``: half of it in processes is already a fork bomb's signature
        processes = len(tree) - (2 if self.launch.level == "bwrap" else 0)
        if self.ready is not None and (tasks >= allowed or processes > allowed // 2):
            self.kill(
                "processes",
                allowed,
                f"its process tree reached {processes} processes, {tasks} threads "
                f"(allowed: {allowed})",
            )

    # -- calls -----------------------------------------------------------------------

    async def request(self, header: dict[str, Any], *, label: str, grace: float) -> dict[str, Any]:
        """One call answered by one ``result`` frame (task, hook, no-op); ``header`` is
        sent as it is, given the call's ``id``.

        Cancelling the caller cancels the call in the worker; a cancel its code cannot
        honour within ``grace`` kills the worker. :class:`WorkerGone` if the worker ends.
        """
        if not self._up:
            raise WorkerGone(self.plugin, "its sandbox worker is not running", self.exit)
        self._next = cid = self._next + 1
        header["id"] = cid
        # encoded first: a header that cannot be sent (FrameError) leaves no call behind,
        # so nothing is cancelled in a worker that never saw it
        frame = encode(header)
        assert self._loop is not None
        done: asyncio.Future[dict[str, Any] | None] = self._loop.create_future()
        self._calls[cid] = _Call(None, _monotonic() + self.wall_time, label, done)
        try:
            out = self._out
            if self._batch is None and out is not None and not out.is_closing():
                out.write(frame)  # what _write does, without its indirections
            else:
                self._write(header, gather=False)
            if self._flow.paused:
                await self._drain()
            result = await done
        except BaseException:
            if not (done.done() and not done.cancelled()) and cid in self._calls and self.alive:
                with anyio.CancelScope(shield=True):
                    await self._cancel(cid, label, grace)
            raise
        if result is None:
            if not self.exited.is_set():
                with anyio.move_on_after(5):
                    await self.exited.wait()
            why = self.exit.describe() if self.exit else "its sandbox worker ended"
            raise WorkerGone(self.plugin, why, self.exit)
        return result

    @asynccontextmanager
    async def open_call(
        self,
        header: dict[str, Any],
        payload: bytes = b"",
        *,
        label: str,
        cancel: bool = True,
        grace: float = 2.0,
    ) -> AsyncIterator[tuple[int, _Watched]]:
        """Send a call and yield its id and the stream of its frames.

        Leaving the block before the ``result`` frame ends the call in the worker: with
        ``cancel`` (tasks, hooks) it is cancelled, and a cancel its code cannot honour
        kills the worker; without (HTTP) the app is told the client disconnected, and the
        call keeps its wall-time deadline until it answers.
        """
        if not self.alive:
            raise WorkerGone(self.plugin, "its sandbox worker is not running", self.exit)
        self._next += 1
        cid = self._next
        inbox = _Inbox(CALL_BUFFER)
        call = self._calls[cid] = _Call(inbox, time.monotonic() + self.wall_time, label)
        finished = False
        try:
            await self._send({**header, "id": cid}, payload, gather=True)
            yield cid, _Watched(inbox, self, call)
            finished = cid not in self._calls
        finally:
            inbox.close()
            if not finished and cid in self._calls and self.alive:
                with anyio.CancelScope(shield=True):
                    if cancel:
                        await self._cancel(cid, label, grace)
                    else:
                        with suppress(WorkerGone):
                            await self._send({"op": "disconnect", "id": cid})

    async def _cancel(self, cid: int, label: str, grace: float) -> None:
        call = self._calls.get(cid)
        if call is None:
            return
        # a fresh inbox for the answer to the cancel (the caller's is closed)
        inbox = call.send = _Inbox(None)
        call.cancelling = True
        honoured = False
        try:
            await self._send({"op": "cancel", "id": cid})
        except WorkerGone:
            return  # nothing left to cancel
        with anyio.move_on_after(grace):
            while True:
                try:
                    h, _ = await inbox.get()
                except anyio.EndOfStream:
                    break
                # a thread cannot be cancelled: then wait (up to grace) for it to end
                if (h.get("op") == "cancelled" and h.get("honoured")) or h.get("op") == "result":
                    honoured = True
                    break
        inbox.close()
        if honoured:
            self._calls.pop(cid, None)
            return
        self.kill(
            "timeout", grace, f"{label} was cancelled but its code did not stop within {grace:g}s"
        )


Frame = tuple[dict[str, Any], bytes]


class _Inbox:
    """The frames of one call waiting for its caller: put from the pipe's callback,
    taken by the caller; at most ``bound`` of them (None: no bound)."""

    __slots__ = ("bound", "closed", "items", "waiter")

    def __init__(self, bound: int | None) -> None:
        self.items: deque[Frame] = deque()
        self.bound = bound
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: Frame) -> bool:
        """Queue ``item`` (dropped if closed); False when the bound is reached."""
        if self.closed:
            return True
        if self.bound is not None and len(self.items) >= self.bound:
            return False
        self.items.append(item)
        self._wake()
        return True

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Frame:
        """The next frame; ``anyio.EndOfStream`` once closed and empty."""
        while not self.items:
            if self.closed:
                raise anyio.EndOfStream
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class _Watched:
    """The frames of one call, ending with :class:`WorkerGone` if the worker dies."""

    def __init__(self, inbox: _Inbox, worker: Worker, call: _Call) -> None:
        self._inbox = inbox
        self._worker = worker
        self._call = call

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self._inbox.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def pending(self) -> int:
        """Frames received and not yet taken."""
        return len(self._inbox.items)

    async def receive(self) -> Frame:
        """The next frame; :class:`WorkerGone` if the worker ended first."""
        inbox = self._inbox
        if inbox.items:
            return inbox.items.popleft()
        try:
            return await inbox.get()
        except anyio.EndOfStream:
            w = self._worker
            if self._call.aborted:
                raise CallAborted(w.plugin, f"{self._call.label} was aborted") from None
            if not w.exited.is_set():
                with anyio.move_on_after(5):
                    await w.exited.wait()
            why = w.exit.describe() if w.exit else "its sandbox worker ended"
            raise WorkerGone(w.plugin, why, w.exit) from None


class _Flow(asyncio.Protocol):
    """Flow control of the pipe to the worker: ``drain`` waits while it is paused."""

    def __init__(self) -> None:
        self.paused = False
        self._resumed: asyncio.Event | None = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._resumed is not None:
            self._resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()

    async def drain(self) -> None:
        while self.paused:
            if self._resumed is None or self._resumed.is_set():
                self._resumed = asyncio.Event()
            await self._resumed.wait()


def _pipe() -> tuple[int, int]:
    """A pipe (read end, write end) with a buffer of 1 MiB where the system allows it."""
    r, w = os.pipe()
    with suppress(OSError):
        fcntl.fcntl(w, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
    return r, w


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (children first found through /proc)."""
    out: list[int] = []
    todo = [root]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            with suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                todo.extend(int(c) for c in f.read().split())
    return out
