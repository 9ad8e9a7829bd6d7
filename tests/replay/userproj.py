"""A user's own projection, given to replay by import path in the tests."""

from __future__ import annotations

from kernel import Projection, Recorded, handles


class FailureCounter(Projection):
    name = "test.failures"

    def reset(self) -> None:
        self.failures: dict[str, int] = {}

    @handles("TaskFailed")
    def _failed(self, r: Recorded) -> None:
        self.failures[r.data["task"]] = self.failures.get(r.data["task"], 0) + 1


class Exploding(Projection):
    """Raises on its fourth TaskFailed: a projection bug replay must report, not crash on."""

    name = "test.exploding"

    def reset(self) -> None:
        self.seen = 0

    @handles("TaskFailed")
    def _failed(self, r: Recorded) -> None:
        self.seen += 1
        if self.seen == 4:
            raise RuntimeError("projection bug")
