"""A base image: a raw disk image file that guests read and never write.

All the guests of an agent share one base image; each writes to its own overlay (:mod:`.overlay`). The file
is opened read-only, so no code path here can change it. Its SHA-256 digest names it in snapshots; it is
computed once per process for a given file (device, inode, size and modification time), because hashing a
large image takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import weakref
from pathlib import Path

from conode.errors import DiskImageError

SECTOR = 512
_HASH_CHUNK = 1 << 20
_digests: dict[tuple[int, int, int, int], str] = {}
_digests_lock = threading.Lock()


class BaseImage:
    """A raw image file opened read-only; its usable size is a whole number of 512-byte sectors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise DiskImageError(f"cannot open disk image {self.path}: {exc.strerror or exc}") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            raise DiskImageError(f"disk image {self.path} is not a regular file; give a raw image file")
        self.size = info.st_size - info.st_size % SECTOR
        if self.size == 0:
            os.close(self.fd)
            raise DiskImageError(f"disk image {self.path} is smaller than one 512-byte sector")
        self._identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        # An image dropped without close() (a guest whose set-up failed half-way, a test) still gives its
        # descriptor back when it is collected, as a Python file object would.
        self._closer = weakref.finalize(self, os.close, self.fd)

    @property
    def name(self) -> str:
        return self.path.name

    def sha256(self) -> str:
        """The hex SHA-256 of the whole file (computed once per process for this file's identity)."""
        with _digests_lock:
            known = _digests.get(self._identity)
        if known is not None:
            return known
        digest = hashlib.sha256()
        offset = 0
        try:
            while chunk := os.pread(self.fd, _HASH_CHUNK, offset):
                digest.update(chunk)
                offset += len(chunk)
        except OSError as exc:
            raise DiskImageError(f"cannot read disk image {self.path}: {exc.strerror or exc}") from None
        hex_digest = digest.hexdigest()
        with _digests_lock:
            _digests[self._identity] = hex_digest
        return hex_digest

    def close(self) -> None:
        if self.fd >= 0:
            self._closer()  # closes the descriptor, once
            self.fd = -1
