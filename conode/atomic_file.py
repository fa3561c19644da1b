"""Writing a file whole or not at all: a temporary file beside it, synced, then renamed over it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, *parts: bytes, tmp: Path | None = None) -> None:
    """Write *parts* to *path* so that a reader sees the old file or the whole new one, never half of it; on
    failure (a full disk) no temporary file (*tmp*, by default a hidden one beside *path*) is left behind and the
    OSError is raised."""
    tmp = tmp or path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                out.write(part)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
