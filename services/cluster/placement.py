"""Which node claims a task's runs first: rendezvous hashing over the live nodes.

Every node ranks the live nodes (fresh heartbeat) by ``hash(task, node)``; the first
claims at once, the n-th waits ``(n - 1) * (claim_grace_s + 2 * lag)`` before it
tries, where ``lag`` is how late the cluster's claims have been committing lately (the
largest delay after the due time in the last 10 s, ``ClusterView.claim_lag``; ``2 *
lag`` at most ``stale_after_s``). Each task therefore runs on one node while that node lives — the
tasks spread over the nodes — and the next one in its ranking takes over within a grace
when it does not claim. The claim itself (``services/scheduler/claim.py``) is what makes
a run happen once; the ranking only makes the race short and one-sided, and a node that
already saw the run claimed (its ``TaskStarted`` reached its projection during the
grace) does not even try.

Why the lag: a loaded cluster claims late (a burst of 1,000 runs takes its log seconds).
With a fixed grace the other nodes then claimed every run too, each losing claim costing
more trips to the database than a winning one: the load grew with the number of nodes
and three nodes were later than one. Waiting as long as claims currently take keeps the
race one-sided; when the load falls, the lag falls with it.
"""

from __future__ import annotations

import hashlib
import time

from services.cluster.projection import ClusterView

__all__ = ["Rendezvous"]


#: How long the set of live nodes is reused before it is read again (seconds): a node is
#: taken for dead after ``stale_after_s``, so this adds nothing that matters, and a burst
#: of 1,000 due runs ranks its tasks against one set instead of computing it 1,000 times.
ALIVE_TTL_S = 0.25
#: Rankings kept per set of live nodes (one per task: a task's ranking is reused by
#: each of its runs until the set changes).
MAX_RANKINGS = 100_000

#: How many times the recent claim lag the next node waits: a burst can be later than
#: the last ones, and this node's view of the claim comes later still.
LAG_FACTOR = 2.0


class Rendezvous:
    shared = True

    def __init__(
        self, view: ClusterView, me: str, grace: float, max_lag: float = float("inf")
    ) -> None:
        self.view = view
        self.me = me
        self.grace = grace
        self.max_lag = max_lag
        self._alive: tuple[str, ...] = ()
        self._alive_until = float("-inf")
        self._rankings: dict[str, list[str]] = {}

    def rank(self, key: str) -> list[str]:
        now = time.monotonic()
        if now >= self._alive_until:
            alive = self.view.alive(time.time())
            if self.me not in alive:
                alive.append(self.me)
            if tuple(alive) != self._alive:
                self._alive = tuple(alive)
                self._rankings = {}
            self._alive_until = now + ALIVE_TTL_S
        order = self._rankings.get(key)
        if order is None:
            if len(self._rankings) >= MAX_RANKINGS:
                self._rankings = {}
            order = self._rankings[key] = sorted(
                self._alive,
                key=lambda n: hashlib.blake2b(f"{key}\0{n}".encode(), digest_size=8).digest(),
                reverse=True,
            )
        return list(order)

    def delay(self, key: str) -> float:
        rank = self.rank(key).index(self.me)
        if not rank:
            return 0.0
        lag = LAG_FACTOR * self.view.claim_lag(time.time())
        return rank * (self.grace + min(lag, self.max_lag))

    def claimed(self, claim: str) -> bool:
        return claim in self.view.claims

    def settled(self, key: str) -> float:
        last = len(self.rank(key)) - 1
        lag = min(LAG_FACTOR * self.view.claim_lag(time.time()), self.max_lag)
        # the last node's wait, then one more grace for its claim to reach this view
        return (last + 1) * (self.grace + lag)
