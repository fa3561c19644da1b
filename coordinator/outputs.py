"""Writing a job's output files into a directory on the admin's machine without being fooled by what is
already there: never through or over a symbolic link, subdirectories opened one level at a time without
following links, each file written to a fresh temporary name and renamed into place."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from conode.cluster.protocol import is_safe_relative_path
from conode.errors import ConodeError

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _refused(target: Path, what: str) -> ConodeError:
    return ConodeError(f"refusing to write {target}: {what}; remove it or fetch into another directory")


def _enter(parent_fd: int, name: str, shown: Path) -> int:
    """Open (creating it if absent) the subdirectory *name* of *parent_fd*, never through a link."""
    try:
        os.mkdir(name, 0o777, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused(shown, "it is a symbolic link or not a directory") from None
        raise


def _write_file(directory_fd: int, name: str, data: bytes, shown: Path) -> None:
    try:
        present = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        present = None
    if present is not None and stat.S_ISLNK(present.st_mode):
        raise _refused(shown, "a symbolic link is there")
    if present is not None and not stat.S_ISREG(present.st_mode):
        raise _refused(shown, "something other than a regular file is there")
    temporary = f".conode-fetch-{secrets.token_hex(8)}"
    fd = os.open(temporary, _NEW_FILE_FLAGS, 0o666, dir_fd=directory_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        # rename replaces a name, never what a link there points to: a link made meanwhile is replaced, not followed
        os.rename(temporary, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=directory_fd)
        except OSError:
            pass
        raise


def write_outputs(directory: Path, outputs: dict[str, bytes]) -> list[tuple[Path, int]]:
    """Write each output under *directory* (created if absent); return (path, size) of each, in name order."""
    written: list[tuple[Path, int]] = []
    target = directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path, data in sorted(outputs.items()):
                if not is_safe_relative_path(path):
                    raise ConodeError(f"refusing to write unsafe output path {path!r}")
                *parents, name = path.split("/")
                fd = os.dup(root)
                try:
                    for depth, part in enumerate(parents):
                        target = directory.joinpath(*parents[:depth + 1])
                        inner = _enter(fd, part, target)
                        os.close(fd)
                        fd = inner
                    target = directory / path
                    _write_file(fd, name, data, target)
                finally:
                    os.close(fd)
                written.append((target, len(data)))
        finally:
            os.close(root)
    except OSError as exc:
        raise ConodeError(f"cannot write {target}: {exc.strerror or exc}") from None
    return written
