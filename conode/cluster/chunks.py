"""Disk images cut into chunks: what the coordinator stores and agents fetch, each chunk named by its SHA-256.

An image is known by the list of its chunks' digests (``IMAGE_CHUNK_BYTES`` each, the last one shorter) and by
the SHA-256 of the whole file, which is what a snapshot names its base image by (conode/vm/disk/image.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from conode.errors import DiskImageError
from conode.limits import IMAGE_CHUNK_BYTES, MAX_IMAGE_BYTES


@dataclass(frozen=True)
class Manifest:
    """An image's size, whole-file SHA-256 (hex) and chunk digests (raw, in order)."""

    size: int
    sha256: str
    chunks: list[bytes]


def chunk_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_span(index: int, size: int) -> tuple[int, int]:
    """(offset, length) of chunk *index* of an image of *size* bytes."""
    offset = index * IMAGE_CHUNK_BYTES
    return offset, min(IMAGE_CHUNK_BYTES, size - offset)


def manifest_of(path: Path, progress: Callable[[int, int], None] = lambda done, total: None) -> Manifest:
    """Read an image file once: its chunks' digests and its whole SHA-256. Refuses what the pool cannot carry."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise DiskImageError(f"cannot open image {path}: {exc.strerror or exc}") from None
    try:
        size = os.fstat(fd).st_size
        if not 0 < size <= MAX_IMAGE_BYTES:
            raise DiskImageError(f"image {path} has {size} bytes; an image of the pool has 1 to {MAX_IMAGE_BYTES}")
        whole = hashlib.sha256()
        chunks: list[bytes] = []
        while (data := os.pread(fd, IMAGE_CHUNK_BYTES, len(chunks) * IMAGE_CHUNK_BYTES)):
            whole.update(data)
            chunks.append(chunk_digest(data))
            progress(min(len(chunks) * IMAGE_CHUNK_BYTES, size), size)
        if len(chunks) * IMAGE_CHUNK_BYTES < size:
            raise DiskImageError(f"image {path} shrank while it was read")
        return Manifest(size, whole.hexdigest(), chunks)
    except OSError as exc:
        raise DiskImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_chunk(path: Path, index: int, size: int) -> bytes:
    """Chunk *index* of the image file at *path* (of *size* bytes)."""
    offset, length = chunk_span(index, size)
    with open(path, "rb") as image:
        image.seek(offset)
        return image.read(length)
