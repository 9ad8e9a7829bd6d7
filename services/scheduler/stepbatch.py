"""Work queued in one loop step, sent to the store as one batch.

Guarantee: everything queued during one turn of the event loop goes out together, one
loop step after the first item was queued, so every run woken at the same instant joins
the same batch; :meth:`StepBatches.drain` waits for what is queued or being written.
While the batches are held (:meth:`StepBatches.hold`: the timer is firing the runs of one
instant in several slices, serving the loop in between), nothing is sent: the items of
every slice go out together, one loop step after the hold ends.

Mechanism: the first item of a step schedules :meth:`StepBatches._send` with
``call_soon``; the batch is appended by a task of its own (:meth:`_append`, supplied by
the subclass), kept in ``_tasks`` until it is done.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

__all__ = ["StepBatches"]

T = TypeVar("T")


class StepBatches(Generic[T]):
    """Queues items and hands those of one loop step to :meth:`_append` together."""

    #: the name of the tasks that append a batch
    task_name = "xcore-scheduler-batch"

    def __init__(self) -> None:
        self._queued: list[T] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: batches sent (for tests and the benchmark's notes)
        self.batches = 0
        self._holds = 0

    def _enqueue(self, item: T) -> None:
        if not self._queued and not self._holds:
            asyncio.get_running_loop().call_soon(self._send)
        self._queued.append(item)

    def hold(self) -> None:
        """Send nothing until the matching :meth:`release` (holds nest)."""
        self._holds += 1

    def release(self) -> None:
        """End a hold; at the last one, what was queued meanwhile goes one loop step
        later (after the tasks already scheduled to run, which may queue more)."""
        if self._holds <= 0:
            raise RuntimeError("StepBatches.release() without a hold")
        self._holds -= 1
        if not self._holds and self._queued:
            # forced: a hold taken again meanwhile (the timer's next instant) does not
            # keep this one's items back
            asyncio.get_running_loop().call_soon(self._send, True)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the batches queued or being written."""
        if self._queued:
            self._send(force=True)  # a hold does not keep them from being written
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def flush(self) -> None:
        """Send what is queued one loop step from now (after the tasks already
        scheduled to run), even while held."""
        asyncio.get_running_loop().call_soon(self._send, True)

    def _send(self, force: bool = False) -> None:
        if self._holds and not force:
            return  # the release sends it
        batch, self._queued = self._queued, []
        if not batch:
            return
        self.batches += 1
        task = asyncio.create_task(self._append(batch), name=self.task_name)
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)

    async def _append(self, batch: list[T]) -> None:
        raise NotImplementedError
