"""A node that was down while the cluster's plugins changed serves, once back, the
cluster's plugins: a plugin replaced meanwhile in its new version, one uninstalled
meanwhile not at all (its folder, left on that node, is removed before its loader boots).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_cluster import AUTH, cluster_dsn, greeter_zip, start_node, wait_for

pytestmark = pytest.mark.postgres


def answer(url: str) -> object:
    r = httpx.get(f"{url}/app/greet/hi", timeout=10)
    return r.json() if r.status_code == 200 else r.status_code


def install(url: str, data: bytes, replace: bool = False) -> None:
    r = httpx.post(
        f"{url}/admin/plugins",
        files={"file": ("greet.zip", data)},
        data={"replace": "true" if replace else "false"},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code in (200, 201), r.text


@pytest.mark.timeout(400)
def test_a_node_down_during_a_replace_and_an_uninstall_follows_the_cluster(
    tmp_path: Path,
) -> None:
    plugins_b = tmp_path / "plugins-b"
    with cluster_dsn() as dsn, ExitStack() as stack:
        a = stack.enter_context(start_node(tmp_path, "a", dsn, tmp_path / "plugins-a", 30))
        with start_node(tmp_path, "b", dsn, plugins_b, 30) as b:
            install(a.url, greeter_zip("one"))
            wait_for(lambda: answer(b.url) == {"text": "one"}, 60, "v1 on b")
        # b is down: the plugin is replaced through a
        install(a.url, greeter_zip("two"), replace=True)
        wait_for(lambda: answer(a.url) == {"text": "two"}, 60, "v2 on a")
        with start_node(tmp_path, "b", dsn, plugins_b, 30) as b:
            wait_for(lambda: answer(b.url) == {"text": "two"}, 60, "v2 on b once back")
        # b is down: the plugin is uninstalled through a
        r = httpx.delete(f"{a.url}/admin/plugins/greet", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert answer(a.url) == 404
        with start_node(tmp_path, "b", dsn, plugins_b, 30) as b:
            assert answer(b.url) == 404, "a plugin uninstalled while b was down came back on b"
            assert not (plugins_b / "greet").exists()
            listed = httpx.get(f"{b.url}/admin/plugins", headers=AUTH, timeout=10).json()
            assert "greet" not in str(listed)
