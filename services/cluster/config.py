"""The cluster's settings: ``services.cluster`` in ``xcore.yaml`` / ``XCORE_SERVICES__CLUSTER__*``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ClusterSettings"]


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: None: on when the store is PostgreSQL (a shared log), off otherwise.
    enabled: bool | None = None
    #: Seconds between two heartbeats of this node.
    heartbeat_s: float = Field(default=2.0, gt=0)
    #: A node without a heartbeat for this long is lost: its runs are failed by another.
    stale_after_s: float = Field(default=10.0, gt=0)
    #: How long each node after the first in a run's ranking waits before claiming it.
    claim_grace_s: float = Field(default=0.2, ge=0)
    #: Largest plugin archive stored in the database, in bytes.
    max_archive_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
