"""The host side of the host channel: framing spoken with the in-guest agent (guest/agent/coagent.c).

Every frame is a 9-byte little-endian header ``type:u8, id:u32, length:u32`` and ``length`` payload bytes.
Host to guest: EXEC, KILL, PUT + DATA, GET, QUIT. Guest to host: READY, STDOUT, STDERR, EXIT, ACK, FILE,
ERROR. *id* names a job (EXEC) or a transfer (PUT/GET), chosen by the host.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from conode.errors import ConodeError

HEADER = struct.Struct("<BII")
MAX_PAYLOAD = 1 << 20
CHUNK = 32 * 1024

# Host -> guest
EXEC, KILL, PUT, DATA, GET, QUIT = b"X", b"K", b"P", b"D", b"G", b"Q"
# Guest -> host
READY, STDOUT, STDERR, EXIT, ACK, FILE, ERROR = b"R", b"O", b"E", b"S", b"A", b"F", b"Z"


class ChannelError(ConodeError):
    """The in-guest agent sent something that is not a valid frame."""


def frame(kind: bytes, ident: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"channel payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind[0], ident, len(payload)) + payload


def exec_frame(ident: int, argv: list[str], cwd: str = "/") -> bytes:
    if not argv:
        raise ValueError("a command needs at least a program name")
    strings = [cwd, *argv]
    if any("\0" in s for s in strings):
        raise ConodeError("command arguments cannot contain NUL characters")
    return frame(EXEC, ident, b"".join(s.encode() + b"\0" for s in strings))


def put_frames(ident: int, path: str, data: bytes, mode: int = 0o644) -> Iterator[bytes]:
    """PUT, the file's bytes in DATA chunks, and the empty DATA that closes the file."""
    yield frame(PUT, ident, path.encode() + b"\0" + struct.pack("<I", mode))
    for start in range(0, len(data), CHUNK):
        yield frame(DATA, ident, data[start:start + CHUNK])
    yield frame(DATA, ident)


def exit_status(payload: bytes) -> int:
    return struct.unpack("<i", payload)[0]


@dataclass(frozen=True)
class Frame:
    kind: bytes
    ident: int
    payload: bytes


class FrameDecoder:
    """Turns the byte stream from the guest into frames, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        buf = self._buffer
        while len(buf) >= HEADER.size:
            kind, ident, length = HEADER.unpack_from(buf)
            if length > MAX_PAYLOAD:
                raise ChannelError(f"in-guest agent sent a {length}-byte frame (limit {MAX_PAYLOAD})")
            end = HEADER.size + length
            if len(buf) < end:
                break
            frames.append(Frame(bytes((kind,)), ident, bytes(buf[HEADER.size:end])))
            del buf[:end]
        return frames

    def get_state(self) -> bytes:
        return bytes(self._buffer)

    def set_state(self, state: bytes) -> None:
        self._buffer = bytearray(state)


FrameHandler = Callable[[Frame], None]
