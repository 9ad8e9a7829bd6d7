"""Which node claims a task's runs first: rendezvous hashing over the live nodes.

Every node ranks the live nodes (fresh heartbeat) by ``hash(task, node)``; the first
claims at once, the n-th waits ``(n - 1) * claim_grace_s`` before it tries. Each task
therefore runs on one node while that node lives — the tasks spread over the nodes —
and the next one in its ranking takes over within a grace when it does not claim. The
claim itself (``services/scheduler/claim.py``) is what makes a run happen once; the
ranking only makes the race short and one-sided, and a node that already saw the run
claimed (its ``TaskStarted`` reached its projection during the grace) does not even try.
"""

from __future__ import annotations

import hashlib
import time

from services.cluster.projection import ClusterView

__all__ = ["Rendezvous"]


class Rendezvous:
    shared = True

    def __init__(self, view: ClusterView, me: str, grace: float) -> None:
        self.view = view
        self.me = me
        self.grace = grace

    def rank(self, key: str) -> list[str]:
        alive = self.view.alive(time.time())
        if self.me not in alive:
            alive.append(self.me)
        return sorted(
            alive,
            key=lambda n: hashlib.blake2b(f"{key}\0{n}".encode(), digest_size=8).digest(),
            reverse=True,
        )

    def delay(self, key: str) -> float:
        return self.rank(key).index(self.me) * self.grace

    def claimed(self, claim: str) -> bool:
        return claim in self.view.claims
