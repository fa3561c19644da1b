"""The migration stream: every field is checked on receipt, and a bad stream is refused with one clear line."""

import socket
import struct
import zlib

import pytest

from conode.migration import migrate_in
from conode.migration.source import runs
from conode.migration.stream import (ABORT, DIGEST_ENTRY, FORMAT, GO, HEADER, HELLO, MAGIC, PAGES, PREAMBLE,
                                     READY, ROUND, STATE, FrameStream, Hello, MigrationError, SocketStream,
                                     compare_digest, pack_hello, ram_digest, unpack_digest, unpack_hello)
from conode.vm.layout import PAGE_SIZE

RAM = 48 << 20


def frame(kind: int, payload: bytes = b"") -> bytes:
    header = HEADER.pack(kind, len(payload))
    return header + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(header)))


def preamble(version: int = FORMAT) -> bytes:
    return PREAMBLE.pack(MAGIC, version)


def reader(data: bytes) -> tuple[FrameStream, socket.socket]:
    """A FrameStream reading *data* (then end of stream) from a real socket; the other end for replies."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    return FrameStream(SocketStream(ours, timeout_s=5), "the peer"), theirs


def replies(theirs: socket.socket) -> bytes:
    theirs.settimeout(5)
    data = b""
    while chunk := theirs.recv(65536):
        data += chunk
    return data


def test_frames_go_through_intact():
    hello = Hello("abc", RAM)
    frames, _ = reader(preamble() + frame(HELLO, pack_hello(hello)) + frame(PAGES, b"\0" * 4 + b"x" * PAGE_SIZE))
    frames.receive_preamble()
    assert unpack_hello(frames.receive(HELLO)[1]) == hello
    kind, payload = frames.receive(PAGES, ROUND)
    assert kind == PAGES and payload[4:] == b"x" * PAGE_SIZE


@pytest.mark.parametrize("data, message", [
    (b"NOTCONOD" + struct.pack("<I", FORMAT), "does not speak conode's migration stream"),
    (PREAMBLE.pack(MAGIC, FORMAT + 1), "run the same conode release on both"),
    (preamble()[:5], "truncated"),
])
def test_a_bad_preamble_is_refused(data, message):
    frames, _ = reader(data)
    with pytest.raises(MigrationError, match=message):
        frames.receive_preamble()


def test_every_frame_is_checked():
    good = frame(PAGES, b"\0" * 4 + b"y" * PAGE_SIZE)
    flipped = bytearray(good)
    flipped[100] ^= 1
    cases = [
        (bytes(flipped), (PAGES,), "fails its checksum"),
        (good[:-10], (PAGES,), "truncated"),
        (HEADER.pack(99, 0) + b"\0" * 4, (PAGES,), "unknown migration frame type 99"),
        (HEADER.pack(PAGES, 64 << 20), (PAGES,), "over its"),
        (HEADER.pack(HELLO, 1 << 20), (HELLO,), "over its"),
        (good, (STATE,), "PAGES where STATE was due"),
        (frame(ABORT, b"out of memory"), (GO,), "gave the migration up: out of memory"),
    ]
    for data, expected, message in cases:
        frames, _ = reader(data)
        with pytest.raises(MigrationError, match=message):
            frames.receive(*expected)


@pytest.mark.parametrize("fields, message", [
    ({"guest_id": "g", "ram_bytes": RAM, "page_size": 8192}, "pages its RAM by 8192"),
    ({"guest_id": "g", "ram_bytes": 1 << 40, "page_size": PAGE_SIZE}, "not a size a guest has"),
    ({"guest_id": "g", "ram_bytes": RAM + PAGE_SIZE, "page_size": PAGE_SIZE}, "not a size a guest has"),
    ({"guest_id": "", "ram_bytes": RAM, "page_size": PAGE_SIZE}, "no valid guest id"),
    ({"guest_id": "g", "ram_bytes": "48M", "page_size": PAGE_SIZE}, "not a size a guest has"),
])
def test_hello_is_checked(fields, message):
    import msgpack

    with pytest.raises(MigrationError, match=message):
        unpack_hello(msgpack.packb(fields))
    with pytest.raises(MigrationError, match="corrupt"):
        unpack_hello(b"\xc1")


def test_the_digest_lists_spans_of_pages_in_order_within_the_ram():
    entry = DIGEST_ENTRY.pack
    assert unpack_digest(entry(0, 5, 9) + entry(5, 256, 7), RAM) == [(0, 5, 9), (5, 256, 7)]
    pages = RAM // PAGE_SIZE
    for bad in (entry(5, 1, 7) + entry(0, 1, 5), entry(0, 2, 1) + entry(1, 1, 1), entry(pages - 1, 2, 0),
                entry(0, 0, 0), entry(0, 257, 0), b"\0" * 5):
        with pytest.raises(MigrationError, match="corrupt"):
            unpack_digest(bad, RAM)


def test_a_digest_names_the_pages_that_differ():
    ram = bytearray(RAM)
    ram[5 * PAGE_SIZE + 3] = 1
    entries = ram_digest(memoryview(ram), [(0, 4), (4, 4), (300, 10)])
    compare_digest(memoryview(ram), entries)
    ram[5 * PAGE_SIZE + 3] = 2
    with pytest.raises(MigrationError, match=r"differs .* in 1 of 3 spans checked \(the first at page 4\)"):
        compare_digest(memoryview(ram), entries)
    whole = ram_digest(memoryview(ram))
    assert [(first, count) for first, count, _ in whole] == [(first, 256) for first in range(0, RAM // PAGE_SIZE, 256)]


@pytest.mark.parametrize("body, message", [
    (frame(PAGES, struct.pack("<I", (RAM // PAGE_SIZE) - 1) + b"z" * 2 * PAGE_SIZE), "stream is corrupt"),
    (frame(PAGES, struct.pack("<I", 0) + b"z" * 100), "whole pages"),
    (frame(ROUND, struct.pack("<I", 2)), "round 2 after round 0"),
    (frame(READY), "READY where PAGES or ZEROS or ROUND or STATE was due"),
    (frame(STATE, b"\x81\xa4kind\xa3bad"), "not a conode guest snapshot"),
    (frame(PAGES, struct.pack("<I", 0) + b"z" * PAGE_SIZE), "truncated"),
])
def test_the_destination_refuses_a_bad_stream_and_says_why(body, message):
    """Nothing is built; the source hears the reason (an ABORT frame) before the link closes."""
    data = preamble() + frame(HELLO, pack_hello(Hello("g", RAM))) + body
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(MigrationError, match=message):
        migrate_in(SocketStream(ours, timeout_s=5))
    ours.close()
    answer, _ = reader(replies(theirs))
    with pytest.raises(MigrationError, match=message):
        answer.receive(GO)


def test_runs_of_dirty_pages_are_cut_at_the_frame_size():
    bitmap = bytearray(8)
    for page in (0, 1, 2, 5, 6, 7, 8, 9, 63):
        bitmap[page >> 3] |= 1 << (page & 7)
    assert list(runs(bitmap, 4)) == [(0, 3), (5, 4), (9, 1), (63, 1)]
    assert list(runs(bytearray(4), 4)) == []
