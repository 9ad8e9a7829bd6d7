"""Settings: defaults that work with no file, then ``xcore.yaml``, then ``XCORE_*``.

Precedence, lowest first: built-in defaults, the YAML file (``xcore.yaml`` in the
working directory, or the path given), environment variables, explicit overrides (the
command line). Nested keys use a double underscore in the environment:
``XCORE_SERVICES__SCHEDULER__MAX_CONCURRENCY=8`` sets ``services.scheduler.max_concurrency``.

A bad value is refused at start with the key and its source named, e.g.
``setting 'port' (from environment variable XCORE_PORT): Input should be a valid integer``.
Services validate their own section with :meth:`Settings.section`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from kernel.errors import SettingsError
from kernel.logging import redact

__all__ = ["Settings"]

ENV_PREFIX = "XCORE_"
DEFAULT_FILE = "xcore.yaml"

M = TypeVar("M", bound=BaseModel)


class Settings(BaseModel):
    """Everything the kernel and the HTTP shell read at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Where the event log and other state live.
    data_dir: Path = Path("var")
    #: The plugins directory.
    plugins_dir: Path = Path("plugins")
    #: Event store backend: the embedded SQLite file, memory (tests, experiments), or
    #: PostgreSQL (``dsn``), which several nodes share as one cluster (docs/cluster.md).
    store: Literal["sqlite", "memory", "postgres"] = "sqlite"
    #: The PostgreSQL DSN (``postgresql://user:password@host:port/db``) when
    #: ``store: postgres``; its password is redacted wherever settings are shown or logged.
    dsn: SecretStr | None = None
    #: The SQLite file; default ``<data_dir>/events.db``.
    database: Path | None = None
    #: SQLite durability: FULL survives power loss, NORMAL survives a process crash.
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Name of this kernel node, recorded in every event's metadata; the default is the
    #: host name plus the port, so several nodes on one machine differ.
    node: str = Field(default="", min_length=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    #: Bearer token of the admin API; generated at first start when unset.
    admin_token: SecretStr | None = Field(default=None, min_length=16)
    #: Watch the plugins directory and hot-reload changed plugins.
    reload: bool = True
    #: How long a request waits for its outcome event, in seconds.
    request_timeout: float = Field(default=10.0, gt=0)
    #: Which installed services to start (entry point names); None starts them all.
    enabled_services: list[str] | None = None
    #: Per-service sections, validated by each service (``Settings.section``).
    services: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _node_and_dsn(self) -> Settings:
        if not self.node:
            object.__setattr__(self, "node", f"{socket.gethostname()}:{self.port}")
        if self.store == "postgres" and self.dsn is None:
            raise ValueError("store 'postgres' needs a dsn (setting 'dsn' or XCORE_DSN)")
        return self

    @field_validator("dsn")
    @classmethod
    def _dsn_never_logged(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from urllib.parse import unquote, urlsplit

            raw = value.get_secret_value()
            password = urlsplit(raw).password if "://" in raw else None
            if password:
                redact(unquote(password))
                redact(password)
            for word in raw.split():
                if word.lower().startswith("password="):
                    redact(word.split("=", 1)[1])
        return value

    @field_validator("admin_token")
    @classmethod
    def _never_logged(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            redact(value.get_secret_value())
        return value

    @property
    def database_path(self) -> Path:
        return self.database if self.database is not None else self.data_dir / "events.db"

    def section(self, name: str, model: type[M]) -> M:
        """Validate the ``services.<name>`` section with ``model`` (errors name the key)."""
        raw = self.services.get(name, {})
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, prefix=f"services.{name}.")) from None

    @classmethod
    def load(
        cls,
        file: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from the YAML file, the environment and ``overrides``."""
        env = os.environ if env is None else env
        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}

        path = Path(file) if file is not None else Path(DEFAULT_FILE)
        if file is not None or path.exists():
            _merge(merged, sources, _read_yaml(path), f"file {path}")

        from_env: dict[str, Any] = {}
        env_sources: dict[str, str] = {}
        for key, value in env.items():
            if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX:
                continue
            parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
            if parts[0] not in cls.model_fields:
                raise SettingsError(
                    f"unknown setting {'.'.join(parts)!r} (from environment variable {key}); "
                    f"known settings: {', '.join(sorted(cls.model_fields))}"
                )
            node = from_env
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = _env_value(value)
            env_sources[".".join(parts)] = f"environment variable {key}"
        _merge(merged, sources, from_env, "")
        sources.update(env_sources)

        if overrides:
            _merge(
                merged,
                sources,
                {k: v for k, v in overrides.items() if v is not None},
                "command line",
            )
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, sources=sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"settings file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of settings at top level")
    return data


def _env_value(raw: str) -> Any:
    """Environment values are YAML scalars (so ``8``, ``true``, ``[a, b]`` work)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def _merge(
    target: dict[str, Any],
    sources: dict[str, str],
    new: Mapping[str, Any],
    source: str,
    prefix: str = "",
) -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], sources, value, source, dotted + ".")
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
        if source:
            sources[dotted] = source


def _describe(
    exc: ValidationError, *, sources: Mapping[str, str] | None = None, prefix: str = ""
) -> str:
    lines = []
    for err in exc.errors():
        key = prefix + ".".join(str(part) for part in err["loc"])
        where = ""
        if sources is not None:
            probe = key
            while probe and probe not in sources:
                probe = probe.rpartition(".")[0]
            if probe in sources:
                where = f" (from {sources[probe]})"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"setting {key!r}{where}: {message}")
    return "invalid settings:\n  " + "\n  ".join(lines)
