"""Mount prefixes: how a manifest's prefix and a router's own prefix combine.

This rule is the contract between the loader (which announces a plugin's routes in
``PluginLoaded``) and the router mounter (which serves them), so it lives here, once.

The rule (documented with the seed's example in ``docs/routing.md``):

- the **mount prefix** is the manifest's ``api_prefix`` (``Api_prefix``); a plugin
  whose manifest gives none is mounted at its router's own prefix;
- the router's own prefix is kept **below** the mount prefix, unless the mount prefix
  already ends with it (on a segment boundary), in which case it is not doubled::

      manifest /app/plugin_name + router /plugin_name + @get("/status")
          -> /app/plugin_name/status               (router prefix not doubled)
      manifest /app/plugin_name + router /v1 + @get("/status")
          -> /app/plugin_name/v1/status            (router prefix kept below)
      manifest /app/plugin_name + router without prefix + @get("/status")
          -> /app/plugin_name/status

Every public path of a plugin therefore lies under its mount prefix, so two plugins
whose mount prefixes do not overlap can never claim the same path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MountPoint", "PrefixError", "mount_point", "normalize_prefix", "overlaps", "under"]

_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")


class PrefixError(ValueError):
    """A prefix is not a valid mount point (the message says why)."""


@dataclass(frozen=True, slots=True)
class MountPoint:
    """Where a plugin is served."""

    #: The public mount prefix: the dispatcher routes every path under it to the plugin.
    prefix: str
    #: What the plugin's router is included under inside its own app (the mount prefix
    #: minus the router's own prefix when that one is not doubled); may be "".
    root: str


def normalize_prefix(prefix: str) -> str:
    """A mount prefix as the dispatcher compares it: ``/seg/seg``, no trailing slash.

    Raises :class:`PrefixError` for anything else (the root ``/``, empty or dot
    segments, path parameters, characters outside ``A-Za-z0-9._~-``).
    """
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise PrefixError(f"prefix {prefix!r} must start with '/'")
    trimmed = prefix[:-1] if prefix.endswith("/") else prefix
    if not trimmed:
        raise PrefixError("prefix '/' would claim every path; give at least one segment")
    for segment in trimmed[1:].split("/"):
        if not segment:
            raise PrefixError(f"prefix {prefix!r} has an empty segment")
        if segment in (".", ".."):
            raise PrefixError(f"prefix {prefix!r} has a {segment!r} segment")
        if not _SEGMENT.fullmatch(segment):
            raise PrefixError(
                f"prefix {prefix!r}: segment {segment!r} may only use letters, digits and '._~-'"
            )
    return trimmed


def mount_point(manifest_prefix: str | None, router_prefix: str | None) -> MountPoint:
    """Combine the manifest's prefix with the router's own prefix (see the module doc)."""
    own = (router_prefix or "").rstrip("/")
    if manifest_prefix:
        prefix = normalize_prefix(manifest_prefix)
    elif own:
        prefix = normalize_prefix(own)
    else:
        raise PrefixError(
            "no mount prefix: set 'api_prefix' in PLUGIN_INFO or a prefix on the router"
        )
    if own and prefix.endswith(own):
        # own starts with "/", so this suffix always begins on a segment boundary
        return MountPoint(prefix=prefix, root=prefix[: len(prefix) - len(own)])
    return MountPoint(prefix=prefix, root=prefix)


def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` itself or below it (segment boundaries only)."""
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")


def overlaps(a: str, b: str) -> bool:
    """Whether two mount prefixes would claim a common path."""
    return under(a, b) or under(b, a)
