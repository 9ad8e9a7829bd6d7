"""The reaper: what sandbox workers started dies with the kernel, even a killed kernel.

Guarantee: at the ``rlimits`` level, when the kernel process ends in any way (a stop,
a crash, SIGKILL), every process its workers started is killed within moments: a child
in a worker's process group, and a daemon that double-forked into a session of its own
while the worker ran in a pids cgroup. A worker itself dies with the kernel
(``PR_SET_PDEATHSIG``), but that signal is not inherited by the processes it forks,
which would otherwise be left running, orphaned. (Under bubblewrap the worker's pid
namespace ends with it, which kills everything inside.)

Mechanism: the sandbox service starts one small process (``python -m
services.sandbox.reaper <cgroup folder>``) in a session of its own, whose stdin is a
pipe from the kernel: the kernel writes ``+<pid>`` when a worker starts and ``-<pid>``
once it has been reaped and its process group killed. The reaper only reads; when the
pipe ends (the kernel closed it, or died), it kills the process group of every worker
still listed and every process left in the kernel's worker cgroups, removes those
cgroups, and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

__all__ = ["Reaper"]

log = logging.getLogger("xcore.sandbox")


class Reaper:
    """The kernel's side: a pipe to the reaper process."""

    def __init__(self, cgroups: Path | None) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups = cgroups

    def start(self) -> None:
        """Start the reaper (logged, not raised, when it cannot start)."""
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-B",
                    "-m",
                    "services.sandbox.reaper",
                    str(self._cgroups or ""),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                cwd="/",
            )
        except OSError as exc:
            log.error(
                "sandbox: the reaper could not start (%s): processes a worker "
                "starts may outlive a killed kernel",
                exc,
            )

    def _say(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            log.error("sandbox: the reaper is gone (%s)", exc)
            self._proc = None

    def watch(self, pid: int) -> None:
        """A worker started (its process group is ``pid``)."""
        self._say(f"+{pid}")

    def forget(self, pid: int) -> None:
        """A worker was reaped and its process group killed."""
        self._say(f"-{pid}")

    def close(self) -> None:
        """The kernel stops: the reaper cleans what is left and exits."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_cgroups(folder: Path) -> None:
    for _ in range(50):
        left = False
        with suppress(OSError):
            for leaf in folder.iterdir():
                if not leaf.is_dir():
                    continue
                with suppress(OSError, ValueError):
                    for pid in (leaf / "cgroup.procs").read_text().split():
                        left = True
                        with suppress(OSError):
                            os.kill(int(pid), signal.SIGKILL)
                with suppress(OSError):
                    leaf.rmdir()
        if not left:
            break
        time.sleep(0.02)  # killed processes leave their cgroup once reaped
    with suppress(OSError):
        folder.rmdir()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cgroups = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        with suppress(ValueError):
            pid = int(line[1:])
            if line[:1] == b"+":
                groups.add(pid)
            elif line[:1] == b"-":
                groups.discard(pid)
    for pid in groups:
        with suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    if cgroups is not None:
        _kill_cgroups(cgroups)


if __name__ == "__main__":
    main()
