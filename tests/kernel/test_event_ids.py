"""Fresh event ids: UUIDv7, unique, and never shared by a forked child and its parent
(the random bits come from a pool drawn in blocks, emptied in a forked child)."""

from __future__ import annotations

import os
import uuid

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
