"""Installing plugins from a folder or an archive, and the checks that come first.

An install is *staged*: the folder is copied (or the ``.zip`` / ``.tar.gz`` extracted)
into a hidden staging folder inside the plugins directory, but only after every member
of the archive was checked (no absolute path, no ``..``, no link pointing outside the
plugin, no device file, total size and file count under the limits). The staged copy
is then validated like any plugin (manifest, ``compile()`` of every ``.py``, YAML of
``config.yaml``) and only then renamed into place — one rename, so an install that
fails at any point leaves the plugins directory as it was.

Everything here is blocking file-system work: the service calls it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from .manifest import Manifest, ManifestError, read_manifest, read_plugin_info, valid_name

if TYPE_CHECKING:
    from .settings import LoaderSettings

__all__ = [
    "ARCHIVE_SUFFIXES",
    "STAGING",
    "InstallError",
    "Limits",
    "Staged",
    "commit",
    "digest",
    "discard",
    "is_archive",
    "read_config",
    "remove_plugin",
    "stage",
    "validate_folder",
]

#: Hidden folder of the plugins directory where installs are prepared.
STAGING = ".xcore-staging"
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
IGNORED = ("__pycache__", ".DS_Store")


class InstallError(Exception):
    """The source cannot be installed; nothing was changed. The message names the culprit."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024
    max_files: int = 2000

    @classmethod
    def of(cls, settings: LoaderSettings) -> Limits:
        """The limits set in the loader's settings."""
        return cls(
            max_bytes=int(settings.max_archive_mb * 1024 * 1024), max_files=settings.max_files
        )


@dataclass
class Staged:
    """A validated copy of a plugin, ready to be renamed into the plugins directory."""

    name: str
    folder: Path
    manifest: Manifest
    digest: str
    work: Path


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def digest(folder: Path) -> str:
    """A sha256 over the plugin's files (relative paths and contents, sorted)."""
    h = hashlib.sha256()
    for path in sorted(_files(folder)):
        rel = path.relative_to(folder).as_posix()
        h.update(rel.encode() + b"\0")
        try:
            h.update(path.read_bytes() if not path.is_symlink() else os.readlink(path).encode())
        except OSError:
            h.update(b"<unreadable>")
        h.update(b"\0")
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in IGNORED and not d.startswith(".")]
        for f in files:
            if f.endswith((".pyc", ".pyo")) or f in IGNORED:
                continue
            out.append(Path(root) / f)
    return out


def read_config(folder: Path, plugin: str) -> dict[str, Any]:
    """The mapping in ``config.yaml`` (empty when the file is absent or empty)."""
    path = folder / "config.yaml"
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(plugin, "config.yaml", f"{where}not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(plugin, "config.yaml", f"cannot be read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManifestError(plugin, "config.yaml", "must hold a mapping of keys at top level")
    return data


def validate_folder(
    folder: Path, name: str | None = None, limits: Limits | None = None
) -> Manifest:
    """Everything that can be checked without running the plugin; raises ManifestError."""
    plugin = name or folder.name
    limits = limits or Limits()
    manifest = read_manifest(folder, plugin)
    total, count = 0, 0
    root = folder.resolve()
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            target = (path.parent / os.readlink(path)).resolve()
            if not target.is_relative_to(root):
                raise ManifestError(
                    plugin, rel, f"is a link pointing outside the plugin ({target})"
                )
            continue
        count += 1
        total += path.stat().st_size
        if path.suffix == ".py":
            try:
                compile(path.read_bytes(), rel, "exec", dont_inherit=True)
            except SyntaxError as exc:
                raise ManifestError(plugin, rel, f"line {exc.lineno}: {exc.msg}") from None
            except ValueError as exc:  # e.g. null bytes
                raise ManifestError(plugin, rel, f"cannot be compiled: {exc}") from None
    if total > limits.max_bytes:
        raise ManifestError(plugin, ".", f"{total} bytes exceed the limit of {limits.max_bytes}")
    if count > limits.max_files:
        raise ManifestError(plugin, ".", f"{count} files exceed the limit of {limits.max_files}")
    read_config(folder, plugin)
    return manifest


# -- staging ---------------------------------------------------------------------------


def stage(source: Path, plugins_dir: Path, limits: Limits, name: str | None = None) -> Staged:
    """Copy or extract ``source`` into the staging area and validate it there."""
    if not source.exists():
        raise InstallError(f"{source}: no such file or folder")
    work = plugins_dir / STAGING / uuid.uuid4().hex
    work.mkdir(parents=True)
    try:
        dest = work / "x"
        if source.is_dir():
            default = source.name
            _copy_folder(source, dest, limits)
            root = dest
        elif is_archive(source):
            default = _stem(source)
            _extract(source, dest, limits)
            root = _archive_root(dest)
            if root != dest:
                default = root.name
        else:
            raise InstallError(
                f"{source}: not a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        plugin = name or _declared_name(root) or default
        if not valid_name(plugin):
            raise InstallError(
                f"{source}: {plugin!r} is not a valid plugin name "
                "(a letter then letters, digits or '_'; set PLUGIN_INFO['name'])"
            )
        manifest = validate_folder(root, plugin, limits)
        return Staged(plugin, root, manifest, digest(root), work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        _drop_empty(work.parent)
        raise


def _declared_name(root: Path) -> str | None:
    try:
        info = read_plugin_info(root / "run.py", root.name)
    except ManifestError:
        return None
    value = info.get("name")
    return value if isinstance(value, str) else None


def _archive_root(dest: Path) -> Path:
    if (dest / "run.py").exists():
        return dest
    entries = [p for p in dest.iterdir() if p.name not in IGNORED]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


def _check_member(source: Path, name: str) -> PurePosixPath:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InstallError(f"{source}: member {name!r} has an absolute path")
    path = PurePosixPath(name.replace("\\", "/"))
    if ".." in path.parts:
        raise InstallError(f"{source}: member {name!r} contains '..'")
    return path


def _inside(source: Path, member: PurePosixPath, target: str) -> None:
    if target.startswith("/"):
        raise InstallError(f"{source}: link {str(member)!r} points to the absolute path {target!r}")
    depth = 0
    for part in (member.parent / target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise InstallError(f"{source}: link {str(member)!r} -> {target!r} points outside")


def _extract(source: Path, dest: Path, limits: Limits) -> None:
    dest.mkdir()
    if source.name.lower().endswith(".zip"):
        _extract_zip(source, dest, limits)
    else:
        _extract_tar(source, dest, limits)


def _extract_zip(source: Path, dest: Path, limits: Limits) -> None:
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InstallError(f"{source}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise InstallError(
                f"{source}: {len(infos)} members exceed the limit of {limits.max_files}"
            )
        total = 0
        links = []
        for info in infos:
            member = _check_member(source, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                target = zf.read(info).decode("utf-8", "replace")
                _inside(source, member, target)
                links.append((member, target))
            total += info.file_size
            if total > limits.max_bytes:
                raise InstallError(f"{source}: unpacks to more than {limits.max_bytes} bytes")
        for info in infos:
            member = PurePosixPath(info.filename.replace("\\", "/"))
            out = dest.joinpath(*member.parts)
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                written = 0
                while chunk := src.read(65536):
                    written += len(chunk)
                    if written > info.file_size:
                        raise InstallError(
                            f"{source}: member {info.filename!r} is larger than declared"
                        )
                    dst.write(chunk)
        for member, target in links:
            out = dest.joinpath(*member.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, out)


def _extract_tar(source: Path, dest: Path, limits: Limits) -> None:
    try:
        tf = tarfile.open(source, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as exc:
        raise InstallError(f"{source}: not a readable tar archive ({exc})") from None
    with tf:
        members = tf.getmembers()
        if len(members) > limits.max_files:
            raise InstallError(
                f"{source}: {len(members)} members exceed the limit of {limits.max_files}"
            )
        total = 0
        for m in members:
            member = _check_member(source, m.name)
            if m.issym():
                _inside(source, member, m.linkname)
            elif m.islnk():
                _check_member(source, m.linkname)
            elif not (m.isfile() or m.isdir()):
                raise InstallError(f"{source}: member {m.name!r} is not a file, folder or link")
            total += max(m.size, 0)
            if total > limits.max_bytes:
                raise InstallError(f"{source}: unpacks to more than {limits.max_bytes} bytes")
        try:
            tf.extractall(dest, filter="data")
        except tarfile.TarError as exc:
            raise InstallError(f"{source}: refused while extracting: {exc}") from None


def _copy_folder(source: Path, dest: Path, limits: Limits) -> None:
    total, count = 0, 0
    root = source.resolve()
    for path in _files(source):
        if path.is_symlink():
            target = (path.parent / os.readlink(path)).resolve()
            if not target.is_relative_to(root):
                raise InstallError(f"{path}: link pointing outside the plugin ({target})")
            continue
        count += 1
        total += path.stat().st_size
    if total > limits.max_bytes:
        raise InstallError(f"{source}: {total} bytes exceed the limit of {limits.max_bytes}")
    if count > limits.max_files:
        raise InstallError(f"{source}: {count} files exceed the limit of {limits.max_files}")
    shutil.copytree(
        source,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"),
    )


# -- committing ------------------------------------------------------------------------


def commit(staged: Staged, plugins_dir: Path, replace: bool) -> Path:
    """Move the staged plugin into place (replacing the old folder when ``replace``)."""
    target = plugins_dir / staged.name
    old: Path | None = None
    if target.exists() or target.is_symlink():
        if not replace:
            raise InstallError(
                f"plugin {staged.name!r} is already installed (use replace to overwrite it)"
            )
        old = staged.work / "previous"
        os.replace(target, old)
    try:
        os.replace(staged.folder, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    discard(staged)
    return target


def discard(staged: Staged) -> None:
    shutil.rmtree(staged.work, ignore_errors=True)
    _drop_empty(staged.work.parent)


def remove_plugin(folder: Path) -> None:
    """Delete an installed plugin folder (renamed away first, so it vanishes at once)."""
    trash = folder.parent / STAGING / f"removed-{folder.name}-{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    _drop_empty(trash.parent)


def _drop_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()
