"""The migration stream: versioned, framed, bounded, every field checked on receipt.

The source is another agent, so what arrives is checked like any untrusted input; a corrupt or truncated stream
is a :class:`MigrationError` with one line, never a half-built guest. Layout, after the preamble ``MAGIC`` +
format (u32):

    frame   = type (u8) · length (u32) · payload · CRC-32 of type, length and payload (u32)

Source → destination: ``HELLO`` (msgpack: guest id, RAM size, page size), then rounds of ``PAGES`` (first page
u32 + whole pages) and ``ZEROS`` (first page u32, count u32) each closed by ``ROUND`` (its number, u32); after
the guest is paused the last round, ``STATE`` (msgpack: the Guest snapshot envelope without RAM pages) and
``DIGEST`` (Adler-32s of the final RAM, as (first page u32, pages u32, checksum u32) entries: of every MiB, or of
the runs of pages the last round sent, so a mismatch names the pages). Destination → source: ``READY`` (the
guest is built and checked), then the source's ``GO`` (it gives the guest up) and the destination's ``RESUMED``
(the host clock at its first instruction, u64 ns). Unless the first DIGEST covered all RAM, the source then sends a second, complete one,
and the destination answers ``VERIFIED`` (or ABORT). Either side may send ``ABORT`` (a reason).

The stream runs over any :class:`ByteStream` (a socket here; the agents' CURVE link later).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import msgpack

from conode.errors import ConodeError
from conode.limits import (
    MAX_FRAME_BYTES,
    MAX_GUEST_MEM_MIB,
    MAX_SMALL_FIELD,
    MAX_TEXT_FIELD,
    MIN_GUEST_MEM_MIB,
)
from conode.vm.layout import PAGE_SIZE

MAGIC = b"CONODE\x00M"
FORMAT = 1
PREAMBLE = struct.Struct("<8sI")
HEADER = struct.Struct("<BI")
TRAILER = struct.Struct("<I")
FIRST_PAGE = struct.Struct("<I")
ZERO_RUN = struct.Struct("<II")
ROUND_NUMBER = struct.Struct("<I")
CLOCK = struct.Struct("<Q")
DIGEST_ENTRY = struct.Struct("<III")  # first page, pages, their Adler-32

RUN_PAGES = 256  # pages in one PAGES frame or digest entry: 1 MiB (a guest's RAM is whole MiBs)
MAX_ROUNDS = 64  # rounds a destination accepts: with bounded frames, a bounded stream

T = TypeVar("T")

HELLO, PAGES, ZEROS, ROUND, STATE, DIGEST, READY, GO, RESUMED, ABORT, VERIFIED = range(1, 12)
NAMES = {HELLO: "HELLO", PAGES: "PAGES", ZEROS: "ZEROS", ROUND: "ROUND", STATE: "STATE", DIGEST: "DIGEST",
         READY: "READY", GO: "GO", RESUMED: "RESUMED", ABORT: "ABORT", VERIFIED: "VERIFIED"}
MAX_PAYLOAD = {HELLO: MAX_SMALL_FIELD, PAGES: FIRST_PAGE.size + RUN_PAGES * PAGE_SIZE, ZEROS: ZERO_RUN.size,
               ROUND: ROUND_NUMBER.size, STATE: MAX_FRAME_BYTES,
               DIGEST: (MAX_GUEST_MEM_MIB << 20) // PAGE_SIZE * DIGEST_ENTRY.size, READY: 0, GO: 0, RESUMED: CLOCK.size,
               ABORT: MAX_TEXT_FIELD, VERIFIED: 0}


class MigrationError(ConodeError):
    """A migration could not complete; the guest goes on where it was (or was never started here)."""


class MigrationRefused(MigrationError):
    """The other side gave the migration up (an ABORT frame), with its reason."""


class ByteStream(Protocol):
    """A reliable, ordered byte stream in both directions."""

    def send(self, data: bytes) -> None:
        """Send all of *data*; raise OSError if the link fails."""

    def recv(self, size: int) -> bytes:
        """Up to *size* bytes, at least one; b"" once the other side has closed; OSError on failure or timeout."""


class SocketStream:
    """A ByteStream over a connected stream socket, each wait bounded by *timeout_s*."""

    def __init__(self, sock: socket.socket, timeout_s: float = 30.0) -> None:
        self.sock = sock
        sock.settimeout(timeout_s)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Hello:
    guest_id: str
    ram_bytes: int


class Throttled:
    """A ByteStream that sends at most *bytes_per_s* on average (it waits before a send that would go faster)."""

    def __init__(self, stream: ByteStream, bytes_per_s: float) -> None:
        self._stream = stream
        self._rate = bytes_per_s
        self._start = time.monotonic()
        self._sent = 0

    def send(self, data: bytes) -> None:
        self._sent += len(data)
        wait = self._start + self._sent / self._rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._stream.send(data)

    def recv(self, size: int) -> bytes:
        return self._stream.recv(size)


class Abortable:
    """A ByteStream whose waits end early once *called_off* is set (someone else decided the move is off): the
    inner stream's waits are short (*poll_s*) and retried until *timeout_s*."""

    def __init__(self, stream: ByteStream, called_off: threading.Event, timeout_s: float) -> None:
        self._stream = stream
        self._called_off = called_off
        self._timeout_s = timeout_s
        self._timed_out = False  # once a wait timed out, the link is taken as gone: no more waiting on it

    def _retry(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self._timeout_s
        while True:
            if self._called_off.is_set():
                raise OSError(errno.ECANCELED, "the move was called off")
            if self._timed_out:
                raise TimeoutError("timed out before")
            try:
                return fn()
            except TimeoutError:
                pass
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            if time.monotonic() >= deadline:
                self._timed_out = True
                raise TimeoutError("timed out")

    def send(self, data: bytes) -> None:
        self._retry(lambda: self._stream.send(data))

    def recv(self, size: int) -> bytes:
        return self._retry(lambda: self._stream.recv(size))


class FrameStream:
    """Frames over a ByteStream, counting the bytes each way."""

    def __init__(self, stream: ByteStream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self.sent = 0
        self.received = 0

    # --- sending ------------------------------------------------------------------------------------------------
    def send_preamble(self) -> None:
        self._send(PREAMBLE.pack(MAGIC, FORMAT))

    def send(self, kind: int, payload: bytes = b"") -> None:
        header = HEADER.pack(kind, len(payload))
        crc = zlib.crc32(payload, zlib.crc32(header))
        self._send(b"".join((header, payload, TRAILER.pack(crc))))

    def send_abort(self, reason: str) -> None:
        """Tell the other side why we stop; quietly, since the link may be what failed."""
        try:
            self.send(ABORT, reason.encode()[:MAX_TEXT_FIELD])
        except MigrationError:
            pass

    def _send(self, data: bytes) -> None:
        try:
            self.stream.send(data)
        except OSError as exc:
            raise MigrationError(f"the migration link to {self.peer} failed: {exc.strerror or exc}") from None
        self.sent += len(data)

    # --- receiving ----------------------------------------------------------------------------------------------
    def receive_preamble(self) -> None:
        magic, version = PREAMBLE.unpack(self._receive(PREAMBLE.size, "the preamble"))
        if magic != MAGIC:
            raise MigrationError(f"{self.peer} does not speak conode's migration stream")
        if version != FORMAT:
            raise MigrationError(f"{self.peer} sends migration format {version}; this conode reads format {FORMAT}: "
                                 f"run the same conode release on both")

    def receive(self, *expected: int) -> tuple[int, bytes]:
        """The next frame, which must be of one of the *expected* kinds (ABORT is always understood)."""
        header = self._receive(HEADER.size, "a frame header")
        kind, length = HEADER.unpack(header)
        if kind not in NAMES:
            raise MigrationError(f"{self.peer} sent an unknown migration frame type {kind}; the stream is corrupt")
        if length > MAX_PAYLOAD[kind]:
            raise MigrationError(f"{self.peer} sent a {NAMES[kind]} frame of {length} bytes, over its "
                                 f"{MAX_PAYLOAD[kind]}-byte limit; the stream is corrupt")
        payload = self._receive(length, f"a {NAMES[kind]} frame")
        (crc,) = TRAILER.unpack(self._receive(TRAILER.size, f"a {NAMES[kind]} frame"))
        if zlib.crc32(payload, zlib.crc32(header)) != crc:
            raise MigrationError(f"a {NAMES[kind]} frame from {self.peer} fails its checksum; the stream is corrupt")
        if kind == ABORT and ABORT not in expected:
            reason = payload.decode(errors="replace")[:500]
            raise MigrationRefused(f"{self.peer} gave the migration up: {reason}")
        if kind not in expected:
            wanted = " or ".join(NAMES[k] for k in expected)
            raise MigrationError(f"{self.peer} sent {NAMES[kind]} where {wanted} was due; the stream is corrupt")
        return kind, payload

    def _receive(self, size: int, what: str) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            try:
                part = self.stream.recv(min(size - got, 1 << 20))
            except OSError as exc:
                raise MigrationError(f"the migration link to {self.peer} failed while reading {what}: "
                                     f"{exc.strerror or exc}") from None
            if not part:
                raise MigrationError(f"the migration stream from {self.peer} ended in the middle of {what} "
                                     f"(truncated)")
            view[got:got + len(part)] = part
            got += len(part)
        self.received += size
        return bytes(buffer)


# --- payloads -----------------------------------------------------------------------------------------------------
def pack_map(data: dict) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def unpack_map(payload: bytes, what: str) -> dict:
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise MigrationError(f"the {what} is corrupt: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise MigrationError(f"the {what} is not a map; the stream is corrupt")
    return data


def pack_hello(hello: Hello) -> bytes:
    return pack_map({"guest_id": hello.guest_id, "ram_bytes": hello.ram_bytes, "page_size": PAGE_SIZE})


def unpack_hello(payload: bytes) -> Hello:
    data = unpack_map(payload, "HELLO frame")
    guest_id, ram_bytes = data.get("guest_id"), data.get("ram_bytes")
    if data.get("page_size") != PAGE_SIZE:
        raise MigrationError(f"the source pages its RAM by {data.get('page_size')!r} bytes; this conode by "
                             f"{PAGE_SIZE}")
    if type(ram_bytes) is not int or not (MIN_GUEST_MEM_MIB << 20) <= ram_bytes <= (MAX_GUEST_MEM_MIB << 20) \
            or ram_bytes % (RUN_PAGES * PAGE_SIZE):
        raise MigrationError(f"the source announces a guest of {ram_bytes!r} RAM bytes, not a size a guest has")
    if not isinstance(guest_id, str) or not 0 < len(guest_id) <= 64:
        raise MigrationError("the source announces no valid guest id")
    return Hello(guest_id, ram_bytes)


def ram_digest(ram: memoryview, spans: list[tuple[int, int]] | None = None,
               threads: int = 2) -> list[tuple[int, int, int]]:
    """(first page, pages, Adler-32) of each span of RAM — (first page, pages) — or of every MiB, computed by
    *threads* threads at once: zlib releases the GIL, so they run on two cores while the caller goes on sending.
    (Adler-32 rather than CRC-32: twice as fast, and enough to catch a page lost or left stale; the link's own
    integrity is the frames' CRC and, between agents, CURVE's.)"""
    if spans is None:
        spans = [(first, RUN_PAGES) for first in range(0, len(ram) // PAGE_SIZE, RUN_PAGES)]

    def part(todo: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        return [(first, count, zlib.adler32(ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE]))
                for first, count in todo]

    if threads <= 1 or len(spans) < 2 * threads:
        return part(spans)
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(part, [spans[i::threads] for i in range(threads)])
        return sorted(entry for result in results for entry in result)


def pack_digest(entries: list[tuple[int, int, int]]) -> bytes:
    return b"".join(DIGEST_ENTRY.pack(*entry) for entry in entries)


def unpack_digest(payload: bytes, ram_bytes: int) -> list[tuple[int, int, int]]:
    """The digest's entries: spans of at most RUN_PAGES pages, in increasing order, apart, each within the RAM."""
    pages = ram_bytes // PAGE_SIZE
    if len(payload) % DIGEST_ENTRY.size:
        raise MigrationError("the RAM digest is not made of whole entries; the stream is corrupt")
    entries = list(DIGEST_ENTRY.iter_unpack(payload))
    end = 0
    for first, count, _ in entries:
        if first < end or not 0 < count <= RUN_PAGES or first + count > pages:
            raise MigrationError(f"the RAM digest lists pages {first}..{first + count - 1} out of order or beyond "
                                 f"the guest's {pages}; the stream is corrupt")
        end = first + count
    return entries


def compare_digest(ram: memoryview, entries: list[tuple[int, int, int]]) -> None:
    """Raise MigrationError, naming the first page span, if *ram* differs from the digest's *entries*."""
    mine = ram_digest(ram, [(first, count) for first, count, _ in entries])
    bad = [theirs for theirs, ours in zip(entries, mine) if theirs != ours]
    if bad:
        raise MigrationError(f"the guest's RAM here differs from the source's in {len(bad)} of {len(entries)} spans "
                             f"checked (the first at page {bad[0][0]}); the migration lost pages")
