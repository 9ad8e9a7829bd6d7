"""Fresh event ids: UUIDv7, unique, and never shared by a forked child and its parent
(the random bits come from a pool drawn in blocks, emptied in a forked child)."""

from __future__ import annotations

import os
import uuid

import orjson
import pytest

from kernel.events import Meta, new_id


def test_fresh_ids_are_unique_uuid7_across_many_blocks() -> None:
    ids = [new_id() for _ in range(5_000)]  # several blocks of the pool
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122, value
        assert len(value) == 32 and value == parsed.hex
    assert Meta().id != Meta().id


def _random_bits(value: str) -> int:
    return int(value, 16) & ((1 << 80) - 1)


def test_a_forked_child_never_hands_out_its_parents_random_bits() -> None:
    new_id()  # the pool holds a block now: a child copying it would repeat it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out at once
        try:
            os.write(write, " ".join(new_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_id() for _ in range(5)]
    assert len(child) == 5
    assert not {_random_bits(v) for v in child} & {_random_bits(v) for v in parent}


@pytest.mark.parametrize(
    "value", [None, "", "abc123", 'a"b', "a\\b", "é", "a b", "1\n2", "\u2028", new_id()]
)
def test_the_stored_meta_of_an_id_alone_is_what_orjson_writes(value: str | None) -> None:
    """Ids of plain letters and digits (every fresh id) skip the JSON encoder; any other
    id goes through it, escaped."""
    meta = Meta(id=value)  # type: ignore[arg-type]
    assert meta.to_json() == orjson.dumps({"id": value})
    assert Meta.from_json(meta.to_json()) == meta
