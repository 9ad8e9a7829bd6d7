"""The wire between the kernel and a sandbox worker: length-prefixed orjson frames.

A frame is ``[u32 size][u32 header size][orjson header][payload bytes]`` (big endian;
``size`` counts everything after itself). The header is a small dict with an ``op`` and,
for everything that belongs to a call, the call's ``id``; the payload carries raw bytes
(request and response bodies) so they are never re-encoded. Frames of different calls
interleave freely: many calls are in flight at once, each side routes a frame by its id,
and a frame whose id is no longer waited for (a cancelled call's late reply) is dropped.

Kernel -> worker ops: ``config`` (first frame), ``http`` / ``body`` (a request and its
body chunks), ``disconnect``, ``task``, ``hook``, ``noop``, ``ping``, ``cancel``, ``stop``.
``credit`` gives a streaming response's window back (see :data:`WINDOW_FRAMES`),
``event`` delivers an event to a subscription, ``appended`` / ``subscribed`` answer the
plugin's own requests. Worker -> kernel ops: ``append`` / ``subscribe`` (the plugin's
``ctx.append`` / ``ctx.subscribe``), ``ready`` / ``failed`` (answer to ``config``),
``start`` / ``body`` (a response), ``whole`` (a response in one frame: start and body),
``result`` (end of a call), ``pong``, ``log``, ``fatal`` (a limit the worker noticed
itself, just before it exits).

Both sides read with a :class:`FrameReader` fed straight from the pipe's readable
callback: the frames a read holds are decoded and dispatched in that callback, so a
call's answer costs one wake-up of the event loop and no task of its own.

A frame larger than :data:`MAX_FRAME` is refused: whoever sends it is broken or hostile.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

__all__ = [
    "CHUNK",
    "MAX_FRAME",
    "WINDOW_BYTES",
    "WINDOW_FRAMES",
    "FrameError",
    "FrameReader",
    "decode",
    "encode",
]

#: Largest frame either side accepts (bodies travel in chunks far below it).
MAX_FRAME = 16 * 1024 * 1024
#: Size of the body chunks a request or response is cut into.
CHUNK = 256 * 1024

#: Flow control of a streamed response: the worker may have at most this many body
#: frames, or this many body bytes, sent and not yet passed on to the client (the kernel
#: gives them back with ``credit`` frames as its client takes them). A worker streaming
#: faster than its client reads is paused; nothing piles up in the kernel.
WINDOW_FRAMES = 16
WINDOW_BYTES = 1024 * 1024

_HEAD = struct.Struct(">II")
_pack = _HEAD.pack
_unpack_from = _HEAD.unpack_from
_dumps = orjson.dumps
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class FrameError(Exception):
    """The other side sent something that is not a frame."""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame: ``header`` (JSON-able) and the raw ``payload``, in one buffer (one
    write puts it on the wire)."""
    head = _dumps(header, default=str)
    size = 4 + len(head) + len(payload)
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes exceeds the limit of {MAX_FRAME}")
    if payload:
        return b"".join((_pack(size, len(head)), head, payload))
    return _pack(size, len(head)) + head


def sizes(prefix: bytes | memoryview) -> tuple[int, int]:
    """``(size, header size)`` from the first 8 bytes of a frame, checked."""
    size, head = _HEAD.unpack(prefix)
    if size > MAX_FRAME or head > size - 4:
        raise FrameError(f"bad frame prefix (size {size}, header {head})")
    return size, head


def decode(body: bytes, head: int) -> tuple[dict[str, Any], bytes]:
    """``(header, payload)`` of a frame's ``body`` (what follows its size field)."""
    try:
        header = orjson.loads(body[4 : 4 + head])
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"a frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("a frame header is not an object")
    return header, body[4 + head :]


Frame = tuple[dict[str, Any], bytes]


class FrameReader:
    """Cuts a byte stream into frames, whatever the sizes of the reads.

    A partial frame is kept as a list of pieces and joined once, when it is whole, so a
    large frame arriving in many reads costs one copy, not one per read.
    """

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._have = 0
        self._need = 8

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data`` (raises :class:`FrameError` on garbage)."""
        if self._pieces:
            self._pieces.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._pieces)
            self._pieces, self._have = [], 0
        # the hot path of every call on both sides: plain bytes, no memoryview, the
        # prefix unpacked in place, locals only
        frames: list[Frame] = []
        pos, end = 0, len(data)
        while end - pos >= 8:
            size, head = _unpack_from(data, pos)
            if size > MAX_FRAME or head > size - 4:
                raise FrameError(f"bad frame prefix (size {size}, header {head})")
            stop = pos + 4 + size
            if stop > end:
                break
            body = pos + 8 + head
            try:
                header = _loads(data[pos + 8 : body])
            except _JSONDecodeError as exc:
                raise FrameError(f"a frame header is not JSON: {exc}") from None
            if type(header) is not dict:
                raise FrameError("a frame header is not an object")
            frames.append((header, data[body:stop]))
            pos = stop
        if pos < end:
            rest = data[pos:] if pos else data
            self._pieces, self._have = [rest], len(rest)
            self._need = 8 if len(rest) < 8 else 4 + sizes(rest[:8])[0]
        return frames
