"""Plugin archives: packing a plugin folder, and materializing it on another node.

Guarantee: a node materializes exactly the files that were installed on the node that
stored the archive, or nothing — the extracted tree must hash to the archive's key
before it replaces the plugin's folder, and the swap is two renames.

The key is :func:`tree_digest`: a sha256 over the sorted relative paths and contents of
the plugin's regular files (caches and dot folders left out). Archives are plain tar
files built here from regular files only; extraction refuses absolute paths, ``..``,
links and devices all the same (the bytes come from the database, which is trusted
less than the code).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

__all__ = ["ArchiveError", "materialize", "pack", "tree_digest"]

STAGING = ".xcore-staging"
IGNORED_DIRS = frozenset({"__pycache__"})


class ArchiveError(Exception):
    """An archive cannot be built or materialized (names the plugin and the reason)."""


def _files(folder: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS and not d.startswith("."))
        for f in files:
            path = Path(root) / f
            if f.endswith((".pyc", ".pyo")) or f == ".DS_Store" or not path.is_file():
                continue
            if path.is_symlink():
                continue
            out.append(path)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in _files(folder):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def pack(folder: Path, limit: int) -> tuple[str, bytes]:
    """(digest, tar bytes) of the plugin ``folder``."""
    if not folder.is_dir():
        raise ArchiveError(f"plugin folder {folder} does not exist")
    buf = io.BytesIO()
    h = hashlib.sha256()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in _files(folder):
            rel = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            h.update(rel.encode() + b"\0" + data + b"\0")
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
            if buf.tell() > limit:
                raise ArchiveError(f"plugin {folder.name!r} is larger than {limit} bytes")
    return h.hexdigest(), buf.getvalue()


def _safe_member(name: str, member: tarfile.TarInfo) -> PurePosixPath:
    rel = PurePosixPath(member.name)
    if rel.is_absolute() or ".." in rel.parts or not member.isfile():
        raise ArchiveError(f"plugin {name!r}: unsafe archive member {member.name!r}")
    return rel


def materialize(name: str, digest: str, data: bytes, plugins_dir: Path) -> Path:
    """Write plugin ``name`` from ``data`` into ``plugins_dir/name`` (verified, swapped)."""
    if not name or "/" in name or name.startswith("."):
        raise ArchiveError(f"invalid plugin name {name!r}")
    staging = plugins_dir / STAGING / f"cluster-{name}-{uuid.uuid4().hex[:8]}"
    work = staging / name
    work.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                rel = _safe_member(name, member)
                target = work.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
        found = tree_digest(work)
        if found != digest:
            raise ArchiveError(
                f"plugin {name!r}: the archive's content hashes to {found[:12]}, "
                f"not to its key {digest[:12]}; nothing changed"
            )
        final = plugins_dir / name
        old = staging / "previous"
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(work, final)
        except OSError:
            if old.exists():
                os.replace(old, final)
            raise
        return final
    except tarfile.TarError as exc:
        raise ArchiveError(f"plugin {name!r}: the stored archive is unreadable: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # others may still stage there
            (plugins_dir / STAGING).rmdir()
