"""Showing a PostgreSQL DSN without its password.

Guarantee: :func:`redact_dsn` never returns any part of a DSN's password, however the
operator wrote it — percent-encoded or not (``postgresql://u:pa/ss#w?x@h/db`` is a
password ``pa/ss#w?x`` to a person, a host ``u`` and a port ``pa`` to a URL parser),
in the query (``?password=``) or in libpq's ``key=value`` form, quoted or not. When the
shape is ambiguous it hides too much rather than too little. :func:`dsn_secrets` lists
the same passwords so that the log formatter can blank them wherever they appear.

Mechanism: the user information of a URL ends at its LAST ``@`` (a password may hold
``/ ? #`` unencoded; a user name holds none of them), so everything between the first
``:`` after the scheme and that ``@`` is the password.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["dsn_secrets", "redact_dsn"]

#: ``password=value`` in a URL query or in libpq's key=value form (quoted or not).
_KV_PASSWORD = re.compile(
    r"""(?P<key>(?<![\w])password\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|[^\s&]*)""",
    re.IGNORECASE,
)


def _userinfo(dsn: str) -> tuple[str, str, str, str] | None:
    """``(scheme://, user, password, rest)`` of a URL DSN with a password, else None."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon or any(c in user for c in "/?#"):
        return None
    return scheme + sep, user, password, rest[at + 1 :]


def redact_dsn(dsn: str) -> str:
    """``dsn`` without its password, for messages and logs."""
    found = _userinfo(dsn)
    if found is not None:
        prefix, user, _, rest = found
        dsn = f"{prefix}{user}:***@{rest}"
    return _KV_PASSWORD.sub(lambda m: m.group("key") + "***", dsn)


def dsn_secrets(dsn: str) -> list[str]:
    """Every password written in ``dsn`` (as written and decoded), for log redaction."""
    secrets: list[str] = []
    found = _userinfo(dsn)
    if found is not None and found[2]:
        secrets += [found[2], unquote(found[2])]
    for m in _KV_PASSWORD.finditer(dsn):
        value = m.group("value")
        if value.startswith("'"):
            value = value[1:-1] if len(value) > 1 and value.endswith("'") else value[1:]
        if value:
            secrets += [value, unquote(value), m.group("value")]
    return [s for s in dict.fromkeys(secrets) if s]
