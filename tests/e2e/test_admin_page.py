"""The admin page in a real Chromium against a real ``xcore serve`` (issue 15).

One server with the example plugins and a plugin whose import fails with markup in its
error; one browser. Each step writes a screenshot under ``test-output/admin-page/``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.browser import browser, output_dir
from tests.e2e.server import Server, serve

TOKEN = "page-test-admin-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]
#: Markup in an error message: shown as text, never run.
HOSTILE = '<img src=x onerror="window.__xss=1"><b id="injected">bold</b>'
WAIT_MS = 20_000  # generous: CI machines are shared


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("page")
    plugins = tmp / "plugins"
    for name in ("hello", "greeter", "shouter", "jobs"):
        shutil.copytree(ROOT / "plugins" / name, plugins / name)
    bad = plugins / "broken"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    (bad / "run.py").write_text(
        f'PLUGIN_INFO = {{"version": "1.0.0", "api_prefix": "/app/broken"}}\n'
        f"raise RuntimeError({HOSTILE!r})\n"
    )
    with serve(
        tmp, plugins_dir=plugins, env={"XCORE_ADMIN_TOKEN": TOKEN}, args=("--no-reload",)
    ) as s:
        yield s


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as b:
        yield b


@pytest.fixture
def page(server: Server, chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.goto(f"{server.url}/admin/ui/")
    yield page
    context.close()
    assert errors == [], errors


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(output_dir("admin-page") / f"{name}.png"), full_page=True)


def log_in(page: Any, token: str = TOKEN) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Log in").click()


def generation(page: Any, plugin: str) -> str:
    cell = page.locator(f'tr[data-plugin="{plugin}"] td[data-field="generation"]')
    return str(cell.inner_text(timeout=WAIT_MS))


def test_log_in_see_plugins_and_reload_one(page: Any, server: Server) -> None:
    shot(page, "01-login")
    log_in(page, "a-wrong-token-of-enough-length")
    page.get_by_text("this token was refused").wait_for(timeout=WAIT_MS)
    log_in(page)
    page.get_by_role("heading", name="Plugins").wait_for(timeout=WAIT_MS)
    for name in ("hello", "greeter", "shouter", "jobs", "broken"):
        page.locator(f'tr[data-plugin="{name}"]').wait_for(timeout=WAIT_MS)
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["xcore_ui_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert TOKEN not in session["value"]
    assert page.evaluate("document.cookie") == ""  # scripts cannot read the session
    shot(page, "02-plugins")

    before = int(generation(page, "hello"))
    page.locator("#plugin-hello").click()
    page.get_by_role("heading", name="Plugin hello").wait_for(timeout=WAIT_MS)
    page.locator("#action-reload").click()
    page.wait_for_function(
        "([g]) => Number(document.querySelector("
        '\'tr[data-plugin="hello"] td[data-field="generation"]\')?.textContent) > g',
        arg=[before],
        timeout=WAIT_MS,
    )
    assert int(generation(page, "hello")) == before + 1
    shot(page, "03-plugin-reloaded")


def test_an_error_with_markup_is_shown_as_text(page: Any) -> None:
    log_in(page)
    page.locator("#plugin-broken").click()
    error = page.locator("#plugin-last-error")
    error.wait_for(timeout=WAIT_MS)
    assert HOSTILE in error.inner_text()
    assert page.locator("#injected").count() == 0
    assert page.evaluate("window.__xss") is None
    shot(page, "04-plugin-error")


def test_pause_and_resume_a_task(page: Any) -> None:
    log_in(page)
    page.get_by_role("link", name="Tasks").click()
    page.locator("#task-jobs\\.heartbeat").click()
    state = page.locator('tr[data-task="jobs.heartbeat"] td[data-field="paused"]')
    page.locator("#action-pause").click()
    page.wait_for_function(
        '() => document.querySelector(\'tr[data-task="jobs.heartbeat"] '
        "td[data-field=\"paused\"]')?.textContent === 'paused'",
        timeout=WAIT_MS,
    )
    shot(page, "05-task-paused")
    page.locator("#action-resume").click()
    page.wait_for_function(
        '() => document.querySelector(\'tr[data-task="jobs.heartbeat"] '
        "td[data-field=\"paused\"]')?.textContent === 'active'",
        timeout=WAIT_MS,
    )
    assert state.inner_text() == "active"
    shot(page, "06-task-resumed")


def test_a_new_event_arrives_in_the_live_table(page: Any, server: Server) -> None:
    log_in(page)
    page.get_by_role("link", name="Events").click()
    page.locator("#events-body tr").first.wait_for(timeout=WAIT_MS)
    newest = int(page.locator("#events-body tr").first.get_attribute("data-position"))
    start = time.monotonic()
    r = httpx.post(
        f"{server.url}/admin/plugins/greeter/reload",
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    page.wait_for_function(
        "([p]) => Number(document.querySelector('#events-body tr')?.dataset.position) > p",
        arg=[newest],
        timeout=WAIT_MS,
    )
    shown_after = time.monotonic() - start
    print(f"new event shown {shown_after * 1000:.0f} ms after the request was sent")
    shot(page, "07-events")
    # a click shows what caused the event
    page.locator("#events-body tr button").first.click()
    page.get_by_role("heading", name="Caused by").wait_for(timeout=WAIT_MS)
    shot(page, "08-event-causes")


def test_every_section_renders(page: Any) -> None:
    log_in(page)
    for number, name in enumerate(("Logs", "Alerts", "Health", "Nodes"), start=9):
        page.get_by_role("link", name=name).click()
        page.get_by_role("heading", name=name, exact=True).wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(300)
        shot(page, f"{number:02d}-{name.lower()}")
    page.get_by_role("link", name="Health").click()
    page.locator("#health-status").wait_for(timeout=WAIT_MS)


def test_csrf_and_cross_site_requests_are_refused(page: Any, server: Server) -> None:
    log_in(page)
    page.get_by_role("heading", name="Plugins").wait_for(timeout=WAIT_MS)
    status = page.evaluate(
        "async () => (await fetch('api/plugins/hello/reload', {method: 'POST'})).status"
    )
    assert status == 403


def test_keyboard_reaches_the_main_actions_and_inputs_are_labelled(page: Any) -> None:
    log_in(page)
    page.locator('tr[data-plugin="hello"]').wait_for(timeout=WAIT_MS)
    before = int(generation(page, "hello"))
    page.locator("#plugin-hello").focus()
    page.keyboard.press("Enter")
    page.locator("#action-reload").wait_for(timeout=WAIT_MS)
    # Tab from the plugin's name reaches the reload button without a mouse
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement?.id") == "action-reload":
            break
    assert page.evaluate("document.activeElement?.id") == "action-reload"
    page.keyboard.press("Enter")
    page.wait_for_function(
        "([g]) => Number(document.querySelector("
        '\'tr[data-plugin="hello"] td[data-field="generation"]\')?.textContent) > g',
        arg=[before],
        timeout=WAIT_MS,
    )
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter((e) => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map((e) => e.outerHTML)"""
    )
    assert unlabelled == []
    nameless = page.evaluate(
        """() => [...document.querySelectorAll('button, a[href]')]
            .filter((e) => !(e.textContent.trim() || e.getAttribute('aria-label')))
            .map((e) => e.outerHTML)"""
    )
    assert nameless == []
    assert page.evaluate("document.documentElement.lang") == "en"


def test_swagger_ui_and_redoc_load_nothing_from_outside(chromium: Any, server: Server) -> None:
    context = chromium.new_context()
    page = context.new_page()
    outside: list[str] = []
    # a request that left the machine (one the page's policy blocks never finishes)
    page.on(
        "requestfinished",
        lambda request: (
            outside.append(request.url)
            if not request.url.startswith((server.url, "data:", f"blob:{server.url}"))
            else None
        ),
    )
    try:
        page.goto(f"{server.url}/docs")
        page.locator(".swagger-ui .info").wait_for(timeout=WAIT_MS)
        page.get_by_text("/app/hello/status").first.wait_for(timeout=WAIT_MS)
        shot(page, "13-swagger")
        assert (
            "default-src 'self'"
            in httpx.get(f"{server.url}/docs").headers["content-security-policy"]
        )
        page.goto(f"{server.url}/redoc")
        page.locator("redoc, [role=main], .api-content").first.wait_for(timeout=WAIT_MS)
        shot(page, "14-redoc")
    finally:
        context.close()
    assert outside == []


def test_a_read_only_token_sees_no_actions_and_is_refused_anyway(
    chromium: Any, server: Server
) -> None:
    created = httpx.post(
        f"{server.url}/admin/tokens",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"name": "viewer", "scopes": ["admin:read"]},
        timeout=30,
    )
    assert created.status_code in (200, 201), created.text
    viewer = created.json()["token"]
    context = chromium.new_context()
    page = context.new_page()
    try:
        page.goto(f"{server.url}/admin/ui/")
        log_in(page, viewer)
        page.get_by_text("read only").wait_for(timeout=WAIT_MS)
        page.locator("#plugin-hello").click()
        page.get_by_role("heading", name="Plugin hello").wait_for(timeout=WAIT_MS)
        for action in ("#action-reload", "#action-disable", "#action-uninstall", "#install-form"):
            assert page.locator(action).count() == 0, action
        page.get_by_role("link", name="Tasks").click()
        page.locator("#task-jobs\\.heartbeat").click()
        page.get_by_role("heading", name="Task jobs.heartbeat").wait_for(timeout=WAIT_MS)
        assert page.locator("#action-pause").count() == 0
        shot(page, "15-read-only")
        # the server refuses the action even when the page is bypassed
        status = page.evaluate(
            """async () => {
                const s = await (await fetch('session')).json();
                const r = await fetch('api/plugins/hello/reload',
                    {method: 'POST', headers: {'x-csrf-token': s.csrf}});
                return r.status;
            }"""
        )
        assert status == 403
    finally:
        context.close()
    # and the API itself refuses the token a write (403 naming the scope)
    direct = httpx.post(
        f"{server.url}/admin/plugins/hello/reload",
        headers={"authorization": f"Bearer {viewer}"},
        timeout=30,
    )
    assert direct.status_code == 403 and "admin:write" in direct.text
