"""How a worker is started: the command, its environment, and the isolation level.

Two levels, chosen by ``services.sandbox.level`` (``auto`` picks the strongest that works):

- ``rlimits``: the worker is a plain child process in a new session, with an
  allowlisted environment, its working directory in the plugin's folder, and the limits
  it sets on itself; when the kernel runs as root the worker gives up root for an
  unprivileged user (``nobody``), so root-only files (the admin token's hash) and the
  kernel's ``/proc/<pid>/environ`` are out of its reach.
- ``bwrap``: the same, inside bubblewrap: new user, pid, ipc, uts, cgroup and network
  namespaces (no network unless the manifest asks and the operator allows), the whole
  file system read-only, the kernel's data folder and settings file hidden, a private
  ``/tmp``, and only the plugin's own data folder writable. The worker dies with the
  supervisor (``--die-with-parent``).

``auto`` probes bubblewrap once per process (a no-op sandbox); the level in force is
recorded in ``SandboxStarted`` and shown by the admin API.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENV_ALLOWLIST",
    "Launch",
    "confining_user",
    "detect_level",
    "environment",
    "launch",
    "worker_user",
]

#: Environment variables a worker inherits (plus ``services.sandbox.env_allow``).
log = logging.getLogger("xcore.sandbox")

ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")


@functools.cache
def bwrap_works() -> str | None:
    """None when bubblewrap can build a sandbox here, else why not."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        proc = subprocess.run(
            [
                exe,
                "--unshare-all",
                "--die-with-parent",
                "--ro-bind",
                "/",
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "true",
            ],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap failed to run: {exc}"
    if proc.returncode != 0:
        return (
            f"bwrap cannot create namespaces here: {proc.stderr.decode(errors='replace').strip()}"
        )
    return None


def detect_level(setting: str) -> str:
    """The level to use for ``setting`` (``auto`` | ``bwrap`` | ``rlimits``)."""
    if setting == "rlimits":
        return "rlimits"
    problem = bwrap_works()
    if setting == "bwrap" and problem is not None:
        raise RuntimeError(f"services.sandbox.level is 'bwrap' but {problem}")
    return "bwrap" if problem is None else "rlimits"


def worker_user(setting: str, level: str) -> tuple[int, int] | None:
    """(uid, gid) workers switch to, or None to keep the kernel's user.

    Only a root kernel switches. At the ``rlimits`` level the worker must still reach the
    interpreter and the project as that user; when it cannot (a Python installed under
    ``/root``), the worker keeps root's file access only (:func:`confining_user`) and a
    warning says what that costs.
    """
    if os.getuid() != 0 or setting == "":
        return None
    name = "nobody" if setting == "auto" else setting
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"services.sandbox.user: no user named {name!r}") from None
    if level == "rlimits":
        blocked = [p for p in needed_paths() if not _world_reachable(p)]
        if blocked:
            log.warning(
                "sandbox workers keep root's file access at the rlimits level: %s is not "
                "reachable by user %r (root-only files stay readable by plugins); install "
                "bubblewrap or move Python out of a private folder",
                blocked[0],
                name,
            )
            return None
    return entry.pw_uid, entry.pw_gid


def confining_user(
    setting: str, level: str, user: tuple[int, int] | None
) -> tuple[int, int] | None:
    """(uid, gid) a worker that keeps root's file access runs as for everything else
    (signals, process counts), or None: a root kernel at the ``rlimits`` level whose
    workers could not switch (``user`` is what :func:`worker_user` gave)."""
    if os.getuid() != 0 or setting == "" or user is not None or level != "rlimits":
        return None
    entry = pwd.getpwnam("nobody" if setting == "auto" else setting)
    return entry.pw_uid, entry.pw_gid


def needed_paths() -> list[Path]:
    """What a worker must read: the interpreter's installation, the venv, this project."""
    project = Path(__file__).resolve().parents[2]
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), project}
    return sorted(paths)


def _world_reachable(path: Path) -> bool:
    """Whether every folder down to ``path`` lets others in (and ``path`` lets them read)."""
    try:
        for parent in [*reversed(path.parents), path]:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                return False
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def environment(data_dir: Path, extra: list[str]) -> dict[str, str]:
    """The worker's whole environment: the allowlist, never the kernel's secrets."""
    env = {k: os.environ[k] for k in (*ENV_ALLOWLIST, *extra) if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = str(data_dir)
    env["TMPDIR"] = "/tmp"
    # glibc reserves address space per thread arena; keep RLIMIT_AS about real use
    env["MALLOC_ARENA_MAX"] = "2"
    return env


#: Size of a tmpfs that hides a folder (it holds only the folders bound back into it).
HIDING_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Launch:
    """A worker's command line and where it runs."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    level: str


def launch(
    *,
    level: str,
    folder: Path,
    data_dir: Path,
    kernel_data_dir: Path,
    network: bool,
    env: dict[str, str],
    hidden: tuple[Path, ...] = (),
    tmp_size: int = 256 * 1024 * 1024,
    plugins_dir: Path | None = None,
) -> Launch:
    """The command that starts a worker for the plugin in ``folder``.

    Under bubblewrap the other plugins' folders (``plugins_dir``: their code and their
    ``config.yaml``, which may hold secrets) are hidden; the plugin's own is bound back.

    Every tmpfs is sized (a tmpfs is memory, half the machine's by default): the private
    ``/tmp`` holds at most ``tmp_size`` bytes, those that hide folders almost nothing.
    """
    python = [sys.executable, "-I", "-B", "-m", "services.sandbox.worker"]
    if level == "rlimits":
        return Launch(python, folder, env, level)
    exe = shutil.which("bwrap") or "bwrap"
    argv = [exe, "--die-with-parent"]
    if os.getuid() == 0:
        # a root kernel needs no user namespace (and one would map only root, so the
        # worker could not switch to an unprivileged user)
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not network:
            argv.append("--unshare-net")
    else:
        argv.append("--unshare-all")
        if network:
            argv.append("--share-net")
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    argv += ["--perms", "1777", "--size", str(tmp_size), "--tmpfs", "/tmp"]
    homes = {Path("/root")}
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]).resolve())
    homes = {h for h in homes if h.is_dir() and h != Path("/")}
    for home in sorted(homes):
        argv += ["--size", str(HIDING_SIZE), "--tmpfs", str(home)]
    covers = [*homes, Path("/tmp")]
    if plugins_dir is not None:
        plugins = plugins_dir.resolve()
        if (
            plugins.is_dir()
            and plugins != Path("/")
            and not any(plugins.is_relative_to(c) for c in covers)
        ):
            argv += ["--size", str(HIDING_SIZE), "--tmpfs", str(plugins)]
            covers.append(plugins)
    # put back what the worker needs from a hidden folder (the interpreter, the project)
    for path in needed_paths():
        argv += _rebind(path, covers, "--ro-bind")
    where = folder.resolve()
    argv += _rebind(where, covers, "--ro-bind") or ["--ro-bind", str(where), str(where)]
    # hide what the kernel keeps for itself, then give the plugin its own data folder back
    for path in (kernel_data_dir, *hidden):
        path = path.resolve()
        if path.is_file():
            argv += ["--ro-bind", "/dev/null", str(path)]
        elif path.is_dir():
            argv += ["--size", str(HIDING_SIZE), "--tmpfs", str(path)]
    data = data_dir.resolve()
    hidden_dirs = [p.resolve() for p in (kernel_data_dir, *hidden, *covers) if p.is_dir()]
    argv += _rebind(data, hidden_dirs, "--bind") or ["--bind", str(data), str(data)]
    argv += ["--chdir", str(where), "--"]
    return Launch(argv + python, folder, env, level)


def _rebind(path: Path, covers: list[Path], how: str) -> list[str]:
    """Bind ``path`` back into a folder hidden by a tmpfs (``covers``), creating the
    folders between them world-traversable (bubblewrap would make them private)."""
    for cover in covers:
        if path != cover and path.is_relative_to(cover):
            args: list[str] = []
            for parent in reversed(path.parents):
                if parent != cover and parent.is_relative_to(cover):
                    args += ["--perms", "0755", "--dir", str(parent)]
            return [*args, how, str(path), str(path)]
    return []
