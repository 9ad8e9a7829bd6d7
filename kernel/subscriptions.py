"""Subscriptions: catch up from a position, then follow the log live.

A subscription pulls events in batches (so a slow handler never makes memory grow),
delivers each in position order, and moves on only when the handler returned. Delivery
is at-least-once: a named subscription saves its checkpoint after handled batches (at
most every ``checkpoint_interval`` seconds, and when it stops), so after a crash it
starts again from the last saved position.

A handler that raises is retried with exponential backoff; when it still fails after
``max_attempts``, the subscription reports a dead letter (the kernel records it as
``SubscriberFailed``) and goes on with the next event — it never stalls or swallows.

A subscription never moves past an event it neither handled nor recorded as failed:
when the dead letter cannot be recorded either (the disk is full), it waits, retrying
the handler and then the dead letter with backoff, until one of them succeeds.

``stop()`` lets a handler that is running finish (up to ``grace`` seconds, then it is
cancelled and its event will be delivered again); a subscription waiting for events or
for a retry stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Literal

from kernel.errors import StoreClosed
from kernel.events import Recorded
from kernel.store.base import EventStore

__all__ = ["DeadLetter", "Handler", "RetryPolicy", "Subscription"]

log = logging.getLogger("xcore.subscriptions")

Handler = Callable[[Recorded], Awaitable[None] | None]
#: Called with (subscription name, event, error, attempts) when a handler gives up.
DeadLetter = Callable[[str, Recorded, BaseException, int], Awaitable[None]]
Start = int | Literal["now", "checkpoint"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failing handler is retried before its event becomes a dead letter."""

    max_attempts: int = 5
    first_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.first_delay * 2 ** (attempt - 1)))


class Subscription:
    """Delivers events of ``store`` to ``handler``, catching up first, then live."""

    def __init__(
        self,
        store: EventStore,
        handler: Handler,
        *,
        name: str | None = None,
        start: Start = 0,
        types: Collection[str] | None = None,
        batch_size: int = 500,
        retry: RetryPolicy | None = None,
        dead_letter: DeadLetter | None = None,
        checkpoint_interval: float = 0.5,
    ) -> None:
        if start == "checkpoint" and name is None:
            raise ValueError("a subscription that starts from its checkpoint needs a name")
        self.store = store
        self.handler = handler
        self.name: str = name or str(getattr(handler, "__qualname__", repr(handler)))
        self._named = name is not None
        self._start = start
        self.types = frozenset(types) if types is not None else None
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self._dead_letter = dead_letter
        self.checkpoint_interval = checkpoint_interval
        self._is_async = inspect.iscoroutinefunction(handler)
        self.position = 0
        self._saved = 0
        self._last_save = 0.0
        #: set once the subscription has delivered everything that existed when it started
        self.caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_handler = False

    # -- life cycle ---------------------------------------------------------------

    async def resolve_start(self) -> int:
        start = self._start
        if start == "now":
            return await self.store.last_position()
        if start == "checkpoint":
            assert self.name is not None
            saved = await self.store.load_checkpoint(self.name)
            return saved or 0
        return int(start)

    async def start(self) -> None:
        """Resolve the starting position, then run in a background task."""
        self.position = self._saved = await self.resolve_start()
        self._task = asyncio.create_task(self._run(), name=f"xcore-subscription-{self.name}")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop after the event being handled (waiting at most ``grace`` seconds for
        its handler, then cancelling it) and save the checkpoint."""
        self._stopping = True
        if self._task is not None and self._task is asyncio.current_task():
            return  # called by its own handler: the loop ends once the handler returns
        task, self._task = self._task, None
        if task is not None:
            if self._in_handler and not task.done():
                await asyncio.wait({task}, timeout=grace)
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._save_checkpoint(force=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_for(self, position: int, timeout: float | None = None) -> None:
        """Wait until this subscription has handled everything up to ``position``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.position < position:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"subscription {self.name!r} is at {self.position}, not {position}"
                )
            if self._task is not None and self._task.done():
                raise RuntimeError(f"subscription {self.name!r} is not running")
            await asyncio.sleep(0.001)

    # -- the loop ----------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except StoreClosed:
                log.info("subscription %r stops: the store is closed", self.name)
                return
            except Exception:
                # The store failed (not the handler: its errors are dead letters). Keep
                # the position and try again, slower each time.
                failures += 1
                delay = self.retry.delay(min(failures, 10))
                log.exception(
                    "subscription %r could not read the log at position %s; retrying in %.2fs",
                    self.name,
                    self.position,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _step(self) -> None:
        store = self.store
        last = await store.last_position()
        batch = await store.read(after=self.position, types=self.types, limit=self.batch_size)
        for record in batch:
            await self._deliver(record)
            self.position = record.position
            if self._stopping:
                return
        if len(batch) < self.batch_size and self.position < last:
            # nothing else matched up to `last`: skip past what was filtered out
            self.position = last
        await self._save_checkpoint()
        if len(batch) < self.batch_size:
            self.caught_up.set()
            unsaved = self._named and self.position != self._saved
            await store.wait(self.position, self.checkpoint_interval if unsaved else None)

    async def _call(self, record: Recorded) -> None:
        self._in_handler = True
        try:
            if self._is_async:
                await self.handler(record)  # type: ignore[misc]
            else:
                result = self.handler(record)
                if inspect.isawaitable(result):
                    await result
        finally:
            self._in_handler = False

    async def _deliver(self, record: Recorded) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._call(record)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt >= self.retry.max_attempts:
                    await self._give_up(record, exc, attempt)
                    return
                log.warning(
                    "subscriber %r failed on %s at position %s (attempt %s/%s): %r",
                    self.name,
                    record.type,
                    record.position,
                    attempt,
                    self.retry.max_attempts,
                    exc,
                )
                await asyncio.sleep(self.retry.delay(attempt))

    async def _give_up(self, record: Recorded, exc: BaseException, attempts: int) -> None:
        log.error(
            "subscriber %r gave up on %s at position %s after %s attempts:\n%s",
            self.name,
            record.type,
            record.position,
            attempts,
            "".join(traceback.format_exception(exc)),
        )
        if self._dead_letter is None:
            return
        waits = 0
        while True:
            try:
                await self._dead_letter(self.name, record, exc, attempts)
                return
            except StoreClosed:
                raise  # the subscription stops here; its event is delivered again next time
            except Exception as failure:
                # Neither handled nor recorded: moving on would lose the event's outcome
                # for good. Wait (the log may be full), then try the handler again.
                waits += 1
                delay = self.retry.delay(min(waits + attempts, 20))
                log.error(
                    "subscriber %r could not record its failure on %s at position %s "
                    "(%r); it stays there and retries in %.2fs",
                    self.name,
                    record.type,
                    record.position,
                    failure,
                    delay,
                )
            await asyncio.sleep(delay)
            try:
                await self._call(record)
                return
            except Exception as again:
                exc = again
                attempts += 1

    async def _save_checkpoint(self, force: bool = False) -> None:
        if not self._named or self.position == self._saved:
            return
        now = time.monotonic()
        if not force and now - self._last_save < self.checkpoint_interval:
            return
        try:
            await self.store.save_checkpoint(self.name, self.position)
        except Exception:
            if not force:
                raise
            log.exception("could not save the checkpoint of subscription %r", self.name)
            return
        self._saved = self.position
        self._last_save = now
