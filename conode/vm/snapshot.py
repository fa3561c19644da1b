"""Snapshot files: a whole machine as plain data, written once and restorable in any process.

Layout: ``MAGIC`` (8 bytes), format version (u32), payload length (u64), SHA-256 of the payload (32 bytes),
then the payload: one msgpack map. RAM is stored as a bitmap of non-zero pages plus those pages, compressed
in independent chunks. Nothing is pickled; every field is checked on the way in.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from conode.errors import SnapshotError
from conode.limits import MAX_GUEST_MEM_MIB
from conode.vm import state
from conode.vm.state import blob, bounded, items, one_of

MAGIC = b"CONODE\x00S"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIQ32s")
MAX_PAYLOAD = 4 << 30  # refuse anything larger than any guest conode can run
PAGE = 4096
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


def decode_ram(encoded: dict[str, Any], ram: memoryview) -> None:
    """Fill *ram* (which must be zeroed) from :func:`encode_ram`'s output; raise SnapshotError if it is not
    valid (RAM is then partly written). Memory use is bounded: each chunk inflates to at most one chunk."""
    saved = state.load(RamState, encoded)
    if saved.size != len(ram):
        raise SnapshotError(f"snapshot RAM is {saved.size} bytes, the machine has {len(ram)}")
    pages = len(ram) // PAGE
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
            ram[index * PAGE:(index + 1) * PAGE] = data[offset:offset + PAGE]
    if next(present, None) is not None:
        raise SnapshotError("snapshot RAM holds fewer pages than its bitmap lists")


def write_snapshot(path: Path, state: dict[str, Any]) -> int:
    """Write *state* atomically (a partial file never replaces a good one); return the file size."""
    payload = msgpack.packb(state, use_bin_type=True)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(header)
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror or exc}") from None
    return len(header) + len(payload)


def read_snapshot(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as src:
            header = src.read(HEADER.size)
            if len(header) < HEADER.size or header[:8] != MAGIC:
                raise SnapshotError(f"{path} is not a conode snapshot")
            _, version, length, digest = HEADER.unpack(header)
            if version != FORMAT_VERSION:
                raise SnapshotError(f"{path} has snapshot format {version}; this conode reads format {FORMAT_VERSION}")
            if length > MAX_PAYLOAD:
                raise SnapshotError(f"{path} claims a {length}-byte payload, over the {MAX_PAYLOAD}-byte limit")
            payload = src.read(length)
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    if len(payload) != length:
        raise SnapshotError(f"{path} is truncated ({len(payload)} of {length} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{path} is corrupt (checksum mismatch)")
    try:
        state = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise SnapshotError(f"{path} is corrupt: {exc}") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{path} is corrupt: payload is not a map")
    return state
