"""Wrong-token refusals are logged as a count per interval, never a line each.

The first refusal of an interval is logged at once, with its method, path and client;
the ones after it in the same interval are only counted, per client, and one summary
line gives the count when the interval ends (at the next refusal after it, at the
periodic flush the admin service runs, or when the service stops). A flood of bad
tokens therefore costs one log line per interval, and none of it is lost from view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["RefusalLog"]

#: Distinct clients named in one summary line (the rest are counted as "others").
MAX_CLIENTS = 20


class RefusalLog:
    """Counts refused admin requests and logs them at most once per ``interval``."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger
        self.interval = interval
        self.clock = clock
        #: Every refusal ever counted (for tests and metrics).
        self.total = 0
        self._window: float | None = None
        self._suppressed = 0
        self._clients: Counter[str] = Counter()

    def refused(self, method: str, path: str, client: str, reason: str) -> None:
        self.total += 1
        now = self.clock()
        if self._window is not None and now - self._window < self.interval:
            self._suppressed += 1
            if client in self._clients or len(self._clients) < MAX_CLIENTS:
                self._clients[client] += 1
            else:
                self._clients["others"] += 1
            return
        self.flush()
        self._window = now
        self.log.warning(
            "refused an admin request (%s): %s %s from %s; more in the next %gs are counted",
            reason,
            method,
            path,
            client,
            self.interval,
        )

    def flush(self) -> None:
        """Log the count of refusals not logged yet, if any."""
        if self._suppressed:
            clients = ", ".join(f"{c} x{n}" for c, n in self._clients.most_common())
            self.log.warning(
                "refused %d more admin request(s) with a wrong token in %gs (from %s)",
                self._suppressed,
                self.interval,
                clients,
            )
        self._suppressed = 0
        self._clients.clear()

    async def run(self) -> None:
        """Flush once per interval, so a summary never waits for the next refusal."""
        while True:
            await asyncio.sleep(self.interval)
            if self._window is not None and self.clock() - self._window >= self.interval:
                self.flush()
                self._window = None
