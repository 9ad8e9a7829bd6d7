"""Recording the outcomes of runs: those of one loop step in one store call, after the starts.

Guarantee: each run's outcome (``TaskSucceeded``, or ``TaskFailed`` with its
``TaskRetryScheduled``) is appended to its task's stream, durable before whatever
follows it (dependent runs, the retry's timer) happens — exactly as a lone append.

Mechanism: the runs woken at one instant end in the same few loop steps; their outcome
events are queued and go to the store together, one ``append_many`` (one writer batch,
one commit) per loop step, instead of one append each. A batch yields to the next
burst, at most :data:`YIELD_TO_STARTS` seconds: it waits while start records are being
claimed (:meth:`~.claim.Claims.idle`: the commit of a burst's outcomes never sits in
the writer's queue in front of the ``TaskStarted`` of runs still to start), then while
runs claimed ahead wait in the start gate for their instant
(:meth:`~.timers.StartGate.idle`: neither the commit nor the projection's fold of the
outcomes runs on the loop just before an instant, where it would delay the release).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from kernel.errors import StoreError
from kernel.events import Event, NewEvent, Recorded
from kernel.store.base import StreamWrite
from services.scheduler.claim import Claims
from services.scheduler.stepbatch import StepBatches
from services.scheduler.timers import StartGate

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["Outcomes"]

log = logging.getLogger("xcore.scheduler")

#: How long (seconds) a batch of outcomes waits at most for the start records being
#: claimed to be written first.
YIELD_TO_STARTS = 0.1

_Queued = tuple[str, list[NewEvent], "asyncio.Future[list[Recorded]]"]


class Outcomes(StepBatches[_Queued]):
    """Queues outcome events and appends those of one loop step together."""

    task_name = "xcore-scheduler-outcomes"

    def __init__(self, kernel: Kernel, claims: Claims, gate: StartGate | None = None) -> None:
        super().__init__()
        self.kernel = kernel
        self.claims = claims
        self.gate = gate
        #: the most a batch yields to the starts (seconds)
        self.yield_to_starts = YIELD_TO_STARTS

    def record(self, stream: str, events: list[Event]) -> asyncio.Future[list[Recorded]]:
        """Queue ``events`` for ``stream``; the future is their stored records, or the
        store's refusal of them."""
        kernel = self.kernel
        future: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        items = [NewEvent.of(e, kernel._meta("scheduler", None), explicit_id=False) for e in events]
        self._enqueue((stream, items, future))
        return future

    async def _yield_to_starts(self) -> None:
        """Wait (bounded) while a burst is being claimed or waits for its instant."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.yield_to_starts
        gate = self.gate
        while (left := deadline - loop.time()) > 0:
            if self.claims.busy:
                await self.claims.idle(left)
            elif gate is not None and gate.pending:
                await gate.idle(left)
            else:
                return

    async def _append(self, batch: list[_Queued]) -> None:
        try:
            await self._yield_to_starts()
            answers = await self.kernel.store.append_many(
                [StreamWrite(stream, items) for stream, items, _ in batch]
            )
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if isinstance(answer, StoreError):
                future.set_exception(answer)
            else:
                future.set_result(answer)
