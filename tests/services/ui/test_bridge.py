"""The admin page over a real ``xcore serve``: headers, login, cookie, CSRF, the API bridge."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import Server, serve

TOKEN = "ui-test-admin-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui")
    plugins = tmp / "plugins"
    shutil.copytree(ROOT / "plugins" / "hello", plugins / "hello")
    with serve(
        tmp,
        plugins_dir=plugins,
        env={
            "XCORE_ADMIN_TOKEN": TOKEN,
            "XCORE_SERVICES__UI__LOGIN_ATTEMPTS_PER_MINUTE": "3",
        },
        args=("--no-reload",),
    ) as s:
        yield s
    assert TOKEN not in s.output()


_open: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def client_for(server: Server, **kwargs: object) -> httpx.Client:
    client = httpx.Client(base_url=server.url + "/admin/ui/", timeout=30, **kwargs)  # type: ignore[arg-type]
    _open.append(client)
    return client


def login(server: Server) -> tuple[httpx.Client, dict[str, object]]:
    client = client_for(server)
    r = client.post("login", json={"token": TOKEN})
    assert r.status_code == 200, r.text
    return client, r.json()


def test_the_page_is_served_with_a_strict_policy(server: Server) -> None:
    r = httpx.get(server.url + "/admin/ui/", timeout=10)
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and " on" not in r.text.split("<body>")[1].split(">")[0]
    js = httpx.get(server.url + "/admin/ui/static/app.js", timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text
    # the bare mount path redirects to the page
    assert httpx.get(server.url + "/admin/ui", timeout=10).status_code in (307, 308)


@pytest.mark.parametrize(
    "path",
    ["static/../app.py", "static/%2e%2e/app.py", "static/sessions.py", "static/", "nothing"],
)
def test_only_shipped_assets_are_served(server: Server, path: str) -> None:
    r = httpx.get(f"{server.url}/admin/ui/{path}", timeout=10)
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert "import" not in r.text


def test_a_login_sets_an_httponly_strict_cookie_and_returns_no_token(server: Server) -> None:
    client, body = login(server)
    assert body["can_write"] is True and body["scopes"] == ["*"]  # the admin token: every scope
    assert TOKEN not in str(body)
    cookie = client.cookies.jar
    (c,) = [c for c in cookie if c.name == "xcore_ui_session"]
    assert c.path == "/admin/ui"
    assert c.value != TOKEN and TOKEN not in c.value
    assert c.has_nonstandard_attr("HttpOnly")
    raw = client.post("login", json={"token": TOKEN}).headers["set-cookie"].lower()
    assert "httponly" in raw and "samesite=strict" in raw and "max-age=" in raw


def test_refused_logins_change_nothing(server: Server) -> None:
    client = client_for(server)
    cases = [
        (
            {
                "content": b"token=x",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            415,
        ),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ({"json": {"token": ""}}, 422),
        ({"json": {"token": ["a"]}}, 422),
        ({"content": b"x" * 9000, "headers": {"content-type": "application/json"}}, 413),
        ({"json": {"token": TOKEN}, "headers": {"origin": "http://evil.example"}}, 403),
        ({"json": {"token": TOKEN}, "headers": {"sec-fetch-site": "cross-site"}}, 403),
    ]
    for kwargs, status in cases:
        r = client.post("login", **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status, (kwargs, r.status_code, r.text)
        assert "set-cookie" not in r.headers
    assert client.get("session").json() == {"logged_in": False}


def test_wrong_tokens_are_throttled_per_client(server: Server) -> None:
    # uvicorn takes the client address from X-Forwarded-For when the peer is a trusted
    # proxy (loopback by default): two addresses stand for two clients here.
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.7"})
    statuses = [client.post("login", json={"token": f"wrong-{i}"}).status_code for i in range(4)]
    assert statuses == [401, 401, 401, 429]
    r = client.post("login", json={"token": TOKEN})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    other = client_for(server, headers={"x-forwarded-for": "203.0.113.8"})
    assert other.post("login", json={"token": TOKEN}).status_code == 200


@pytest.mark.parametrize("path", ["/admin/uix", "/admin/ui-evil/kernel", "/admin/kernel"])
def test_only_the_page_itself_is_exempt_from_the_bearer_check(server: Server, path: str) -> None:
    r = httpx.get(server.url + path, timeout=10)
    assert r.status_code == 401, (path, r.status_code, r.text)


def test_the_bridge_needs_a_session_and_csrf_for_changes(server: Server) -> None:
    anonymous = client_for(server)
    assert anonymous.get("api/plugins").status_code == 401
    assert anonymous.post("api/plugins/hello/reload").status_code == 401
    # a bearer token alone is not a session: the page's bridge only takes its cookie
    r = anonymous.get("api/plugins", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401

    client, body = login(server)
    plugins = client.get("api/plugins").json()
    before = next(p for p in plugins if p["name"] == "hello")["generation"]

    assert client.post("api/plugins/hello/reload").status_code == 403
    assert (
        client.post("api/plugins/hello/reload", headers={"x-csrf-token": "forged"}).status_code
        == 403
    )
    csrf = str(body["csrf"])
    cross = client.post(
        "api/plugins/hello/reload", headers={"x-csrf-token": csrf, "sec-fetch-site": "cross-site"}
    )
    assert cross.status_code == 403
    same = client.get("api/plugins").json()
    assert next(p for p in same if p["name"] == "hello")["generation"] == before

    ok = client.post("api/plugins/hello/reload", headers={"x-csrf-token": csrf})
    assert ok.status_code == 200, ok.text
    after = client.get("api/plugins").json()
    assert next(p for p in after if p["name"] == "hello")["generation"] == before + 1


def test_logout_ends_the_session(server: Server) -> None:
    client, body = login(server)
    assert client.get("api/kernel").status_code == 200
    assert client.post("logout").status_code == 403  # no CSRF token
    assert client.post("logout", headers={"x-csrf-token": str(body["csrf"])}).status_code == 200
    assert client.get("api/kernel").status_code == 401
    assert client.get("session").json() == {"logged_in": False}


def test_an_event_shows_its_causes_and_effects(server: Server) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{server.url}/admin/plugins/hello/reload", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    events = httpx.get(
        f"{server.url}/admin/events",
        params={"stream": "plugin-hello", "limit": 5000},
        headers=headers,
        timeout=10,
    ).json()["events"]
    requested = [e for e in events if e["type"] == "PluginReloadRequested"][-1]
    reloaded = [
        e
        for e in events
        if e["type"] == "PluginReloaded" and e["meta"]["causation_id"] == requested["meta"]["id"]
    ][-1]
    related = httpx.get(
        f"{server.url}/admin/events/{reloaded['position']}/related", headers=headers, timeout=10
    ).json()
    assert [c["position"] for c in related["causes"]][-1] == requested["position"]
    back = httpx.get(
        f"{server.url}/admin/events/{requested['position']}/related", headers=headers, timeout=10
    ).json()
    assert reloaded["position"] in [e["position"] for e in back["effects"]]
    assert all(
        e["meta"]["correlation_id"] == requested["meta"]["correlation_id"]
        for e in back["correlated"]
    )
    missing = httpx.get(f"{server.url}/admin/events/999999/related", headers=headers, timeout=10)
    assert missing.status_code == 404
    assert httpx.get(f"{server.url}/admin/events/1/related", timeout=10).status_code == 401


def test_wrong_logins_sent_at_once_are_throttled_together(server: Server) -> None:
    # the limit is 3 a minute: twenty guesses sent at the same time must not all be tried
    def guess(i: int) -> int:
        with httpx.Client(
            base_url=server.url + "/admin/ui/",
            timeout=30,
            headers={"x-forwarded-for": "203.0.113.20"},
        ) as c:
            return c.post("login", json={"token": f"wrong-{i}"}).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(guess, range(20)))
    assert statuses.count(401) <= 3, statuses
    assert statuses.count(429) >= 17, statuses


def test_a_login_with_some_valid_token_does_not_reset_the_count_of_guesses(
    server: Server,
) -> None:
    reader = _api_token(server, ["admin:read"])
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.21"})
    assert client.post("login", json={"token": "wrong-1"}).status_code == 401
    assert client.post("login", json={"token": "wrong-2"}).status_code == 401
    assert client.post("login", json={"token": reader}).status_code == 200
    assert client.post("login", json={"token": "wrong-3"}).status_code == 401
    assert client.post("login", json={"token": "wrong-4"}).status_code == 429


def test_a_read_only_session_cannot_change_anything(server: Server) -> None:
    reader = _api_token(server, ["admin:read"])
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.22"})
    r = client.post("login", json={"token": reader})
    assert r.status_code == 200 and r.json()["can_write"] is False
    csrf = str(r.json()["csrf"])
    assert client.get("api/plugins").status_code == 200
    for method, path in [
        ("POST", "api/plugins/hello/reload"),
        ("POST", "api/tokens"),
        ("DELETE", "api/plugins/hello"),
    ]:
        r = client.request(method, path, headers={"x-csrf-token": csrf}, json={"name": "x"})
        assert r.status_code == 403, (method, path, r.status_code, r.text)


def test_a_revoked_token_ends_its_open_sessions(server: Server) -> None:
    token = _api_token(server, ["admin:read", "admin:write"])
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.23"})
    assert client.post("login", json={"token": token}).status_code == 200
    assert client.get("api/kernel").status_code == 200
    token_id = _ids[token]
    r = httpx.delete(
        f"{server.url}/admin/tokens/{token_id}",
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    r = client.get("api/kernel")
    assert r.status_code == 401
    assert "xcore_ui_session=" in r.headers.get("set-cookie", "")
    assert client.get("session").json() == {"logged_in": False}
    # a session whose token is revoked says so at once, before any call of the API
    token = _api_token(server, ["admin:read"])
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.25"})
    assert client.post("login", json={"token": token}).status_code == 200
    assert client.get("session").json()["logged_in"] is True
    r = httpx.delete(
        f"{server.url}/admin/tokens/{_ids[token]}",
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert client.get("session").json() == {"logged_in": False}


def test_the_bridge_does_not_reach_the_page_and_keeps_the_session(server: Server) -> None:
    client, _ = login(server)
    for path in ["api/ui/api/kernel", "api/ui/session", "api/ui"]:
        assert client.get(path).status_code == 404, path
    # an admin route that answers 401 for a reason of its own does not end a session
    # whose token is still good
    assert client.get("session").json()["logged_in"] is True
    assert client.get("api/kernel").status_code == 200


def test_a_new_login_ends_the_session_the_browser_had(server: Server) -> None:
    client, _ = login(server)
    old = client.cookies["xcore_ui_session"]
    assert client.post("login", json={"token": TOKEN}).status_code == 200
    assert client.cookies["xcore_ui_session"] != old
    stale = client_for(server, cookies={"xcore_ui_session": old})
    assert stale.get("session").json() == {"logged_in": False}


def test_an_archive_larger_than_the_default_body_limit_passes_the_bridge(server: Server) -> None:
    # the install route accepts archives up to the loader's limit (20 MB), not the
    # default 1 MB: the page's install form must get the same limit through the bridge
    client, body = login(server)
    archive = b"\0" * (2 * 1024 * 1024)
    r = client.post(
        "api/plugins",
        files={"file": ("big.tar.gz", archive, "application/gzip")},
        headers={"x-csrf-token": str(body["csrf"])},
    )
    assert r.status_code != 413, r.text
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


_ids: dict[str, str] = {}


def _api_token(server: Server, scopes: list[str]) -> str:
    name = f"ui-test-{len(_ids)}"
    r = httpx.post(
        server.url + "/admin/tokens",
        json={"name": name, "scopes": scopes},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    token = str(r.json()["token"])
    _ids[token] = str(r.json()["id"])
    return token


def test_a_stream_opened_by_a_session_ends_with_it(server: Server) -> None:
    client, body = login(server)
    ended = threading.Event()
    frames: list[bytes] = []

    def follow() -> None:
        try:
            with client.stream("GET", "api/events/stream", params={"after": 0}) as r:
                assert r.status_code == 200
                for chunk in r.iter_bytes():
                    frames.append(chunk)
        except httpx.HTTPError:
            pass
        ended.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not frames and time.monotonic() < deadline:
        time.sleep(0.05)
    assert frames, "the stream sent nothing"
    assert not ended.is_set()
    r = client.post("logout", headers={"x-csrf-token": str(body["csrf"])})
    assert r.status_code == 200
    assert ended.wait(30), "the stream outlived its session"


def test_a_csrf_header_with_non_ascii_bytes_is_refused_not_a_server_error(
    server: Server,
) -> None:
    client, _ = login(server)
    r = client.post("api/plugins/hello/reload", headers={"x-csrf-token": b"\xff\xfe"})
    assert r.status_code == 403, r.text
    r = client.post("logout", headers={"x-csrf-token": b"\xe9t\xe9"})
    assert r.status_code == 403, r.text


def test_the_login_media_type_is_matched_case_insensitively(server: Server) -> None:
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.24"})
    r = client.post(
        "login",
        content=b'{"token": "' + TOKEN.encode() + b'"}',
        headers={"content-type": "Application/JSON; charset=UTF-8"},
    )
    assert r.status_code == 200, r.text


def test_a_token_without_admin_read_is_refused_as_such_not_as_an_outage(server: Server) -> None:
    other = _api_token(server, ["hello:use"])
    client = client_for(server, headers={"x-forwarded-for": "203.0.113.26"})
    r = client.post("login", json={"token": other})
    assert r.status_code == 403, r.text
    assert "admin:read" in r.json()["detail"]
    assert "set-cookie" not in r.headers
