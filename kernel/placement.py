"""Where work that must happen once runs first: the kernel's placement policy.

Alone (one node, the default) every node-local claim is immediate. In a cluster the
cluster service replaces :attr:`Kernel.placement` with a policy that ranks the live
nodes for each key (rendezvous hashing): the first node claims at once, the next ones
only after a short grace each, so work spreads over the nodes and still gets done when
its first node is gone. Placement only *delays*; exactly-once comes from the claim
itself (an append with an expected version and a deterministic event id).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Alone", "Placement"]


class Placement(Protocol):
    #: True when other nodes write the same log (then a node acts only on its own
    #: in-process state, e.g. the runs it started, the plugins it loaded).
    shared: bool

    def delay(self, key: str) -> float:
        """Seconds this node waits before it claims the work named ``key``."""
        ...

    def claimed(self, claim: str) -> bool:
        """True when this node has already seen the claim ``claim`` (an event id) made:
        then it need not even try. False says nothing (the claim decides)."""
        ...

    def settled(self, key: str) -> float:
        """Seconds after a due time by which every live node would have claimed the
        work named ``key`` (0 alone): only then is unclaimed work really missed."""
        ...


class Alone:
    """A single node: claim everything at once."""

    shared = False

    def delay(self, key: str) -> float:
        return 0.0

    def claimed(self, claim: str) -> bool:
        return False

    def settled(self, key: str) -> float:
        return 0.0
