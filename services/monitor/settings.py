"""Settings of the monitor service: the ``services.monitor`` section.

    services:
      monitor:
        logs: {max_lines: 200000, max_age: 604800, max_message: 8192}
        stream: {heartbeat: 15}
        alerts:
          rules:
            - {name: task-failures, kind: task_failures, threshold: 3, window: 300}
          webhooks:
            - {url: "http://127.0.0.1:9000/hook", secret: "...", retries: 3}

Every key is checked; an unknown or bad one stops the start with its dotted name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from kernel.logging import redact

__all__ = [
    "DEFAULT_RULES",
    "AlertRule",
    "LogSettings",
    "MonitorSettings",
    "StreamSettings",
    "WebhookSettings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSettings(_Strict):
    #: Lines kept in the store; the oldest are dropped first (and counted).
    max_lines: int = Field(default=200_000, ge=100)
    #: Lines older than this many seconds are dropped.
    max_age: float = Field(default=7 * 24 * 3600.0, gt=0)
    #: A longer message (or exception text) is cut to this many characters.
    max_message: int = Field(default=8192, ge=256)
    #: Lines buffered in memory waiting for the store; past it they are dropped (counted).
    buffer: int = Field(default=50_000, ge=100)
    #: Capture lines at this level and above into the store.
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "DEBUG"


class StreamSettings(_Strict):
    #: Seconds between heartbeat comments on an idle SSE stream.
    heartbeat: float = Field(default=15.0, gt=0)
    #: Events (or log lines) read from the store per step of a stream.
    page: int = Field(default=200, ge=1, le=5000)


RuleKind = Literal[
    "task_failures",
    "plugin_failures",
    "plugin_load_failed",
    "sandbox_circuit",
    "subscriber_lag",
    "scheduler_lag",
]


class AlertRule(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: RuleKind
    #: Failures within ``window`` that raise the alert (failure rules).
    threshold: int = Field(default=3, ge=1)
    #: Seconds over which failures are counted.
    window: float = Field(default=300.0, gt=0)
    #: Lag bound: events (subscriber_lag) or seconds of lateness (scheduler_lag).
    bound: float = Field(default=10_000, gt=0)
    #: Only tasks or plugins whose name matches this glob (``jobs.*``).
    match: str = "*"


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(name="task-failures", kind="task_failures", threshold=3, window=300),
    AlertRule(name="plugin-failures", kind="plugin_failures", threshold=3, window=300),
    AlertRule(name="plugin-load-failed", kind="plugin_load_failed", threshold=1),
    AlertRule(name="sandbox-circuit", kind="sandbox_circuit", threshold=1),
    AlertRule(name="subscriber-lag", kind="subscriber_lag", bound=10_000),
    AlertRule(name="scheduler-lag", kind="scheduler_lag", bound=60),
)


class WebhookSettings(_Strict):
    url: str = Field(pattern=r"^https?://[^\s]+$")
    #: Key of the ``X-Xcore-Signature`` HMAC-SHA256 header (none: unsigned).
    secret: SecretStr | None = None
    timeout: float = Field(default=5.0, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    #: First retry delay in seconds, doubled each time.
    backoff: float = Field(default=0.5, ge=0)

    @field_validator("secret")
    @classmethod
    def _never_logged(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            redact(value.get_secret_value())
        return value


class AlertSettings(_Strict):
    rules: tuple[AlertRule, ...] = DEFAULT_RULES
    webhooks: tuple[WebhookSettings, ...] = ()
    #: Seconds between checks of the lag rules.
    check_every: float = Field(default=5.0, gt=0)
    #: Notifications waiting for delivery; past it a notification fails at once.
    queue: int = Field(default=1000, ge=1)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique: {', '.join(dupes)}")
        return rules


class MonitorSettings(_Strict):
    logs: LogSettings = LogSettings()
    stream: StreamSettings = StreamSettings()
    alerts: AlertSettings = AlertSettings()
    #: Seconds between saves of the in-process counters (HTTP, append latency).
    flush_every: float = Field(default=5.0, gt=0)
