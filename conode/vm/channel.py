"""The host side of the host channel: framing spoken with the in-guest agent (guest/agent/coagent.c).

Every frame is a 9-byte little-endian header ``type:u8, id:u32, length:u32`` and ``length`` payload bytes.
Host to guest: EXEC, KILL, PUT + DATA, GET, RENEW, IDENTITY, QUIT. Guest to host: READY, STDOUT, STDERR, EXIT, ACK, FILE,
ERROR. *id* names a job (EXEC) or a transfer (PUT/GET/RENEW), chosen by the host.

Everything the guest sends is untrusted: the decoder bounds every frame, and the client above it treats any
frame it did not ask for as the guest breaking the protocol.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from conode.errors import ConodeError
from conode.limits import CHANNEL_MAX_PAYLOAD

HEADER = struct.Struct("<BII")
MAX_PAYLOAD = CHANNEL_MAX_PAYLOAD
CHUNK = 32 * 1024
RENEW_ENTROPY_BYTES = 64
KILL_ALL = 0  # KILL with this id signals every process in the guest but the agent itself

# Host -> guest
EXEC, KILL, PUT, DATA, GET, RENEW, IDENTITY, QUIT = b"X", b"K", b"P", b"D", b"G", b"N", b"I", b"Q"
# Guest -> host
READY, STDOUT, STDERR, EXIT, ACK, FILE, ERROR = b"R", b"O", b"E", b"S", b"A", b"F", b"Z"


class ChannelError(ConodeError):
    """The in-guest agent sent something that is not a valid frame."""


def frame(kind: bytes, ident: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ChannelError(f"channel payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind[0], ident, len(payload)) + payload


def exec_frame(ident: int, argv: list[str], cwd: str = "/") -> bytes:
    if not argv:
        raise ChannelError("a command needs at least a program name")
    strings = [cwd, *argv]
    if any("\0" in s for s in strings):
        raise ChannelError("command arguments cannot contain NUL characters")
    try:
        payload = b"".join(s.encode() + b"\0" for s in strings)
    except UnicodeEncodeError:
        raise ChannelError("command arguments must be valid Unicode text") from None
    return frame(EXEC, ident, payload)


def get_frame(ident: int, root: str, relative: str, max_bytes: int) -> bytes:
    """Ask for *relative* inside the directory *root*: a regular file of at most *max_bytes*, no link out."""
    return frame(GET, ident, root.encode() + b"\0" + relative.encode() + b"\0" + struct.pack("<I", max_bytes))


def renew_frame(ident: int, wall_ns: int, entropy: bytes) -> bytes:
    """The host's wall clock and fresh entropy, for a guest restored from a shared snapshot."""
    seconds, nanoseconds = divmod(wall_ns, 1_000_000_000)
    return frame(RENEW, ident, struct.pack("<qI", seconds, nanoseconds) + entropy)


def put_frames(ident: int, path: str, data: bytes, mode: int = 0o644) -> Iterator[bytes]:
    """PUT, the file's bytes in DATA chunks, and the empty DATA that closes the file."""
    yield frame(PUT, ident, path.encode() + b"\0" + struct.pack("<I", mode))
    for start in range(0, len(data), CHUNK):
        yield frame(DATA, ident, data[start:start + CHUNK])
    yield frame(DATA, ident)


def exit_status(payload: bytes) -> int:
    if len(payload) != 4:
        raise ChannelError(f"an exit status of {len(payload)} bytes (expected 4)")
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

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (a stalled partial frame means a desynchronised stream)."""
        return len(self._buffer)

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
        if not isinstance(state, bytes) or len(state) > HEADER.size + MAX_PAYLOAD:
            raise ChannelError("a saved channel decoder state is not a bounded byte string")
        self._buffer = bytearray(state)

