"""A progress bar on stderr for work that takes more than a second.

Guarantee: a long replay never looks frozen on a terminal, and nothing is drawn when
stdout is not a terminal (a pipe, a file, a script reading JSON lines), so output stays
clean. The bar appears only once the work has run for ``delay`` seconds (1 s by default;
``XCORE_REPLAY_PROGRESS_DELAY`` overrides it), redraws at most ten times a second, and
erases itself when done.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

__all__ = ["Progress"]


def _delay() -> float:
    try:
        return float(os.environ.get("XCORE_REPLAY_PROGRESS_DELAY", "1"))
    except ValueError:
        return 1.0


class Progress:
    """``update(done)`` as work advances towards ``total``; ``close()`` at the end."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        start: int = 0,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.start = start
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = sys.stdout.isatty() and self.stream.isatty()
        self.enabled = enabled
        self._t0 = time.monotonic()
        self._delay = _delay()
        self._next_draw = self._t0 + self._delay
        self._drawn = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next_draw:
            return
        self._next_draw = now + 0.1
        span = max(self.total - self.start, 1)
        frac = min(max((done - self.start) / span, 0.0), 1.0)
        width = 30
        filled = int(frac * width)
        elapsed = now - self._t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (span - (done - self.start)) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {frac * 100:5.1f}% {done:,}/{self.total:,}"
            f" {rate:,.0f} ev/s eta {eta:4.0f}s"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
