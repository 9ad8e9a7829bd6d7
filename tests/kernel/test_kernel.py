"""The Kernel: life cycle, services in order, requests answered by correlated outcomes."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from kernel import Event, Kernel, KernelStateError, Recorded, RequestTimeout, Settings, XcoreError


class PingRequested(Event):
    text: str


class Ponged(Event):
    text: str


class PingRefused(Event):
    reason: str


def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, node="node-a")


class Recorder:
    """A service that records its start and stop in a shared journal."""

    def __init__(self, name: str, journal: list[str], fail: bool = False) -> None:
        self.name = name
        self.journal = journal
        self.fail = fail

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.journal.append(f"start {self.name}")
        stack.push_async_callback(self._stop)

    async def _stop(self) -> None:
        self.journal.append(f"stop {self.name}")


class Ponger:
    """Answers PingRequested with Ponged, or PingRefused for an empty text."""

    name = "ponger"

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        async def handle(r: Recorded) -> None:
            if r.data["text"]:
                await kernel.append(Ponged(text=r.data["text"].upper()), stream="pong", cause=r)
            else:
                await kernel.append(PingRefused(reason="empty"), stream="pong", cause=r)

        await kernel.subscribe(handle, types=[PingRequested])


async def test_start_and_stop_are_recorded_with_node_and_boot(tmp_path: Path) -> None:
    kernel = Kernel(settings(tmp_path), services=[])
    async with kernel:
        assert kernel.started
    async with Kernel(settings(tmp_path), services=[]) as k2:
        events = await k2.read(stream="kernel")
    assert [r.type for r in events] == ["KernelStarted", "KernelStopped", "KernelStarted"]
    started, stopped, _ = events
    assert started.data["node"] == "node-a"
    assert started.data["boot"] == kernel.boot == stopped.data["boot"]
    assert started.meta.boot == kernel.boot
    assert started.meta.node == "node-a"


async def test_services_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    journal: list[str] = []
    services = [Recorder("a", journal), Recorder("b", journal), Recorder("c", journal)]
    async with Kernel(settings(tmp_path), services=services) as kernel:
        assert list(kernel.services) == ["a", "b", "c"]
    assert journal == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_failing_service_is_named_and_the_started_ones_are_stopped(tmp_path: Path) -> None:
    journal: list[str] = []
    kernel = Kernel(
        settings(tmp_path),
        services=[Recorder("a", journal), Recorder("broken", journal, fail=True)],
    )
    with pytest.raises(XcoreError, match="service 'broken' failed to start: boom"):
        await kernel.start()
    assert journal == ["start a", "stop a"]
    assert not kernel.started
    # the log was released: another kernel can open it
    async with Kernel(settings(tmp_path), services=[]):
        pass


async def test_using_a_stopped_kernel_is_a_clear_error(tmp_path: Path) -> None:
    kernel = Kernel(settings(tmp_path), services=[])
    with pytest.raises(KernelStateError, match="not started"):
        await kernel.append(Ponged(text="x"), stream="s")
    async with kernel:
        pass
    with pytest.raises(KernelStateError):
        await kernel.read()


async def test_request_returns_the_correlated_outcome(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[Ponger()]) as kernel:
        with anyio.fail_after(5):
            ok, refused = await asyncio.gather(
                kernel.request(
                    PingRequested(text="hi"),
                    stream="ping",
                    outcomes=[Ponged, PingRefused],
                    actor="ada",
                ),
                kernel.request(
                    PingRequested(text=""), stream="ping", outcomes=[Ponged, PingRefused]
                ),
            )
        assert ok.type == "Ponged"
        assert ok.data == {"text": "HI"}
        assert refused.type == "PingRefused"
        [req] = [r for r in await kernel.read(stream="ping") if r.data["text"] == "hi"]
        assert req.meta.actor == "ada"
        assert ok.meta.correlation_id == req.meta.id
        assert ok.meta.causation_id == req.meta.id


async def test_request_without_an_outcome_times_out_clearly(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        with pytest.raises(RequestTimeout, match="PingRequested on 'ping' was recorded"):
            await kernel.request(
                PingRequested(text="x"), stream="ping", outcomes=[Ponged], timeout=0.05
            )
        # the request itself is in the log: the audit trail keeps it
        assert [r.type for r in await kernel.read(stream="ping")] == ["PingRequested"]


async def test_requests_made_on_behalf_of_an_event_get_their_own_answers(tmp_path: Path) -> None:
    """Two requests caused by one event share its correlation; each gets its own outcome."""
    async with Kernel(settings(tmp_path), services=[Ponger()]) as kernel:
        [origin] = await kernel.append(Ponged(text="origin"), stream="o")
        with anyio.fail_after(5):
            a, b = await asyncio.gather(
                kernel.request(
                    PingRequested(text="a"), stream="ping", outcomes=[Ponged], cause=origin
                ),
                kernel.request(
                    PingRequested(text="b"), stream="ping", outcomes=[Ponged], cause=origin
                ),
            )
        assert (a.data["text"], b.data["text"]) == ("A", "B")
        requests = await kernel.read(stream="ping")
        assert {r.meta.correlation_id for r in requests} == {origin.meta.id}
        assert {r.meta.causation_id for r in requests} == {origin.meta.id}


async def test_a_lost_log_beside_plugin_state_is_refused_not_started_anew(tmp_path: Path) -> None:
    """With the admin token from the environment there is no token hash on disk: the
    plugins' own files are then what shows the folder was used."""
    from kernel.errors import StoreCorrupt

    (tmp_path / "plugins" / "hello").mkdir(parents=True)
    (tmp_path / "plugins" / "hello" / "state.json").write_text("{}")
    settings = Settings(data_dir=tmp_path, node="node-a", plugins_dir=tmp_path / "code")
    with pytest.raises(StoreCorrupt, match=r"plugins exist"):
        async with Kernel(settings):
            pass
    assert not (tmp_path / "events.db").exists()
    # a plugins folder that is the plugins' code (data_dir = the project folder) is no sign
    fresh = tmp_path / "project"
    (fresh / "plugins" / "hello").mkdir(parents=True)
    async with Kernel(Settings(data_dir=fresh, node="node-a", plugins_dir=fresh / "plugins")):
        pass
