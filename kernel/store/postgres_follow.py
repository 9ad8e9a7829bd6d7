"""Keeping a node's in-memory tail in step with a shared PostgreSQL log.

Guarantee: the tail only ever holds a gapless run of committed events, and every
committed event reaches it — whichever node wrote it — so subscribers that wait on the
tail see each event once, in position order.

Mechanism: each commit notifies (LISTEN/NOTIFY) its last position. A listener
connection per node raises the follower's *target*; the follower reads the events
between the tail and the target from the database (ordered commits make that range
complete) and pushes them. This node's own commits go straight into the tail when they
follow it, so a local subscriber wakes without a round trip. When the listener's
connection is lost, it is reopened with backoff and the follower reads everything up
to the current last position: no notification missed while disconnected is lost.

Every wait here is cancellation-safe (``asyncio.timeout``, never ``asyncio.wait_for``,
which on Python 3.11 swallows a cancellation that arrives as the awaited thing
completes: a probe woken by a notification at the moment the store closed never ended,
and closing the store hung), and :meth:`Follower.stop` is bounded.

A connection can also die without a word (a NAT or firewall forgetting it, a hung
server process): no error ever comes, and the node would wait for notifications
forever. So every ``PROBE_S`` seconds without one the listener is asked for the last
position, within ``PROBE_TIMEOUT_S``; no answer counts as a lost connection, and the
answer itself raises the target (a missed notification is caught up there too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import asyncpg

from kernel.store.tail import Row, Tail

if TYPE_CHECKING:
    from kernel.store.postgres import PostgresStore

__all__ = ["Follower"]

log = logging.getLogger("xcore.store")

#: How many events the follower reads per query while catching up.
BATCH = 2000
#: Seconds of quiet after which the listener connection is probed, and how long its
#: answer may take before the connection is taken for dead.
PROBE_S = 5.0
PROBE_TIMEOUT_S = 10.0
#: What the listener connection is called in ``pg_stat_activity``.
LISTENER_NAME = "xcore-listener"
LAST = "SELECT COALESCE(MAX(position), 0) FROM events"
#: How long stopping waits for the follower's tasks to end after cancelling them.
STOP_S = 10.0


class Follower:
    """Feeds ``tail`` from the log: local commits directly, others' on notification."""

    def __init__(self, store: PostgresStore, tail: Tail) -> None:
        self.store = store
        self.tail = tail
        #: the highest position known to be committed
        self.target = 0
        self._kick = asyncio.Event()
        #: set by every notification: the probe waits for a quiet PROBE_S
        self._heard = asyncio.Event()
        self._lost = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: how many times the listener connection was reopened (tests read it)
        self.reconnects = 0

    async def start(self, last: int) -> None:
        self.target = last
        await self._listen()
        self._tasks = [
            asyncio.create_task(self._follow(), name="xcore-pg-follower"),
            asyncio.create_task(self._watch_listener(), name="xcore-pg-listener"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            # asyncio.wait: a task's own error is not raised here, a cancellation of
            # the caller is (awaiting each task under suppress(BaseException) hid both)
            done, pending = await asyncio.wait(tasks, timeout=STOP_S)
            for t in pending:
                log.error(
                    "%s: task %s did not stop within %gs of being cancelled",
                    self.store.location,
                    t.get_name(),
                    STOP_S,
                )
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.error(
                        "%s: task %s had failed",
                        self.store.location,
                        t.get_name(),
                        exc_info=t.exception(),
                    )
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
            conn.terminate()

    # -- inputs --------------------------------------------------------------------

    def committed(self, rows: list[Row]) -> None:
        """This node committed ``rows`` (as stored, in position order)."""
        if not rows:
            return
        if rows[0][0] == self.tail.last_position + 1:
            self.tail.push(rows)
        self.raise_target(rows[-1][0])

    def raise_target(self, position: int) -> None:
        if position > self.target:
            self.target = position
        if self.target > self.tail.last_position:
            self._kick.set()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._heard.set()
        try:
            self.raise_target(int(payload))
        except ValueError:
            log.warning(
                "%s: ignored a notification %r on %s", self.store.location, payload, channel
            )

    def _on_lost(self, conn: Any) -> None:
        self._lost.set()

    # -- the listener connection -------------------------------------------------------

    async def _listen(self) -> None:
        conn = await self.store.connect({"application_name": LISTENER_NAME})
        try:
            await conn.add_listener(self.store.channel, self._on_notify)
            conn.add_termination_listener(self._on_lost)
            # anything committed before LISTEN took effect is read now
            last = int(await conn.fetchval(LAST, timeout=PROBE_TIMEOUT_S))
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn
        self._lost.clear()
        self.raise_target(last)

    async def _probe(self) -> None:
        """Wait until the listener connection is lost, probing it when quiet."""
        while not self._lost.is_set():
            self._heard.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_S):
                    await self._heard.wait()
                continue  # notifications arrive: it lives
            conn = self._listener
            if conn is None or self._lost.is_set():
                return
            try:
                last = int(await conn.fetchval(LAST, timeout=PROBE_TIMEOUT_S))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "%s: the notification connection did not answer a probe (%s: %s)",
                    self.store.location,
                    type(exc).__name__,
                    exc,
                )
                self._lost.set()
                return
            self.raise_target(last)

    async def _watch_listener(self) -> None:
        while True:
            await self._probe()
            old, self._listener = self._listener, None
            if old is not None:
                old.terminate()
            log.warning(
                "%s: the notification connection was lost; reconnecting", self.store.location
            )

            async def reopen() -> None:
                try:
                    await self._listen()
                except Exception as exc:
                    raise OSError(str(exc)) from exc

            delay = 0.05
            while True:
                try:
                    await reopen()
                    break
                except OSError as exc:
                    log.warning("%s: cannot listen yet (%s); retrying", self.store.location, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.reconnects += 1

    # -- catching up ---------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self.target > self.tail.last_position:
                after = self.tail.last_position
                try:
                    batch = await self.store.read_rows(after, self.target, BATCH)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s: could not read new events; retrying", self.store.location)
                    await asyncio.sleep(1.0)
                    continue
                # a local commit may have been pushed meanwhile: keep what follows the tail
                fresh = [r for r in batch if r[0] > self.tail.last_position]
                if fresh and fresh[0][0] == self.tail.last_position + 1:
                    self.tail.push(fresh)
                elif fresh:  # cannot happen with ordered commits: say so, never skip
                    log.error(
                        "%s: position %d follows %d; reading again",
                        self.store.location,
                        fresh[0][0],
                        self.tail.last_position,
                    )
                    await asyncio.sleep(0.1)
                elif not batch:
                    break  # the target was ahead of what is visible; the next kick retries
