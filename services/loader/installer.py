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
import logging
import os
import shutil
import stat
import struct
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from kernel import pacing

from .files import (
    MAX_DEPTH,
    FileRefused,
    kind,
    printable,
    read_limited,
    regular_files,
    too_deep,
)
from .manifest import Manifest, ManifestError, read_manifest, read_plugin_info, valid_name
from .source import SourceTooDeep, compile_source

if TYPE_CHECKING:
    from .settings import LoaderSettings

__all__ = [
    "ARCHIVE_SUFFIXES",
    "STAGING",
    "InstallError",
    "Limits",
    "Staged",
    "check_tree",
    "commit",
    "digest",
    "discard",
    "is_archive",
    "read_config",
    "remove_plugin",
    "remove_tree",
    "rollback",
    "stage",
    "validate_folder",
]

log = logging.getLogger("xcore.loader.installer")

#: Hidden folder of the plugins directory where installs are prepared.
STAGING = ".xcore-staging"
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
IGNORED = ("__pycache__", ".DS_Store")
#: Deepest nesting accepted in config.yaml (flow brackets or indentation levels).
MAX_CONFIG_DEPTH = 100
#: Largest config.yaml read (bytes).
CONFIG_LIMIT = 1024 * 1024
#: Most values (and characters of text) config.yaml may stand for, aliases expanded:
#: above what a file of CONFIG_LIMIT bytes can hold written out, so only aliases reach it.
MAX_CONFIG_VALUES = 1_000_000
MAX_CONFIG_CHARS = 16 * 1024 * 1024
#: Longest archive member name accepted (characters).
MAX_MEMBER_NAME = 1024
#: Largest file read to compute a digest (bytes); larger ones count by their prefix.
DIGEST_LIMIT = 64 * 1024 * 1024


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
    """A sha256 over the plugin's files (relative paths and contents, sorted).

    Only regular files are read (a FIFO or device counts by its name and kind), each
    up to the read limit; a link counts by its target.
    """
    h = hashlib.sha256()
    regular, others = regular_files(folder, IGNORED)
    entries = [(p, True) for p in regular] + [(p, False) for p in others]
    for path, is_file in sorted(entries, key=lambda e: os.fsencode(e[0])):
        h.update(os.fsencode(path.relative_to(folder)) + b"\0")
        try:
            if is_file:
                h.update(read_limited(path, DIGEST_LIMIT))
            elif path.is_symlink():
                h.update(b"link:" + os.fsencode(os.readlink(path)))
            else:
                h.update(b"special:" + str(stat.S_IFMT(os.lstat(path).st_mode)).encode())
        except (OSError, FileRefused) as exc:
            h.update(b"<unreadable>" + str(exc).encode("utf-8", "backslashreplace"))
        h.update(b"\0")
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    """The plugin's regular files (hidden entries, caches and special files left out)."""
    return regular_files(folder, IGNORED)[0]


def check_tree(folder: Path, limits: Limits, label: str) -> tuple[int, int]:
    """Refuse links, special files, undecodable names and too much; ``(files, bytes)``.

    Nothing is opened or followed. ``label`` names the tree in messages.
    """
    regular, others = regular_files(folder, IGNORED)
    for path in sorted(others):
        rel = printable(path.relative_to(folder).as_posix())
        if too_deep(folder, path):
            raise InstallError(
                f"{label}: '{rel[:120]}...' is nested more than {MAX_DEPTH} folders deep"
            )
        try:
            what = kind(os.lstat(path).st_mode)
        except OSError:
            what = "unreadable"
        raise InstallError(
            f"{label}: '{rel}' is {what}; plugins may hold only regular files and folders"
        )
    total = 0
    for path in regular:
        rel = path.relative_to(folder).as_posix()
        if printable(rel) != rel:
            raise InstallError(f"{label}: the name '{printable(rel)}' is not valid UTF-8")
        st = os.lstat(path)
        if st.st_nlink > 1:  # its content is another file's, maybe outside the plugin
            raise InstallError(
                f"{label}: '{rel}' is a hard link ({st.st_nlink} names for one file); "
                "plugins may hold only regular files and folders, links refused"
            )
        total += st.st_size
    if total > limits.max_bytes:
        raise InstallError(f"{label}: {total} bytes exceed the limit of {limits.max_bytes}")
    if len(regular) > limits.max_files:
        raise InstallError(f"{label}: {len(regular)} files exceed the limit of {limits.max_files}")
    return len(regular), total


def read_config(folder: Path, plugin: str) -> dict[str, Any]:
    """The mapping in ``config.yaml`` (empty when the file is absent or empty)."""
    path = folder / "config.yaml"
    try:
        raw = read_limited(path, CONFIG_LIMIT)
    except FileNotFoundError:
        return {}
    except FileRefused as exc:
        raise ManifestError(plugin, "config.yaml", str(exc)) from None
    except OSError as exc:
        raise ManifestError(plugin, "config.yaml", f"cannot be read: {exc}") from None
    try:
        text = raw.decode("utf-8")
        depth = _nesting(text)
        if depth > MAX_CONFIG_DEPTH:
            raise ManifestError(
                plugin,
                "config.yaml",
                f"nested {depth} levels deep, more than the limit of {MAX_CONFIG_DEPTH}",
            )
        data = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader (see _YAML_LOADER)
    except (RecursionError, MemoryError) as exc:
        raise ManifestError(
            plugin, "config.yaml", f"nested too deeply or too large ({type(exc).__name__})"
        ) from None
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
    values, chars, depth = _expanded_size(data)
    if depth > MAX_CONFIG_DEPTH:  # e.g. '- - - - x': nested without brackets or indents
        raise ManifestError(
            plugin,
            "config.yaml",
            f"nested more than {MAX_CONFIG_DEPTH} levels deep (the limit)",
        )
    if values > MAX_CONFIG_VALUES or chars > MAX_CONFIG_CHARS:
        raise ManifestError(
            plugin,
            "config.yaml",
            f"expands to more than {MAX_CONFIG_VALUES} values or {MAX_CONFIG_CHARS} characters "
            "(YAML anchors and aliases repeat what they name: '*a' ten times in each of "
            "nine levels is 10^9 values, from a few hundred bytes)",
        )
    return data


#: libyaml's safe loader where PyYAML has it: 5.6 times faster than the pure-Python one
#: (a 450 KB config.yaml took 7.4 s against 1.3 s on a loaded machine, past io_timeout
#: for a 1 MB file), and it refuses nesting past 1,000 levels itself.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _expanded_size(data: Any) -> tuple[int, int, int]:
    """``(values, characters, depth)`` of ``data``, every alias counted where it is used.

    Stops once past a limit: a YAML alias shares the object it names, so a small file
    can stand for billions of values that whatever walks or serializes it (a config
    model, the sandbox's wire) would expand.
    """
    values = chars = deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack and values <= MAX_CONFIG_VALUES and chars <= MAX_CONFIG_CHARS:
        value, depth = stack.pop()
        values += 1
        deepest = max(deepest, depth)
        if deepest > MAX_CONFIG_DEPTH:
            break
        if isinstance(value, (str, bytes)):
            chars += len(value)
        elif isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in value)
    return values, chars, deepest


def _nesting(text: str) -> int:
    """An upper bound of the YAML nesting depth: flow brackets and indentation levels.

    Checked before parsing, so a deeply nested file is refused at once instead of
    keeping the (pure-Python) parser busy for seconds before it fails.
    """
    deepest = depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    indents = {len(line) - len(line.lstrip(" ")) for line in text.splitlines() if line.strip()}
    return max(deepest, len(indents))


@pacing.leaving
def validate_folder(
    folder: Path, name: str | None = None, limits: Limits | None = None
) -> Manifest:
    """Everything that can be checked without running the plugin; raises ManifestError.
    (Run in a pooled executor thread by an install: pacing's hook is taken off it at the
    end, kernel/pacing.py ``leaving``.)"""
    plugin = name or folder.name
    limits = limits or Limits()
    manifest = read_manifest(folder, plugin)
    try:
        check_tree(folder, limits, "")
    except InstallError as exc:
        raise ManifestError(plugin, ".", str(exc).removeprefix(": ")) from None
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".py":
            try:
                compile_source(read_limited(path), rel)
            except SyntaxError as exc:
                raise ManifestError(plugin, rel, f"line {exc.lineno}: {exc.msg}") from None
            except SourceTooDeep as exc:
                raise ManifestError(plugin, rel, str(exc)) from None
            except (ValueError, FileRefused) as exc:  # e.g. null bytes
                raise ManifestError(plugin, rel, f"cannot be compiled: {exc}") from None
            except (MemoryError, RecursionError) as exc:
                raise ManifestError(
                    plugin, rel, f"too large or too deeply nested to compile ({type(exc).__name__})"
                ) from None
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
        remove_tree(work)
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


def _is_root(name: str) -> bool:
    """Whether a folder member names the archive's root (``.``, ``./``)."""
    return name.replace("\\", "/").strip("/") in (".", "")


def _check_member(source: Path, name: str) -> PurePosixPath:
    shown = printable(name)
    if len(name) > MAX_MEMBER_NAME:
        raise InstallError(
            f"{source}: member '{shown[:80]}...': a name of {len(name)} characters, more "
            f"than the limit of {MAX_MEMBER_NAME}"
        )
    if shown != name:
        raise InstallError(f"{source}: member '{shown}': the name is not valid UTF-8")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InstallError(f"{source}: member {name!r} has an absolute path")
    path = PurePosixPath(name.replace("\\", "/"))
    if ".." in path.parts:
        raise InstallError(f"{source}: member {name!r} contains '..'")
    if not path.parts or path.parts[0] in ("", "."):
        raise InstallError(f"{source}: member {name!r} has no usable path")
    if len(path.parts) > MAX_DEPTH:
        raise InstallError(
            f"{source}: member {name!r} is nested more than {MAX_DEPTH} folders deep"
        )
    return path


def _extract(source: Path, dest: Path, limits: Limits) -> None:
    dest.mkdir()
    if source.name.lower().endswith(".zip"):
        _extract_zip(source, dest, limits)
    else:
        _extract_tar(source, dest, limits)


def _undecodable(source: Path, exc: UnicodeDecodeError) -> InstallError:
    raw = exc.object if isinstance(exc.object, bytes) else b""
    shown = raw.decode("utf-8", "backslashreplace")
    return InstallError(f"{source}: member '{shown}': the name is not valid UTF-8")


def _zip_members_over(source: Path, limit: int) -> bool:
    """Whether the zip's central directory lists more than ``limit`` members.

    Counted header by header, stopping past the limit: ``zipfile.ZipFile`` parses the
    whole directory first (200,000 empty members: 3.4 s and 125 MB before any limit),
    and the count in the end record may lie. An archive this cannot walk is left to
    zipfile, which reports it.
    """
    with open(source, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        tail_at = max(0, size - (22 + 65535))
        f.seek(tail_at)
        tail = f.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) < end + 22:
            return False
        (cd_size,) = struct.unpack("<I", tail[end + 12 : end + 16])
        start = tail_at + end - cd_size
        if end >= 20 and tail[end - 20 : end - 16] == b"PK\x06\x07":  # zip64
            (z64_at,) = struct.unpack("<Q", tail[end - 12 : end - 4])
            f.seek(z64_at)
            z64 = f.read(56)
            if len(z64) < 56 or z64[:4] != b"PK\x06\x06":
                return False
            (cd_size,) = struct.unpack("<Q", z64[40:48])
            start = z64_at - cd_size
        if start < 0:
            return False
        at, count = start, 0
        while at < start + cd_size:
            f.seek(at)
            head = f.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                return False
            count += 1
            if count > limit:
                return True
            name, extra, comment = struct.unpack("<HHH", head[28:34])
            at += 46 + name + extra + comment
    return False


def _extract_zip(source: Path, dest: Path, limits: Limits) -> None:
    try:
        if _zip_members_over(source, limits.max_files):
            raise InstallError(f"{source}: more than {limits.max_files} members (the limit)")
    except OSError as exc:
        raise InstallError(f"{source}: not a readable zip archive ({exc})") from None
    try:
        zf = zipfile.ZipFile(source)
    except UnicodeDecodeError as exc:
        raise _undecodable(source, exc) from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InstallError(f"{source}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise InstallError(
                f"{source}: {len(infos)} members exceed the limit of {limits.max_files}"
            )
        infos = [i for i in infos if not (i.is_dir() and _is_root(i.filename))]
        total = 0
        for info in infos:
            _check_member(source, info.filename)
            kind_bits = stat.S_IFMT(info.external_attr >> 16)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise InstallError(
                    f"{source}: member {info.filename!r} is a symbolic link; links are refused"
                )
            if kind_bits not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise InstallError(f"{source}: member {info.filename!r} is not a file or a folder")
            total += info.file_size
            if total > limits.max_bytes:
                raise InstallError(f"{source}: unpacks to more than {limits.max_bytes} bytes")
        written_total = 0
        for info in infos:
            member = _check_member(source, info.filename)
            out = dest.joinpath(*member.parts)
            try:
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "xb") as dst:
                    written = 0
                    while chunk := src.read(65536):
                        written += len(chunk)
                        written_total += len(chunk)
                        if written > info.file_size or written_total > limits.max_bytes:
                            raise InstallError(
                                f"{source}: member {info.filename!r} is larger than declared"
                            )
                        dst.write(chunk)
            except InstallError:
                raise
            except Exception as exc:  # bad CRC, bad compression, encryption, clashes
                raise InstallError(
                    f"{source}: member {info.filename!r} cannot be extracted: "
                    f"{type(exc).__name__}: {exc}"
                ) from None


#: Largest extension header (GNU long name or link, pax record set) read from a tar.
TAR_HEADER_LIMIT = 64 * 1024
#: Most extension headers in a row before a member (pax + long name + long link: 3).
TAR_HEADER_CHAIN = 8
_EXTENSIONS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
    tarfile.SOLARIS_XHDTYPE: "Solaris pax",
}


class _TarRefused(tarfile.TarError):
    """A tar header refused before tarfile reads what it announces."""


class _CheckedTarInfo(tarfile.TarInfo):
    """Refuses, from its 512-byte header, what tarfile would read whole into memory.

    tarfile reads a GNU long name or a pax header completely (its declared size, up to
    gigabytes from a small compressed upload) and collects sparse maps before the
    caller sees a member; ``_proc_member`` is tarfile's documented hook for subclasses.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        chain = getattr(tarfile_, "_xcore_chain", 0)
        if self.type in _EXTENSIONS:
            if self.size > TAR_HEADER_LIMIT:
                raise _TarRefused(
                    f"a {_EXTENSIONS[self.type]} header of {self.size} bytes, more than the "
                    f"limit of {TAR_HEADER_LIMIT}"
                )
            chain += 1
            if chain > TAR_HEADER_CHAIN:
                raise _TarRefused(f"more than {TAR_HEADER_CHAIN} extension headers in a row")
        else:
            chain = 0
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _TarRefused(f"member {self.name!r} is a sparse file; plugins hold none")
        tarfile_._xcore_chain = chain  # type: ignore[attr-defined]
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member

    def _sparse(self, *args: object) -> None:
        # pax sparse files (GNU.sparse.*): format 1.0 reads its map from the data blocks
        raise _TarRefused(f"member {self.name!r} is a sparse file; plugins hold none")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse


def _extract_tar(source: Path, dest: Path, limits: Limits) -> None:
    """Read the tar member by member: every limit applies before the next member is read."""
    try:
        # closed by the `with` below
        tf = tarfile.open(source, "r:*", tarinfo=_CheckedTarInfo)  # noqa: SIM115
    except _TarRefused as exc:
        raise InstallError(f"{source}: {exc}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise InstallError(f"{source}: not a readable tar archive ({exc})") from None
    with tf:
        count, total, last = 0, 0, None
        while True:
            try:
                m = tf.next()
            except _TarRefused as exc:
                after = f" after member {last!r}" if last else ""
                raise InstallError(f"{source}{after}: {exc}") from None
            except Exception as exc:  # truncated, corrupt compression, bad header
                after = f" after member {last!r}" if last else ""
                raise InstallError(
                    f"{source}: unreadable{after}: {type(exc).__name__}: {exc}"
                ) from None
            if m is None:
                break
            count += 1
            if count > limits.max_files:
                raise InstallError(f"{source}: more than {limits.max_files} members (the limit)")
            if m.isdir() and _is_root(m.name):
                continue  # './' of `tar -C plugin -czf plugin.tgz .`: the archive's root
            member = _check_member(source, m.name)
            last = m.name
            if m.issym() or m.islnk():
                raise InstallError(f"{source}: member {m.name!r} is a link; links are refused")
            if not (m.isfile() or m.isdir()):
                raise InstallError(f"{source}: member {m.name!r} is not a file or a folder")
            total += max(m.size, 0)
            if total > limits.max_bytes:
                raise InstallError(f"{source}: unpacks to more than {limits.max_bytes} bytes")
            out = dest.joinpath(*member.parts)
            try:
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:
                    raise InstallError(f"{source}: member {m.name!r} has no content")
                with src, open(out, "xb") as dst:
                    written = 0
                    while chunk := src.read(65536):
                        written += len(chunk)
                        if written > m.size:
                            raise InstallError(
                                f"{source}: member {m.name!r} is larger than declared"
                            )
                        dst.write(chunk)
            except InstallError:
                raise
            except Exception as exc:
                raise InstallError(
                    f"{source}: member {m.name!r} cannot be extracted: {type(exc).__name__}: {exc}"
                ) from None
        tf.members.clear()  # type: ignore[attr-defined]


def _copy_folder(source: Path, dest: Path, limits: Limits) -> None:
    check_tree(source, limits, str(source))
    shutil.copytree(
        source,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"),
    )
    # the tree may have changed between the check and the copy: check the copy too
    check_tree(dest, limits, str(source))


# -- committing ------------------------------------------------------------------------
#
# An install is three steps, so that it either happens completely or not at all:
# stage (copy/extract + check, above), commit (swap the folders, keeping the old one
# aside), then, once the new version loaded, ``discard`` (drop the old one) — or
# ``rollback`` (put the old one back) when it did not.


def commit(staged: Staged, plugins_dir: Path, replace: bool) -> Path | None:
    """Move the staged plugin into place; the old folder (if any) is kept aside and returned."""
    target = plugins_dir / staged.name
    old: Path | None = None
    if target.exists() or target.is_symlink():
        if not replace:
            raise InstallError(
                f"plugin {staged.name!r} is already installed (use --replace, or replace=true, "
                "to overwrite it)"
            )
        old = staged.work / "previous"
        os.replace(target, old)
    try:
        os.replace(staged.folder, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    return old


def rollback(staged: Staged, plugins_dir: Path, old: Path | None) -> None:
    """Undo :func:`commit`: the new folder goes, the old one (if any) comes back."""
    target = plugins_dir / staged.name
    if target.exists() or target.is_symlink():
        os.replace(target, staged.work / "failed")
    if old is not None:
        os.replace(old, target)
    discard(staged)


def discard(staged: Staged) -> None:
    remove_tree(staged.work)
    _drop_empty(staged.work.parent)


def remove_plugin(folder: Path) -> None:
    """Delete an installed plugin folder (renamed away first, so it vanishes at once)."""
    trash = folder.parent / STAGING / f"removed-{folder.name}-{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, trash)
    remove_tree(trash)
    _drop_empty(trash.parent)


def remove_tree(path: Path) -> None:
    """Delete ``path`` and all under it, however deep; what cannot be deleted is logged.

    ``shutil.rmtree`` recurses once per folder level (up to Python 3.12), so a plugin
    holding a folder nested 1,100 levels deep made it raise RecursionError halfway;
    what it left is then deleted level by level, holding one descriptor at a time.
    """
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except (RecursionError, OSError):
        pass
    try:
        _remove_level_by_level(path)
    except OSError as exc:
        log.warning("could not delete %s: %s", printable(str(path)), exc)


def _remove_level_by_level(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    names: list[str] = []  # the folders between ``path`` and ``fd``
    try:
        while True:
            sub = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                inner = os.open(sub, flags, dir_fd=fd)
                os.close(fd)
                fd = inner
                names.append(sub)
            elif names:
                outer = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = outer
                os.rmdir(names.pop(), dir_fd=fd)
            else:
                break
    finally:
        os.close(fd)
    os.rmdir(path)


def _drop_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()
