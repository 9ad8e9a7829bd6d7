"""Claiming a run: of all the nodes whose timers fire for one run, exactly one starts it.

Guarantee: a run (a task's slot in its schedule, or the request that asked for it, and
the attempt) is recorded as started once in the whole log, whatever the number of
nodes firing it; the nodes that lose move on without running it.

Mechanism: the run's ``TaskStarted`` carries a deterministic event id — its claim key
— and is appended with the expected version of the task's stream. The log stores an id
once, so a second claim of the same run returns the first one's record (another boot's:
lost). A ``ConcurrencyError`` (another event landed on the stream since the version was
read) is retried with the new version; there the id decides. With one node the claim
always wins, at the cost of one version read.

Bursts: the claims made in one loop step (the runs due at one instant) go to the store
together (:class:`Claims`): one ``append_many`` — one writer batch, one commit — instead
of one append (and one version read) each. Alone (no cluster), a claim needs no version:
the id alone decides, and no other node appends. In a cluster each write carries its
stream's expected version; the store decides each write alone, so a claim that meets a
conflict is retried on its own (as above) and the others of its burst stand.

Slots: an interval's claim key uses its period's index (``floor(due / every)``), so a
node whose due time lies elsewhere in the period (one adopted from the log, a phase from
before the cluster's shared grid, ``triggers.on_grid``) still claims each period once.
A due time on a period's boundary (every one on the shared grid) belongs to the period
it starts, though its quotient may round a few units in the last place below the whole
number (:func:`period`). A run asked for by an operator is keyed by its request event, a
dependency-triggered run by its run id, a retry by its run id and attempt (the runner
passes them as ``run_slot``): none shares a timed run's key.

Released claims: a run claimed ahead of its instant by a process that stopped before the
instant is released at the next boot (``TaskReleased``, see ``service.py``) and its
instant runs again. Its key is taken (the log keeps the released ``TaskStarted``), so
the new claim is keyed by a key derived from it (:func:`again`), and again from that one
if it is released in turn: every node that has folded the release computes the same
key, and a node that has not yet loses its claim to the old record (it runs nothing).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
from collections.abc import Container
from typing import TYPE_CHECKING

from kernel.errors import ConcurrencyError, StoreError
from kernel.events import Event, NewEvent, Recorded
from kernel.store.base import ANY, StreamWrite
from services.scheduler.events import TaskReleased, TaskStarted
from services.scheduler.idle import Idle
from services.scheduler.specs import CompiledTask
from services.scheduler.stepbatch import StepBatches
from services.scheduler.triggers import AfterTrigger, IntervalTrigger

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = [
    "ClaimLost",
    "Claims",
    "SlotTaken",
    "again",
    "claim",
    "claim_key",
    "period",
    "releasable",
    "release",
]

log = logging.getLogger("xcore.scheduler")

#: Conflicting appends on one task stream tolerated before the claim gives up.
MAX_CONFLICTS = 50


class ClaimLost(Exception):
    """Another node (or boot) already started this run."""


class SlotTaken(ClaimLost):
    """This node already started another run under the same claim key (an interval's
    period whose phase changed since its run, a run re-armed for an instant already
    claimed): this one does not start — it would run with no start record of its own."""


def claim_key(
    task: CompiledTask,
    scheduled_for: float,
    attempt: int,
    cause: Recorded | None,
    run_slot: str | None = None,
    released: Container[str] = (),
) -> str:
    """The id of the ``TaskStarted`` of this run, the same on every node.

    ``run_slot``: a run that is not its trigger's is keyed by it (the request event
    that asked for it, a dependency-triggered run's own id): keyed by its start time,
    it would share the key of a timed run of the same period, or of another run asked
    for in the same millisecond, and not start.

    ``released``: the claim keys given up by ``TaskReleased`` (the task table's): a
    released key is replaced by the key derived from it (:func:`again`)."""
    trigger = task.trigger
    if cause is not None:
        slot = f"cause:{cause.meta.id}"
    elif run_slot is not None:
        slot = f"run:{run_slot}"
    elif isinstance(trigger, IntervalTrigger):
        slot = f"every:{period(scheduled_for, trigger.every)}"
    elif isinstance(trigger, AfterTrigger):
        slot = "after"  # relative to each node's registration: once per task
    else:  # cron and date: absolute instants
        slot = f"at:{round(scheduled_for, 3)}"
    basis = f"run|{task.id}|{slot}|{attempt}"
    key = hashlib.blake2b(basis.encode(), digest_size=16).hexdigest()
    while key in released:
        key = again(key)
    return key


def period(due: float, every: float) -> int:
    """The index of the period of ``every`` seconds (since the epoch) ``due`` lies in.

    At epoch scale the quotient is 10^8 to 10^11 and a boundary's (``k * every``,
    computed) can come out a unit or two in its last place below ``k``: 1700000259.72 s,
    the 127150356th multiple of 13.37 s, divides to 127150355.99999999. Floored as it
    is, that due time would share the previous one's key (its run is not started) and
    leave its own period's unused. The margin is a few units in the last place, far
    below a microsecond of ``due``."""
    quotient = due / every
    return math.floor(quotient + 1e-9 + 16 * math.ulp(quotient))


def again(key: str) -> str:
    """The key of the next claim of a run whose claim ``key`` was released."""
    return hashlib.blake2b(f"again|{key}".encode(), digest_size=16).hexdigest()


def releasable(trigger: str, due: float, now: float) -> bool:
    """Whether a claimed run's code cannot have run: a timed run or a retry whose
    instant (``due``: its time, a retry's ``retry_at``) is still to come at ``now``."""
    return trigger in ("schedule", "retry") and now < due


def release(
    *,
    task: str,
    run_id: str,
    scheduled_for: float,
    attempt: int,
    trigger: str,
    claim: str,
    due: float,
    next_run: float | None,
    why: str,
) -> TaskReleased:
    """The ``TaskReleased`` that ends a :func:`releasable` claim (``why``: how the
    process stopped before ``due``); a released retry is pending again at ``due``."""
    return TaskReleased(
        task=task,
        run_id=run_id,
        scheduled_for=scheduled_for,
        attempt=attempt,
        trigger=trigger,
        reason=f"released: {why}; its code never ran, the instant runs again",
        claim=claim,
        next_run=next_run,
        retry_at=due if trigger == "retry" else None,
    )


def _items(kernel: Kernel, events: list[Event], key: str, cause: Recorded | None) -> list[NewEvent]:
    return [
        NewEvent.of(
            e,
            kernel._meta("scheduler", cause, None, key if isinstance(e, TaskStarted) else None),
            explicit_id=isinstance(e, TaskStarted),
        )
        for e in events
    ]


def _run_id(events: list[Event]) -> str | None:
    return next((e.run_id for e in events if isinstance(e, TaskStarted)), None)


def _decide(
    kernel: Kernel, records: list[Recorded], key: str, run_id: str | None = None
) -> list[Recorded]:
    """The stored records of a claim: this boot's (won), or raise ClaimLost."""
    for r in records:
        if r.meta.id == key:
            if r.meta.boot == kernel.boot:
                other = r.data.get("run_id")
                if run_id is not None and other != run_id:
                    raise SlotTaken(
                        f"its slot ({key}) was claimed by run {other} of this node already"
                    )
                return records
            raise ClaimLost(f"run {key} was started by node {r.meta.node}")
    raise ClaimLost(f"run {key} was already started")


#: a queued claim: stream, its events ready to append, claim key, run id, its answer
_Queued = tuple[str, list[NewEvent], str, str | None, asyncio.Future[list[Recorded]]]


class Claims(StepBatches[_Queued]):
    """Sends the claims made in one loop step to the store together (module docstring).

    :meth:`claim` queues a claim and answers it once the batch holding it is decided;
    the batch goes one loop step after the first claim of the step was queued, so every
    run woken at the same instant joins it.
    """

    task_name = "xcore-scheduler-claims"

    def __init__(self, kernel: Kernel) -> None:
        super().__init__()
        self.kernel = kernel
        self._idlers = Idle(lambda: self.busy)

    @property
    def busy(self) -> bool:
        """Whether claims are queued or being written."""
        return bool(self._queued or self._tasks)

    async def idle(self, timeout: float) -> None:
        """Return once no claim is queued or being written (or after ``timeout``)."""
        await self._idlers.wait(timeout)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._idlers.notify()

    def claim(
        self, stream: str, events: list[Event], key: str, cause: Recorded | None
    ) -> asyncio.Future[list[Recorded]]:
        """Queue the claim of ``events`` (their ``TaskStarted`` keyed ``key``): the
        future is the stored records, or ClaimLost, or the store's error."""
        future: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self._enqueue(
            (stream, _items(self.kernel, events, key, cause), key, _run_id(events), future)
        )
        return future

    async def _append(self, batch: list[_Queued]) -> None:
        kernel = self.kernel
        try:
            if kernel.placement.shared:
                versions: list[int | None] = list(
                    await asyncio.gather(*(kernel.store.stream_version(s) for s, *_ in batch))
                )
            else:
                versions = [ANY] * len(batch)
            answers = await kernel.store.append_many(
                [
                    StreamWrite(stream, items, version)
                    for (stream, items, *_), version in zip(batch, versions, strict=True)
                ]
            )
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (stream, items, key, run_id, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if isinstance(answer, ConcurrencyError):
                # the stream moved since its version was read (another node appended):
                # this claim alone goes the one-by-one way, where the id decides
                retry = asyncio.ensure_future(_claim_items(kernel, stream, items, key, run_id))
                retry.add_done_callback(functools.partial(_relay, future))
                continue
            if isinstance(answer, StoreError):
                future.set_exception(answer)
                continue
            try:
                future.set_result(_decide(kernel, answer, key, run_id))
            except ClaimLost as lost:
                future.set_exception(lost)


def _relay(future: asyncio.Future[list[Recorded]], done: asyncio.Future[list[Recorded]]) -> None:
    if future.done():
        if not done.cancelled():
            done.exception()  # read: nobody waits for it any more
        return
    if done.cancelled():
        future.cancel()
    elif (exc := done.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(done.result())


async def claim(
    kernel: Kernel, stream: str, events: list[Event], key: str, cause: Recorded | None
) -> list[Recorded]:
    """Append ``events`` (their ``TaskStarted`` keyed ``key``) or raise ClaimLost."""
    return await _claim_items(
        kernel, stream, _items(kernel, events, key, cause), key, _run_id(events)
    )


async def _claim_items(
    kernel: Kernel, stream: str, items: list[NewEvent], key: str, run_id: str | None = None
) -> list[Recorded]:
    for _ in range(MAX_CONFLICTS):
        version = await kernel.store.stream_version(stream)
        try:
            records = await kernel.append(items, stream=stream, expected_version=version)
        except ConcurrencyError:
            continue  # the stream moved: read its version again, the id decides
        return _decide(kernel, records, key, run_id)
    log.warning(
        "stream %s: %d conflicting appends in a row; run %s not claimed", stream, MAX_CONFLICTS, key
    )
    raise ClaimLost(f"run {key}: the stream {stream!r} kept changing")
