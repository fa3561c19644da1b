"""The coordinator's image chunks on disk: content-addressed, each stored once however many images share it.

A chunk lives in ``chunks/<first two hex digits>/<its SHA-256 in hex>``, written to a temporary file and renamed,
so a chunk file is whole or absent. It is checked when it arrives and again when it is read: a chunk damaged on
the coordinator's disk is reported as such, never sent. Which images use which chunks is in the store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from conode.atomic_file import write_atomically
from conode.errors import ConodeError
from conode.limits import MAX_IMAGE_NAME


class ChunkError(ConodeError):
    """A chunk that is not what its digest says, or that the coordinator's disk cannot give."""


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: bytes) -> Path:
        name = digest.hex()
        return self.root / name[:2] / name

    def has(self, digest: bytes) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: bytes, data: bytes) -> None:
        """Store a chunk after checking it against its digest (a chunk stored already is left alone)."""
        if hashlib.sha256(data).digest() != digest:
            raise ChunkError(f"chunk {digest.hex()[:16]} does not match its digest; it was damaged on the way")
        path = self.path(digest)
        if path.is_file():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data)
        except OSError as exc:
            raise ChunkError(f"cannot store chunk {digest.hex()[:16]} in {self.root}: {exc.strerror or exc}") \
                from None

    def get(self, digest: bytes) -> bytes:
        """A chunk's bytes, checked against its digest."""
        try:
            data = self.path(digest).read_bytes()
        except OSError as exc:
            raise ChunkError(f"chunk {digest.hex()[:16]} is not on the coordinator: {exc.strerror or exc}") from None
        if hashlib.sha256(data).digest() != digest:
            raise ChunkError(f"chunk {digest.hex()[:16]} is damaged on the coordinator's disk; add its image again")
        return data

    def size(self, digest: bytes) -> int:
        return self.path(digest).stat().st_size

    def discard(self, digests: Iterable[bytes]) -> None:
        """Remove chunks (those of a removed image that no other image uses)."""
        for digest in digests:
            self.path(digest).unlink(missing_ok=True)


def check_image_name(name: str) -> str | None:
    """Why *name* is not a valid image name, or None: 1 to MAX_IMAGE_NAME letters, digits, '.', '_' or '-',
    starting with a letter or digit."""
    if not (0 < len(name) <= MAX_IMAGE_NAME and name.isascii() and name[0].isalnum()
            and all(c.isalnum() or c in "._-" for c in name)):
        return (f"image name {name[:80]!r} is not valid: use 1 to {MAX_IMAGE_NAME} letters, digits, '.', '_' or "
                f"'-', starting with a letter or digit")
    return None
