"""Settings of the scheduler: the ``services.scheduler`` section of ``xcore.yaml``.

services:
  scheduler:
    max_concurrency: 32
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.scheduler.triggers import parse_zone

__all__ = ["SchedulerSettings"]


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The global limit of runs in progress at once (async and sync together).
    max_concurrency: int = Field(default=32, ge=1)
    #: Worker threads for sync tasks (default: ``max_concurrency``).
    threads: int | None = Field(default=None, ge=1)
    #: Time zone of cron expressions and naive ``at=`` times without ``tz=``.
    default_timezone: str = "UTC"
    #: ``TaskStarted`` is made durable up to this long before the due time, so the
    #: log write does not delay the start (the lead follows the slowest recent
    #: appends, within this bound). 80 ms: a burst of 100 runs due at one instant takes
    #: 10-20 ms from its timer to its durable starts on a quiet 2-core machine, 15-50 ms
    #: on a loaded one, plus the machine's own pauses (``lead_margin_ms``).
    max_lead_ms: float = Field(default=80.0, ge=0, allow_inf_nan=False)
    #: Added to twice the slowest recent way from a timer to a durable start to make the
    #: lead: the machine itself may pause or slow the process for this long in the
    #: middle of the way. On the shared 2-core VM of the benchmarks, a separate probe
    #: process saw 1-2 such windows a second, mostly 15-30 ms long (3-17x slower for the
    #: same work; bench/host_speed.py), and the bursts late as a whole fell in them.
    #: (Both finite: an infinite lead fired every instant's timer at once, and the learnt
    #: way stayed infinite, the GC policy's slack inf less inf.)
    lead_margin_ms: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    #: Refuse every task of a plugin as soon as one of its declarations is refused.
    strict: bool = False
    #: A run's return value is kept with its outcome event if its JSON is at most this.
    max_result_bytes: int = Field(default=65536, ge=0)
    #: How long kept results are shown (``GET /admin/tasks/{id}/runs``), in seconds.
    keep_results_s: float = Field(default=7 * 86400, ge=0)
    #: Keep the objects built at boot out of garbage collections (``gc.freeze()`` once
    #: registrations are quiet, a higher generation-0 threshold): see gcpolicy.py.
    manage_gc: bool = True
    #: Missed due times run with ``coalesce="all"`` at most this many (the rest are
    #: recorded as missed).
    max_catch_up_runs: int = Field(default=100, ge=1)

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        parse_zone(value)
        return value
