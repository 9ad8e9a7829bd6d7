"""Sessions expire, stay bounded, compare CSRF tokens exactly; logins are throttled."""

from __future__ import annotations

import time

import anyio

from services.ui.sessions import LoginThrottle, SessionStore


def test_a_session_is_found_until_it_expires() -> None:
    store = SessionStore(ttl=0.05)
    session = store.create("token-1", ["admin:read"])
    assert store.get(session.id) is session
    assert not session.can_write
    time.sleep(0.06)
    assert store.get(session.id) is None
    assert len(store) == 0


def test_sessions_are_bounded_oldest_dropped_first() -> None:
    store = SessionStore(ttl=60, max_sessions=3)
    first, *rest = [store.create(f"t{i}", ["admin:read", "admin:write"]) for i in range(4)]
    assert store.get(first.id) is None
    assert all(store.get(s.id) is s for s in rest)
    assert len(store) == 3


def test_ids_and_csrf_tokens_are_unguessable_and_compared_exactly() -> None:
    store = SessionStore(ttl=60)
    a, b = store.create("t", []), store.create("t", [])
    assert a.id != b.id and a.csrf != b.csrf and len(a.id) >= 40
    assert a.csrf_matches(a.csrf)
    assert not a.csrf_matches(b.csrf)
    assert not a.csrf_matches(None)
    assert not a.csrf_matches(a.csrf[:-1])
    assert store.get(None) is None and store.get("") is None and store.get("nope") is None


def test_logout_drops_the_session() -> None:
    store = SessionStore(ttl=60)
    s = store.create("t", [])
    store.drop(s.id)
    assert store.get(s.id) is None


def test_failed_logins_are_throttled_per_client() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    for _ in range(3):
        assert throttle.blocked("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.blocked("10.0.0.1") > 0
    assert throttle.blocked("10.0.0.2") == 0  # another client is not affected


def test_attempts_in_flight_count_and_a_success_withdraws_only_its_own() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    # three attempts started at once (none has failed yet): the fourth is refused
    stamps = [throttle.attempt("c") for _ in range(3)]
    assert all(wait == 0 for wait, _ in stamps)
    assert throttle.attempt("c")[0] > 0
    # one of them succeeds: only it is withdrawn, the two wrong guesses still count
    throttle.succeeded("c", stamps[0][1])
    wait, stamp = throttle.attempt("c")
    assert wait == 0
    assert throttle.attempt("c")[0] > 0
    # a login with a valid token does not reset the count of wrong guesses
    throttle.succeeded("c", stamp)
    assert throttle.blocked("c") == 0
    throttle.failed("c")
    assert throttle.blocked("c") > 0


def test_the_throttle_window_slides() -> None:
    throttle = LoginThrottle(limit=1, window=0.05)
    throttle.failed("c")
    assert throttle.blocked("c") > 0
    time.sleep(0.06)
    assert throttle.blocked("c") == 0


async def test_waiting_for_a_session_returns_when_it_is_dropped_or_expires() -> None:
    store = SessionStore(ttl=60)
    s = store.create("t", [])
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(s.wait_ended)
            await anyio.sleep(0.01)
            store.drop(s.id)
    short = SessionStore(ttl=0.05).create("t", [])
    with anyio.fail_after(30):
        await short.wait_ended()  # expiry ends it without anyone dropping it


def test_one_token_logging_in_again_and_again_ends_only_its_own_sessions() -> None:
    store = SessionStore(ttl=60, max_sessions=100, max_per_token=5)
    operator = store.create("operator-token", ["*"])
    readers = [store.create("reader-token", ["admin:read"]) for _ in range(1000)]
    assert store.get(operator.id) is operator
    assert [s.id for s in readers if store.get(s.id)] == [s.id for s in readers[-5:]]
    assert len(store) == 6


def test_a_csrf_header_with_non_ascii_characters_is_wrong_not_an_error() -> None:
    s = SessionStore(ttl=60).create("t", [])
    assert s.csrf_matches("\xff" + s.csrf[1:]) is False
    assert s.csrf_matches("é") is False
    assert s.csrf_matches(s.csrf) is True
