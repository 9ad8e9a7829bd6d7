"""Settings: defaults that work with no file, then files, secrets, the environment, overrides.

Precedence, lowest first (each source is a pydantic-settings source):

1. built-in defaults;
2. the YAML file (``xcore.yaml`` in the working directory, or the path given);
3. secret files: ``<secrets_dir>/xcore_<setting>`` (e.g. ``/run/secrets/xcore_admin_token``),
   when ``secrets_dir`` is set (in the YAML file, the environment or the call);
4. a dotenv file (``.env`` in the working directory, or the path given): only its
   ``XCORE_*`` entries are read, so it can be shared with other programs;
5. environment variables ``XCORE_*``;
6. explicit overrides (the command line).

Environment and secret-file values are taken verbatim: ``abc #rest`` keeps its ``#``,
quotes stay, ``null`` is the four letters (a ``.env`` file follows the dotenv format,
where quotes delimit a value and an unquoted `` #`` starts a comment). Only settings that hold a list, a mapping or a
section (``enabled_services``, ``http``) are read as JSON, as pydantic-settings does.
Nested keys use a double underscore: ``XCORE_SERVICES__SCHEDULER__MAX_CONCURRENCY=8`` sets
``services.scheduler.max_concurrency`` (a string there: each service validates its own
section with :meth:`Settings.section`, whose model converts it).

A bad value is refused at start with the key and its source named, e.g.
``setting 'port' (from environment variable XCORE_PORT): Input should be a valid integer``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
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
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from kernel.errors import SettingsError
from kernel.logging import redact

__all__ = ["HttpSettings", "Settings"]

ENV_PREFIX = "XCORE_"
#: ``XCORE_*`` variables that belong to the test suite and the benchmarks
#: (``XCORE_TEST_PG_DSN``, ``XCORE_BENCH_PAIRS``...): never read as settings, so CI can
#: export them to every process it starts.
TOOLING_PREFIXES = ("XCORE_TEST_", "XCORE_BENCH_")
DEFAULT_FILE = "xcore.yaml"
DEFAULT_DOTENV = ".env"

M = TypeVar("M", bound=BaseModel)


class HttpSettings(BaseModel):
    """Bounds of the HTTP shell: what a client may cost before it is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Largest request body accepted on any route, in bytes (413 beyond it, counted while
    #: the body is read). Routes may raise their own limit (plugin uploads do).
    max_body_bytes: int = Field(default=1024 * 1024, ge=0)
    #: Seconds a client has to send a whole request head, from the moment the connection
    #: opens or the previous response ends; the connection is closed after that.
    header_timeout: float = Field(default=10.0, gt=0)
    #: Seconds an idle keep-alive connection stays open between requests. Longer than
    #: the reuse limits of common clients (httpx 5 s, aiohttp 15 s) and of load balancers
    #: (60 s): a server that closes first races a client reusing the connection, whose
    #: request then fails ("Server disconnected", ``ReadError``).
    keep_alive_timeout: float = Field(default=75.0, gt=0)
    #: Seconds the server waits for each piece of a request body before answering 408.
    body_timeout: float = Field(default=30.0, gt=0)
    #: Bytes per second a body must average once its first ``body_timeout`` seconds are
    #: spent (a body dripped slower, a byte just inside each timeout, is answered 408).
    #: 0: no minimum rate.
    min_body_rate: int = Field(default=1024, ge=0)
    #: Seconds a client may leave its response unread (the server's send buffer full)
    #: before its connection is closed.
    send_timeout: float = Field(default=60.0, gt=0)
    #: Open connections accepted at once; one more is answered 503 and closed.
    max_connections: int = Field(default=1000, ge=1)
    #: Serve /docs, /redoc and the admin part of /openapi.json to admin clients only.
    private_docs: bool = False


class Settings(BaseSettings):
    """Everything the kernel and the HTTP shell read at start.

    ``Settings(...)`` takes only what it is given (plus defaults); :meth:`load` reads
    the files, secrets and environment.
    """

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

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
    #: Start a new empty log although the data folder shows one existed (it was lost).
    allow_new_log: bool = False
    #: Open a log that ends before a position it had acknowledged (events were lost).
    accept_log_loss: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Name of this kernel node, recorded in every event's metadata; the default is the
    #: host name plus the port, so several nodes on one machine differ.
    node: str = Field(default="", min_length=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    #: Bearer token of the admin API; generated at first start when unset.
    admin_token: SecretStr | None = Field(default=None, min_length=16)
    #: Folder of secret files (``xcore_admin_token``...), e.g. ``/run/secrets``.
    secrets_dir: Path | None = None
    #: Watch the plugins directory and hot-reload changed plugins.
    reload: bool = True
    #: How long a request waits for its outcome event, in seconds.
    request_timeout: float = Field(default=10.0, gt=0)
    #: Bounds of the HTTP shell (body size, timeouts, connections, docs).
    http: HttpSettings = Field(default_factory=HttpSettings)
    #: Which installed services to start (entry point names); None starts them all.
    enabled_services: list[str] | None = None
    #: Per-service sections, validated by each service (``Settings.section``).
    services: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: The watchdog reports an event loop blocked longer than this, in seconds.
    loop_block_threshold: float = Field(default=1.0, gt=0)
    #: After a stop signal, how long a blocked event loop may delay the exit, in seconds.
    stop_grace: float = Field(default=10.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The constructor is pure (what it is given, then defaults): embedding code and
        # tests are not changed by the environment. ``load`` reads the other sources.
        return (init_settings,)

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
            from kernel.store.dsn import dsn_secrets

            for secret in dsn_secrets(value.get_secret_value()):
                redact(secret)
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
        """Validate the ``services.<name>`` section with ``model`` (errors name the key).

        A value that came from the environment as text is read as JSON where ``model``
        wants a list or a mapping (``XCORE_SERVICES__X__NAMES='["a", "b"]'``).
        """
        raw = _decode_complex(self.services.get(name, {}), model)
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
        dotenv: str | os.PathLike[str] | None = None,
        secrets_dir: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from the YAML file, secrets, dotenv, environment and ``overrides``.

        ``env`` replaces ``os.environ`` (tests); ``dotenv`` and ``file`` default to
        ``.env`` and ``xcore.yaml`` in the working directory when they exist.
        """
        env = os.environ if env is None else env
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        layers: list[tuple[dict[str, Any], dict[str, str]]] = []

        path = Path(file) if file is not None else Path(DEFAULT_FILE)
        if file is not None or path.exists():
            data = _read_yaml(cls, path)
            layers.append((data, _same_source(data, f"file {path}")))

        env_path = Path(dotenv) if dotenv is not None else Path(DEFAULT_DOTENV)
        if dotenv is not None and not env_path.is_file():
            why = "is not a regular file" if env_path.exists() else "does not exist"
            raise SettingsError(f"dotenv file {env_path} {why}")
        dotenv_vars = _read_dotenv(env_path) if env_path.is_file() else {}
        from_dotenv = _env_layer(cls, dotenv_vars, f"dotenv file {env_path}, entry")
        from_env = _env_layer(cls, env, "environment variable")

        # secrets_dir is itself a setting: the strongest source that names it wins.
        secrets = secrets_dir
        for data, _ in (from_env, from_dotenv, *reversed(layers)):
            if secrets is None and data.get("secrets_dir"):
                secrets = data["secrets_dir"]
        if "secrets_dir" in overrides:
            secrets = overrides["secrets_dir"]
        if secrets is not None:
            found = _read_secrets(cls, Path(secrets))
            layers.append(
                (
                    found,
                    {k: f"secret file {Path(secrets) / (ENV_PREFIX.lower() + k)}" for k in found},
                )
            )
        layers += [from_dotenv, from_env]
        if overrides:
            layers.append((dict(overrides), _same_source(overrides, "command line")))

        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for data, named in layers:
            _merge(merged, data)
            sources.update(named)
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, sources=sources)) from None


def _read_yaml(cls: type[Settings], path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SettingsError(f"settings file {path} does not exist")
    if not path.is_file():
        raise SettingsError(f"settings file {path} is not a regular file")
    try:
        source = YamlConfigSettingsSource(cls, yaml_file=path)
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"settings file {path} cannot be read: {exc}") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise SettingsError(
            f"settings file {path} must hold a mapping of settings at top level ({exc})"
        ) from None
    data = source()
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of settings at top level")
    return data


def _read_dotenv(path: Path) -> dict[str, str]:
    """The ``XCORE_*`` entries of a dotenv file (other entries belong to other programs)."""
    try:
        source = DotEnvSettingsSource(Settings, env_file=path, case_sensitive=True)
    except OSError as exc:
        raise SettingsError(f"dotenv file {path} cannot be read: {exc}") from None
    return {k: v for k, v in source.env_vars.items() if v is not None}


def _env_layer(
    cls: type[Settings], env: Mapping[str, str], what: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings from ``XCORE_*`` variables, through pydantic-settings' env source."""
    names: dict[str, str] = {}
    for key in env:
        if not key.upper().startswith(ENV_PREFIX) or len(key) == len(ENV_PREFIX):
            continue
        if key.upper().startswith(TOOLING_PREFIXES):
            continue  # the test suite's and the benchmarks' own knobs, not settings
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in cls.model_fields:
            raise SettingsError(
                f"unknown setting {'.'.join(parts)!r} (from {what} {key}); "
                f"known settings: {', '.join(sorted(cls.model_fields))}"
            )
        names[".".join(parts)] = f"{what} {key}"
    if not names:
        return {}, {}
    source = EnvSettingsSource(cls)
    source.env_vars = {k.lower(): v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}
    try:
        data = source()
    except Exception as exc:  # pydantic-settings' SettingsError: bad JSON in a complex value
        cause = exc.__cause__ or exc
        culprit = next(
            (name for key, name in names.items() if key.split(".")[0] in str(exc)),
            what,
        )
        raise SettingsError(f"invalid settings: {culprit}: {cause}") from None
    return data, names


def _read_secrets(cls: type[Settings], folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise SettingsError(f"secrets_dir {folder} is not a folder")
    source = SecretsSettingsSource(cls, secrets_dir=folder)
    try:
        return source()
    except Exception as exc:
        raise SettingsError(f"secrets in {folder} cannot be read: {exc}") from None


def _same_source(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    named: dict[str, str] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        named[dotted] = source
        if isinstance(value, Mapping):
            named.update(_same_source(value, source, dotted + "."))
    return named


def _merge(target: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value


def _decode_complex(raw: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    out = dict(raw)
    for name, field in model.model_fields.items():
        value = out.get(name)
        if isinstance(value, str) and _is_complex(field.annotation):
            with contextlib.suppress(orjson.JSONDecodeError):  # else the model names the key
                out[name] = orjson.loads(value)
    return out


def _is_complex(annotation: Any) -> bool:
    """A list, set, tuple, mapping or model (or an optional one): read from JSON text."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_complex(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _is_complex(typing.get_args(annotation)[0])
    target = origin or annotation
    return isinstance(target, type) and issubclass(target, (list, set, tuple, dict, BaseModel))


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
