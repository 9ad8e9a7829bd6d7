"""The request guard at the ASGI level (the live-server tests are in tests/services/admin)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi import HTTPException

from kernel.guard import RequestGuard

Message = dict[str, Any]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"read"})


async def _call(guard: RequestGuard, path: str, chunks: list[bytes], **headers: str) -> Message:
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await guard(scope, receive, send)
    return {"status": sent[0]["status"], "body": b"".join(m.get("body", b"") for m in sent[1:])}


def _guard(authenticate: Any) -> RequestGuard:
    return RequestGuard(
        _app,
        authenticate=lambda: authenticate,
        body_limit=lambda method, path: 10,
        body_timeout=30,
        operations=lambda: {},
    )


async def _deny(request: Any) -> None:
    raise HTTPException(401, "no")


async def _allow(request: Any) -> None:
    return None


async def _broken(request: Any) -> None:
    raise RuntimeError("bug")


async def test_a_broken_authenticator_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="xcore.http"):
        answer = await _call(_guard(_broken), "/admin/x", [b"data"], content_length="4")
    assert answer["status"] == 503
    assert "the admin authenticator failed" in caplog.text


async def test_admin_paths_are_refused_before_the_body_and_others_are_not() -> None:
    assert (await _call(_guard(_deny), "/admin/x", [b"a"], content_length="1"))["status"] == 401
    assert (await _call(_guard(_deny), "/adminx", [b"a"], content_length="1"))["status"] == 200
    assert (await _call(_guard(_allow), "/admin/x", [b"a"], content_length="1"))["status"] == 200


async def test_an_undeclared_body_is_counted_as_it_is_read() -> None:
    guard = _guard(_allow)
    answer = await _call(guard, "/p", [b"12345", b"67890"], transfer_encoding="chunked")
    assert answer == {"status": 200, "body": b"read"}  # exactly the limit
    answer = await _call(guard, "/p", [b"12345", b"67890", b"x"], transfer_encoding="chunked")
    assert answer["status"] == 413  # one byte over, and the app's own answer is dropped
    assert b"limit of 10 bytes" in answer["body"]
    assert (await _call(guard, "/p", [b""], content_length="x1"))["status"] == 400
