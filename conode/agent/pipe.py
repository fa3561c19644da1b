"""Length-prefixed msgpack messages over a pipe: how the agent and its guest worker processes talk."""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from conode.errors import ConodeError
from conode.limits import MAX_FRAME_BYTES

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 2 * MAX_FRAME_BYTES  # a result holds up to a frame's worth of files; more is garbage


class PipeError(ConodeError):
    """The other process sent something that is not a valid message."""


def pack(message: dict[str, Any]) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(data)) + data


class Unpacker:
    """Reassembles messages from whatever chunks the pipe delivers."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_MESSAGE:
                raise PipeError(f"message of {length} bytes on the worker pipe exceeds {MAX_MESSAGE}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            try:
                message = msgpack.unpackb(bytes(self._buffer[_LENGTH.size:end]), raw=False)
            except Exception as exc:
                raise PipeError(f"undecodable message on the worker pipe: {exc}") from None
            del self._buffer[:end]
            if not isinstance(message, dict):
                raise PipeError("message on the worker pipe is not a map")
            messages.append(message)
        return messages
