"""Snapshot files: a whole machine as plain data, written once and restorable in any process.

Layout: ``MAGIC`` (8 bytes), format version (u32), payload length (u64), SHA-256 of the payload (32 bytes),
then the payload: one msgpack map holding at least ``machine`` (:meth:`CoMachine.get_state`). RAM is stored
as a bitmap of non-zero pages plus those pages, compressed in independent chunks. Nothing is pickled; every
field is checked on the way in: here the file and the envelope, in each component's record the rest.

Format 2 holds typed, versioned component state (conode/vm/state.py); format 1 files, from before, are
refused by name.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from conode.atomic_file import write_atomically
from conode.errors import SnapshotError
from conode.limits import MAX_GUEST_MEM_MIB, MAX_SNAPSHOT_BYTES
from conode.vm import layout, state
from conode.vm.state import blob, bounded, items, one_of

MAGIC = b"CONODE\x00S"
FORMAT_VERSION = 2
HEADER = struct.Struct("<8sIQ32s")
MAX_PAYLOAD = MAX_SNAPSHOT_BYTES - HEADER.size
ENVELOPE_KEYS = ("machine",)  # what every snapshot holds; its writer may add its own keys beside
_READ_CHUNK = 1 << 20
PAGE = layout.PAGE_SIZE
PAGES_PER_CHUNK = 256  # 1 MiB of RAM per compressed chunk
ZERO_PAGE = bytes(PAGE)


@dataclass(frozen=True)
class RamState(state.Record):
    KIND = "RAM"
    VERSION = 1

    size: int = bounded(0, MAX_GUEST_MEM_MIB << 20)
    page_size: int = one_of(PAGE)
    bitmap: bytes = blob(max_len=(MAX_GUEST_MEM_MIB << 20) // PAGE // 8)
    chunks: tuple[bytes, ...] = items(max_len=-(-(MAX_GUEST_MEM_MIB << 20) // PAGE // PAGES_PER_CHUNK))


def encode_ram(ram: memoryview) -> dict[str, Any]:
    """Elide zero pages, compress the rest."""
    size = len(ram)
    pages = size // PAGE
    bitmap = bytearray((pages + 7) // 8)
    chunks: list[bytes] = []
    batch: list[bytes] = []
    for index in range(pages):
        page = bytes(ram[index * PAGE:(index + 1) * PAGE])
        if page == ZERO_PAGE:
            continue
        bitmap[index >> 3] |= 1 << (index & 7)
        batch.append(page)
        if len(batch) == PAGES_PER_CHUNK:
            chunks.append(zlib.compress(b"".join(batch), 1))
            batch = []
    if batch:
        chunks.append(zlib.compress(b"".join(batch), 1))
    return state.dump(RamState(size, PAGE, bytes(bitmap), tuple(chunks)))


def ram_elsewhere(size: int) -> dict[str, Any]:
    """A RAM record that holds no page: the RAM travels beside the state (migration streams it page by page) and
    the machine restored from it maps that RAM as its image."""
    return state.dump(RamState(size, PAGE, bytes((size // PAGE + 7) // 8), ()))


def decode_ram(encoded: dict[str, Any], ram: memoryview) -> None:
    """Fill *ram* (which must be zeroed) from :func:`encode_ram`'s output; raise SnapshotError if it is not
    valid (RAM is then partly written). Memory use is bounded: each chunk inflates to at most one chunk."""
    saved = state.load(RamState, encoded)
    if saved.size != len(ram):
        raise SnapshotError(f"snapshot RAM is {saved.size} bytes, the machine has {len(ram)}")
    for index, page in ram_pages(saved):
        ram[index * PAGE:(index + 1) * PAGE] = page


def ram_pages(saved: RamState) -> Iterator[tuple[int, bytes]]:
    """(page number, contents) of each page *saved* holds, in order; SnapshotError if its chunks do not hold
    exactly the pages its bitmap lists. Each chunk inflates to at most one chunk's pages."""
    pages = saved.size // PAGE
    if len(saved.bitmap) != (pages + 7) // 8:
        raise SnapshotError(f"snapshot RAM bitmap has {len(saved.bitmap)} bytes for {pages} pages")
    bitmap = saved.bitmap
    present = iter([i for i in range(pages) if bitmap[i >> 3] >> (i & 7) & 1])
    chunk_bytes = PAGES_PER_CHUNK * PAGE
    for chunk in saved.chunks:
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(chunk, chunk_bytes)
        except zlib.error as exc:
            raise SnapshotError(f"snapshot RAM is corrupt: {exc}") from None
        if inflater.unconsumed_tail or not inflater.eof or len(data) % PAGE or not data:
            raise SnapshotError("snapshot RAM is corrupt: a chunk does not hold whole pages")
        for offset in range(0, len(data), PAGE):
            index = next(present, None)
            if index is None:
                raise SnapshotError("snapshot RAM holds more pages than its bitmap lists")
            yield index, data[offset:offset + PAGE]
    if next(present, None) is not None:
        raise SnapshotError("snapshot RAM holds fewer pages than its bitmap lists")


def write_snapshot(path: Path, state: dict[str, Any]) -> int:
    """Write *state* atomically (a partial file never replaces a good one); return the file size."""
    payload = msgpack.packb(state, use_bin_type=True)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    try:
        write_atomically(path, header, payload)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror or exc}") from None
    return len(header) + len(payload)


def read_snapshot(path: Path, keys: tuple[str, ...] = ENVELOPE_KEYS) -> dict[str, Any]:
    """Read and check a snapshot file; its payload must be a map holding maps under *keys*.

    Only regular files are read (a FIFO or a device would block or never end), never more than the size
    limit, and every failure is a SnapshotError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{path} is not a regular file; a snapshot is a file written by conode")
        if info.st_size > HEADER.size + MAX_PAYLOAD:
            raise SnapshotError(f"{path} is {info.st_size} bytes, over the {HEADER.size + MAX_PAYLOAD}-byte "
                                f"snapshot limit; it is not a conode snapshot")
        header = _read_exactly(fd, HEADER.size)
        if len(header) < HEADER.size or header[:8] != MAGIC:
            raise SnapshotError(f"{path} is not a conode snapshot")
        _, version, length, digest = HEADER.unpack(header)
        if version != FORMAT_VERSION:
            writer = "an older" if version < FORMAT_VERSION else "a newer"
            raise SnapshotError(f"{path} has snapshot format {version}, written by {writer} conode; this conode "
                                f"reads format {FORMAT_VERSION}: boot the guest afresh")
        if length > MAX_PAYLOAD:
            raise SnapshotError(f"{path} claims a {length}-byte payload, over the {MAX_PAYLOAD}-byte limit")
        payload = _read_exactly(fd, length)
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(payload) != length:
        raise SnapshotError(f"{path} is truncated ({len(payload)} of {length} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{path} is corrupt (checksum mismatch)")
    return _decode_envelope(path, payload, keys)


def _read_exactly(fd: int, length: int) -> bytes:
    """Up to *length* bytes (fewer only at the end of the file)."""
    parts, remaining = [], length
    while remaining:
        part = os.read(fd, min(remaining, _READ_CHUNK))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _decode_envelope(path: Path, payload: bytes, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        envelope = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:  # what hostile input causes
        raise SnapshotError(f"{path} is corrupt: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(envelope, dict):
        raise SnapshotError(f"{path} is corrupt: the payload is not a map")
    for key in keys:
        if not isinstance(envelope.get(key), dict):
            raise SnapshotError(f"{path} is not a complete conode snapshot: it has no {key!r} map")
    return envelope
