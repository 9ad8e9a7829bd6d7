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

Slots: interval schedules of nodes that started apart may tick at different phases; the
claim key uses the interval's index (``floor(due / every)``) so they still claim each
period once. A run asked for by an event (run now, a dependency) is keyed by that event.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING

from kernel.errors import ConcurrencyError
from kernel.events import Event, NewEvent, Recorded
from services.scheduler.events import TaskStarted
from services.scheduler.specs import CompiledTask
from services.scheduler.triggers import AfterTrigger, IntervalTrigger

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["ClaimLost", "claim", "claim_key"]

log = logging.getLogger("xcore.scheduler")

#: Conflicting appends on one task stream tolerated before the claim gives up.
MAX_CONFLICTS = 50


class ClaimLost(Exception):
    """Another node (or boot) already started this run."""


def claim_key(
    task: CompiledTask, scheduled_for: float, attempt: int, cause: Recorded | None
) -> str:
    """The id of the ``TaskStarted`` of this run, the same on every node."""
    trigger = task.trigger
    if cause is not None:
        slot = f"cause:{cause.meta.id}"
    elif isinstance(trigger, IntervalTrigger):
        slot = f"every:{math.floor(scheduled_for / trigger.every + 1e-9)}"
    elif isinstance(trigger, AfterTrigger):
        slot = "after"  # relative to each node's registration: once per task
    else:  # cron and date: absolute instants
        slot = f"at:{round(scheduled_for, 3)}"
    basis = f"run|{task.id}|{slot}|{attempt}"
    return hashlib.blake2b(basis.encode(), digest_size=16).hexdigest()


async def claim(
    kernel: Kernel, stream: str, events: list[Event], key: str, cause: Recorded | None
) -> list[Recorded]:
    """Append ``events`` (their ``TaskStarted`` keyed ``key``) or raise ClaimLost."""
    items = [
        NewEvent.of(
            e,
            kernel._meta("scheduler", cause, None, key if isinstance(e, TaskStarted) else None),
            explicit_id=isinstance(e, TaskStarted),
        )
        for e in events
    ]
    for _ in range(MAX_CONFLICTS):
        version = await kernel.store.stream_version(stream)
        try:
            records = await kernel.append(items, stream=stream, expected_version=version)
        except ConcurrencyError:
            continue  # the stream moved: read its version again, the id decides
        for r in records:
            if r.meta.id == key:
                if r.meta.boot == kernel.boot:
                    return records
                raise ClaimLost(f"run {key} was started by node {r.meta.node}")
        raise ClaimLost(f"run {key} was already started")
    log.warning(
        "stream %s: %d conflicting appends in a row; run %s not claimed", stream, MAX_CONFLICTS, key
    )
    raise ClaimLost(f"run {key}: the stream {stream!r} kept changing")
