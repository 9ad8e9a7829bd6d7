"""Plugin manifests: ``PLUGIN_INFO`` read from ``run.py`` without running it, then validated.

The original project's keys are accepted as they are (``Api_prefix``,
``tag_for_identified``) beside their snake_case names (``api_prefix``, ``tags``), plus
``name``, ``mode``, ``limits``, ``network``, ``requires``, ``auth`` and ``description``. Anything else
is refused with the plugin, the file and the key named::

    plugin 'hello': run.py: key 'verison': unknown key (known keys: api_prefix, ...)

The dictionary is found with :mod:`ast` and evaluated with :func:`ast.literal_eval`, so
reading a manifest never executes plugin code (a sandboxed plugin's metadata included).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from kernel import prefixes
from kernel.access import AuthSpec, parse_auth
from kernel.errors import XcoreError

from .files import FileRefused, read_limited
from .source import SourceTooDeep, parse_source

__all__ = [
    "KNOWN_KEYS",
    "Manifest",
    "ManifestError",
    "Requirement",
    "normalize_prefix",
    "parse_manifest",
    "read_manifest",
    "read_plugin_info",
    "valid_name",
]

#: Keys of the original format, mapped to their snake_case names.
ALIASES = {"Api_prefix": "api_prefix", "tag_for_identified": "tags"}
KNOWN_KEYS = frozenset(
    {
        "version",
        "author",
        "api_prefix",
        "tags",
        "name",
        "mode",
        "limits",
        "network",
        "requires",
        "auth",
        "description",
        "watch",
    }
)
LIMIT_KEYS = frozenset({"memory", "cpu", "wall_time", "open_files", "processes", "file_size"})

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*$")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


class ManifestError(XcoreError):
    """A manifest (or a plugin file) is invalid; names the plugin, the file and the key."""

    def __init__(self, plugin: str, file: str, message: str, key: str | None = None) -> None:
        self.plugin = plugin
        self.file = file
        self.key = key
        self.reason = message
        where = f"key {key!r}: " if key else ""
        super().__init__(f"plugin {plugin!r}: {file}: {where}{message}")


@dataclass(frozen=True)
class Requirement:
    """One entry of ``requires``: another plugin and the versions of it that will do."""

    name: str
    specifier: SpecifierSet

    def allows(self, version: str) -> bool:
        try:
            return self.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            return False

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}" if str(self.specifier) else self.name


@dataclass(frozen=True)
class Manifest:
    """A validated ``PLUGIN_INFO``."""

    name: str
    version: str
    author: str = ""
    #: The mount prefix from the manifest (normalized: leading slash, no trailing one).
    prefix: str | None = None
    tags: tuple[str, ...] = ()
    mode: str = "trusted"
    limits: dict[str, float] = field(default_factory=dict)
    #: A sandboxed plugin asks for network access (the operator may still refuse it).
    network: bool = False
    requires: tuple[Requirement, ...] = ()
    #: The scopes its routes need (``kernel.access``), enforced by the router's dispatcher.
    auth: AuthSpec = field(default_factory=AuthSpec)
    description: str = ""
    #: Glob patterns (relative to the folder) of further files whose change reloads it.
    watch: tuple[str, ...] = ()


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None  # fullmatch: '$' would accept 'x\n'


def read_plugin_info(run_py: Path, plugin: str) -> dict[str, Any]:
    """The ``PLUGIN_INFO`` literal of ``run_py``, found and evaluated without running it."""
    try:
        source = read_limited(run_py)
    except FileNotFoundError:
        raise ManifestError(
            plugin, "run.py", "the file is missing (it holds PLUGIN_INFO)"
        ) from None
    except FileRefused as exc:
        raise ManifestError(plugin, "run.py", str(exc)) from None
    except OSError as exc:
        raise ManifestError(plugin, "run.py", f"cannot be read: {exc}") from None
    try:
        tree = parse_source(source, filename=str(run_py))
    except SyntaxError as exc:
        raise ManifestError(plugin, "run.py", f"line {exc.lineno}: {exc.msg}") from None
    except (MemoryError, RecursionError) as exc:
        raise ManifestError(
            plugin, "run.py", f"too large or too deeply nested to parse ({type(exc).__name__})"
        ) from None
    except SourceTooDeep as exc:
        raise ManifestError(plugin, "run.py", str(exc)) from None
    except ValueError as exc:  # e.g. null bytes
        raise ManifestError(plugin, "run.py", f"cannot be parsed: {exc}") from None
    found: ast.expr | None = None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "PLUGIN_INFO" for t in targets):
            found = node.value
    if found is None:
        raise ManifestError(plugin, "run.py", "no top-level `PLUGIN_INFO = {...}` assignment")
    try:
        info = ast.literal_eval(found)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ManifestError(
            plugin,
            "run.py",
            f"line {found.lineno}: PLUGIN_INFO must be a literal dict "
            "(no names, calls or expressions: it is read without running the plugin)",
        ) from None
    if not isinstance(info, dict):
        raise ManifestError(plugin, "run.py", "PLUGIN_INFO must be a dict")
    return info


def read_manifest(folder: Path, name: str | None = None) -> Manifest:
    """Read and validate the manifest of the plugin folder ``folder``."""
    plugin = name or folder.name
    if not folder.is_dir():
        raise ManifestError(plugin, str(folder), "is not a folder")
    return parse_manifest(read_plugin_info(folder / "run.py", plugin), plugin)


def parse_manifest(info: dict[str, Any], plugin: str, file: str = "run.py") -> Manifest:
    """Validate a ``PLUGIN_INFO`` dict for the plugin (folder) named ``plugin``."""
    if not valid_name(plugin):
        raise ManifestError(
            plugin,
            file,
            "invalid plugin name: use a letter then letters, digits or '_' (at most 64)",
        )
    values: dict[str, Any] = {}
    for raw_key, value in info.items():
        if not isinstance(raw_key, str):
            raise ManifestError(plugin, file, "keys must be strings", key=repr(raw_key))
        key = ALIASES.get(raw_key, raw_key)
        if key not in KNOWN_KEYS:
            raise ManifestError(
                plugin,
                file,
                f"unknown key (known keys: {', '.join(sorted(KNOWN_KEYS | set(ALIASES)))})",
                key=raw_key,
            )
        if key in values:
            raise ManifestError(
                plugin, file, f"given twice (as {raw_key!r} and under another name)", key=raw_key
            )
        values[key] = (raw_key, value)

    def get(key: str) -> tuple[str, Any]:
        found: tuple[str, Any] = values.get(key, (key, None))
        return found

    def text(key: str) -> str:
        raw_key, value = get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ManifestError(plugin, file, "must be a string", key=raw_key)
        return value

    raw_key, version = get("version")
    if version is None:
        raise ManifestError(
            plugin, file, "missing (a semantic version such as '1.0.0')", key="version"
        )
    if not isinstance(version, str) or not SEMVER_RE.fullmatch(version):
        raise ManifestError(
            plugin,
            file,
            f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. '1.0.0')",
            key=raw_key,
        )

    declared = text("name")
    if declared and declared != plugin:
        raise ManifestError(
            plugin,
            file,
            f"{declared!r} differs from the plugin's folder name {plugin!r}",
            key="name",
        )

    raw_key, mode = get("mode")
    mode = "trusted" if mode is None else mode
    if mode not in ("trusted", "sandboxed"):
        raise ManifestError(plugin, file, f"{mode!r} is not 'trusted' or 'sandboxed'", key=raw_key)

    raw_key, network = get("network")
    if network is not None and not isinstance(network, bool):
        raise ManifestError(plugin, file, "must be true or false", key=raw_key)

    raw_key, prefix_value = get("api_prefix")
    prefix = None
    if prefix_value is not None:
        prefix = normalize_prefix(prefix_value, plugin=plugin, file=file, key=raw_key)

    return Manifest(
        name=plugin,
        version=version,
        author=text("author"),
        prefix=prefix,
        tags=_strings(plugin, file, *get("tags")),
        mode=mode,
        limits=_limits(plugin, file, *get("limits")),
        network=bool(network),
        requires=_requires(plugin, file, *get("requires")),
        auth=_auth(plugin, file, *get("auth")),
        description=text("description"),
        watch=_strings(plugin, file, *get("watch")),
    )


def normalize_prefix(value: Any, *, plugin: str, file: str, key: str) -> str:
    """``/app/hello`` from ``/app/hello/``: the kernel's mount-prefix rule, culprit named."""
    if not isinstance(value, str):
        raise ManifestError(plugin, file, "must be a string such as '/app/hello'", key=key)
    try:
        return prefixes.normalize_prefix(value.rstrip("/") or value[:1])
    except prefixes.PrefixError as exc:
        raise ManifestError(plugin, file, str(exc), key=key) from None


def _strings(plugin: str, file: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ManifestError(plugin, file, "must be a string or a list of strings", key=key)


def _auth(plugin: str, file: str, key: str, value: Any) -> AuthSpec:
    try:
        return parse_auth(value)
    except ValueError as exc:
        raise ManifestError(plugin, file, str(exc), key=key) from None


def _requires(plugin: str, file: str, key: str, value: Any) -> tuple[Requirement, ...]:
    if value is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for name, spec in value.items():
            if not isinstance(name, str) or not isinstance(spec, str):
                raise ManifestError(
                    plugin, file, "must map plugin names to version specifiers", key=key
                )
            pairs.append((name, spec))
    elif isinstance(value, (list, tuple)):
        for item in value:
            if not isinstance(item, str):
                raise ManifestError(plugin, file, f"entry {item!r} is not a string", key=key)
            m = re.match(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*(.*)$", item)
            if m is None:
                raise ManifestError(plugin, file, f"entry {item!r} names no plugin", key=key)
            pairs.append((m.group(1), m.group(2)))
    else:
        raise ManifestError(
            plugin, file, "must be a dict {name: specifier} or a list like ['hello>=1.0']", key=key
        )
    out = []
    for name, spec in pairs:
        if not valid_name(name):
            raise ManifestError(plugin, file, f"{name!r} is not a plugin name", key=key)
        if name == plugin:
            raise ManifestError(plugin, file, "a plugin cannot require itself", key=key)
        try:
            specifier = SpecifierSet(spec.strip())
        except InvalidSpecifier:
            raise ManifestError(
                plugin, file, f"{spec!r} (for {name!r}) is not a version specifier", key=key
            ) from None
        out.append(Requirement(name, specifier))
    return tuple(out)


def _limits(plugin: str, file: str, key: str, value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(plugin, file, "must be a dict", key=key)
    out: dict[str, float] = {}
    for name, raw in value.items():
        where = f"{key}.{name}"
        if name not in LIMIT_KEYS:
            raise ManifestError(
                plugin, file, f"unknown limit (known: {', '.join(sorted(LIMIT_KEYS))})", key=where
            )
        parsed: float | None = None
        if isinstance(raw, bool):
            parsed = None
        elif isinstance(raw, (int, float)):
            parsed = float(raw)
        elif isinstance(raw, str) and name in ("memory", "file_size"):
            m = SIZE_RE.match(raw)
            if m:
                size = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
                parsed = float(m.group(1)) * size
        elif isinstance(raw, str) and name in ("cpu", "wall_time"):
            m = DURATION_RE.match(raw)
            if m:
                unit = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
                parsed = float(m.group(1)) * unit
        if parsed is None or parsed <= 0:
            raise ManifestError(
                plugin, file, f"{raw!r} is not a positive number (or size/duration)", key=where
            )
        out[name] = parsed
    return out
