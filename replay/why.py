"""``why``: the chain of causes of an event, and what it caused in turn.

Every event the kernel records in reaction to another carries that event's id as its
``causation_id`` and the chain's ``correlation_id`` (the id of the request that started
it). ``why`` follows the causation ids back through the log (the id column is indexed,
so each step is one lookup) to the origin — the admin request, the file change or the
timer that started it, whose ``actor`` says who — then scans forward once from the
origin for the events caused, directly or not, by this one, and for the other events of
the same correlation.

A cause that is not in the log (a slice that starts later, or an id from outside) is
reported as such, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.events import Recorded
from replay.errors import ReplayError
from replay.progress import Progress
from replay.source import Log

__all__ = ["Why", "why"]

MAX_DEPTH = 10_000
MAX_CORRELATED = 200


@dataclass
class Why:
    event: Recorded
    #: from the origin to the event itself (inclusive)
    chain: list[Recorded]
    #: the causation id at the top of the chain that is not in this log, if any
    missing_cause: str | None
    #: (depth, record): what the event caused, in log order
    effects: list[tuple[int, Recorded]] = field(default_factory=list)
    #: other events of the same correlation, neither causes nor effects
    correlated: list[Recorded] = field(default_factory=list)
    correlated_total: int = 0


def why(log: Log, position: int, *, progress: bool = False) -> Why:
    last = log.last_position()
    if position < 1 or position > last:
        raise ReplayError(
            f"position {position} is not in {log.location} (positions {log.first_position()}..{last})"
        )
    event = log.get(position)
    if event is None:
        raise ReplayError(
            f"position {position} is missing from {log.location} (a gap or an unreadable row)"
        )
    try:
        event.meta  # noqa: B018 -- decoding it is the check
    except ValueError as exc:
        raise ReplayError(
            f"position {position}: its metadata is corrupt, so its causes are unknown ({exc})"
        ) from None
    chain = [event]
    seen = {event.meta.id}
    missing = None
    current = event
    while current.meta.causation_id and len(chain) < MAX_DEPTH:
        cause_id = current.meta.causation_id
        if cause_id in seen:
            break  # a cycle cannot be recorded by the kernel; stop rather than loop
        cause = log.by_id(cause_id)
        if cause is not None:
            try:
                cause.meta  # noqa: B018
            except ValueError:
                cause = None
        if cause is None:
            missing = cause_id
            break
        chain.append(cause)
        seen.add(cause_id)
        current = cause
    chain.reverse()
    result = Why(event, chain, missing)

    correlation = event.meta.correlation_id or event.meta.id
    chain_ids = {r.meta.id for r in chain}
    descendants: dict[str, int] = {event.meta.id: 0}
    start = chain[0].position - 1
    bar = Progress("why", last, start=start, enabled=None if progress else False)
    try:
        for batch in log.batches(after=start):
            for r in batch:
                try:
                    m = r.meta
                except ValueError:
                    continue  # an unreadable row: verify reports it
                if r.position > position and m.causation_id in descendants:
                    depth = descendants[m.causation_id] + 1
                    descendants[m.id] = depth
                    result.effects.append((depth, r))
                elif (
                    m.correlation_id == correlation or m.id == correlation
                ) and m.id not in chain_ids:
                    result.correlated_total += 1
                    if len(result.correlated) < MAX_CORRELATED:
                        result.correlated.append(r)
            bar.update(batch[-1].position)
    finally:
        bar.close()
    return result
