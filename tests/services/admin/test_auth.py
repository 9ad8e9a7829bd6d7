"""Every /admin route refuses a missing or wrong token, before reading any body.

Checked over a real ``xcore serve`` with real sockets: the routes are walked from the
OpenAPI document, uploads are sent by hand so the test controls how much of the body
ever leaves the client.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from pathlib import Path

import httpx
import pytest

from services.admin.refusals import RefusalLog
from tests.e2e.server import Server, serve

TOKEN = "admin-test-token-abcdefghijklmnop"


def test_every_admin_route_refuses_a_missing_or_wrong_token(tmp_path: Path) -> None:
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        routes = [
            (method.upper(), path)
            for path, item in spec["paths"].items()
            if path.startswith("/admin")
            for method in item
            if method in {"get", "post", "put", "patch", "delete"}
        ]
        assert len(routes) >= 3, routes
        for method, path in routes:
            url = server.url + re.sub(r"\{[^}]+\}", "x", path)
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
                r = httpx.request(method, url, headers=headers, timeout=10)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
        # and the right token gets through
        ok = httpx.get(
            f"{server.url}/admin/kernel", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert ok.status_code == 200
    assert TOKEN not in server.output()


# -- inputs bounded before they cost anything ------------------------------------------


def _raw_request(url: str, head: bytes, body: bytes, *, wait: float = 30.0) -> bytes:
    """Send ``head`` and part of a body, then read what the server answers (or b"")."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server may close while we send
            sock.sendall(body)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
                head, sep, rest = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: (\d+)", head)
                if sep and length and len(rest) >= int(length.group(1)):
                    break
        return answer


def _upload_head(length: int, token: str | None = None, chunked: bool = False) -> bytes:
    lines = [
        "POST /admin/plugins HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: multipart/form-data; boundary=xyz",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunked(body: bytes, size: int = 8192) -> bytes:
    """``body`` framed for ``Transfer-Encoding: chunked`` (with no final chunk: more to come)."""
    return b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )


def _uploads_left(server: Server, tmp: Path) -> list[str]:
    spooled = [p.name for p in tmp.iterdir()] if tmp.exists() else []
    uploads = server.data_dir / "uploads"
    left = [str(p) for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []
    return spooled + left


def test_an_unauthenticated_huge_upload_is_refused_after_its_headers(tmp_path: Path) -> None:
    spool = tmp_path / "spool"  # where the server's temporary files would go
    spool.mkdir()
    env = {"XCORE_ADMIN_TOKEN": TOKEN, "TMPDIR": str(spool)}
    with serve(tmp_path, env=env) as server:
        body = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.zip\r\n\r\n"
        body += b"\0" * (2 * 1024 * 1024)  # 2 MiB of the announced 300 MB: it never comes
        for token in (None, "wrong-token-0123456789"):
            answer = _raw_request(server.url, _upload_head(300 * 1024 * 1024, token), body)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
            answer = _raw_request(server.url, _upload_head(0, token, True), _chunked(body))
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert _uploads_left(server, spool) == []
        # the right token with a body over the route's limit: 413 before reading it
        answer = _raw_request(server.url, _upload_head(300 * 1024 * 1024, TOKEN), body)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"exceeds the limit" in answer
        assert _uploads_left(server, spool) == []
        # the server is fine and still answers
        assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200


def test_a_body_over_the_limit_is_refused_while_it_is_read(tmp_path: Path) -> None:
    env = {
        "XCORE_ADMIN_TOKEN": TOKEN,
        "XCORE_HTTP__MAX_BODY_BYTES": "1000",
        "XCORE_SERVICES__LOADER__MAX_ARCHIVE_MB": "0.05",  # the upload route: 0.05 MiB + framing
    }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(tmp_path, env=env) as server:
        # any route, declared length: refused at once, whatever the route
        r = httpx.post(f"{server.url}/admin/plugins/x/reload", content=b"x" * 5000, headers=auth)
        assert r.status_code == 413
        assert r.json() == {"detail": "the request body exceeds the limit of 1000 bytes"}
        r = httpx.post(f"{server.url}/health/live", content=b"x" * 5000)
        assert r.status_code == 413
        # a chunked upload (no declared length) is counted as it is read
        body = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.zip\r\n\r\n"
        body += b"\0" * (400 * 1024)
        answer = _raw_request(server.url, _upload_head(0, TOKEN, True), _chunked(body))
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
        assert b"limit of 117964 bytes" in answer, answer[:300]  # 0.05 MiB + 64 KiB
        assert _uploads_left(server, tmp_path / "none") == []
        # a small one under the limit still reaches the route (and is refused for what it is)
        r = httpx.post(
            f"{server.url}/admin/plugins", files={"file": ("a.txt", b"hello")}, headers=auth
        )
        assert r.status_code == 422 and "not an archive" in r.json()["detail"]
        assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200
    assert "Traceback" not in server.output()


def test_wrong_tokens_are_logged_as_a_count_per_interval(tmp_path: Path) -> None:
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server, httpx.Client() as client:
        for i in range(200):
            r = client.get(
                f"{server.url}/admin/kernel",
                headers={"Authorization": f"Bearer wrong-{i}-0123456789abcdef"},
            )
            assert r.status_code == 401
    out = server.output()
    assert out.count("refused an admin request (wrong token)") == 1, out
    assert "refused 199 more admin request(s) with a wrong token" in out, out
    assert "wrong-1" not in out


def test_the_refusal_log_counts_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RefusalLog(logging.getLogger("test.refusals"), interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for i in range(1000):
            log.refused("GET", "/admin/kernel", f"10.0.0.{i % 30}", "wrong token")
        assert len(caplog.records) == 1
        now[0] = 61.0
        log.refused("GET", "/admin/kernel", "10.0.0.1", "wrong token")
    assert len(caplog.records) == 3
    summary = caplog.records[1].getMessage()
    assert summary.startswith("refused 999 more admin request(s)")
    assert "others x" in summary  # at most MAX_CLIENTS clients are named
    assert log.total == 1001
