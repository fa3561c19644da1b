"""A job's input files as the client reads them: files and directories, each placed in the job's directory at
the relative path it was given by (``data/a.txt`` stays ``data/a.txt``), or under its own name when it was given
by an absolute path or one leading outside (``../x.txt`` is ``x.txt``); permission bits kept, so an executable
script stays one."""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from conode.cluster.protocol import is_safe_relative_path
from conode.errors import ConodeError
from conode.limits import MAX_FILES, MAX_JOB_INPUT_BYTES
from coordinator.launch import DEFAULT_MODE


def placed_name(given: str) -> str:
    """Where an input given as *given* goes in the job's directory ("" for the directory itself)."""
    normal = posixpath.normpath(given.replace(os.sep, "/"))
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        return posixpath.basename(normal.rstrip("/"))
    return "" if normal == "." else normal


def collect(given: list[tuple[str, Path]]) -> tuple[dict[str, bytes], dict[str, int]]:
    """Read the inputs (each: what the user wrote, and the path it names); return their contents and the modes
    of those not 0644, by name in the job's directory. Refuses what would not fit a job or would collide."""
    found: dict[str, Path] = {}
    for text, path in given:
        name = placed_name(text)
        for relative, file in _files(path):
            target = posixpath.join(name, relative) if name and relative else (name or relative)
            if not is_safe_relative_path(target):
                raise ConodeError(f"input {file} would be placed at {target!r}, which is not a relative path in the "
                                  f"job's directory")
            other = found.get(target)
            if other is not None and other.resolve() != file.resolve():
                raise ConodeError(f"inputs {other} and {file} would both be placed at {target}; give them by paths "
                                  f"that differ (e.g. a/x.txt and b/x.txt)")
            found[target] = file
    if len(found) > MAX_FILES:
        raise ConodeError(f"the inputs hold {len(found)} files; a job may have at most {MAX_FILES} (pack them into "
                          f"an archive)")
    total = sum(file.stat().st_size for file in found.values())
    if total > MAX_JOB_INPUT_BYTES:
        raise ConodeError(f"the input files take {total} bytes; a job's inputs may take at most "
                          f"{MAX_JOB_INPUT_BYTES}")
    contents, modes = {}, {}
    for target, file in sorted(found.items()):
        try:
            contents[target] = file.read_bytes()
            mode = stat.S_IMODE(file.stat().st_mode) & 0o777
        except OSError as exc:
            raise ConodeError(f"cannot read input {file}: {exc.strerror}") from None
        if mode != DEFAULT_MODE:
            modes[target] = mode
    return contents, modes


def _files(path: Path) -> list[tuple[str, Path]]:
    """The regular files at *path*: itself (relative name ""), or those under it (by their path inside it)."""
    try:
        if path.is_file():
            return [("", path)]
        if not path.is_dir():
            raise ConodeError(f"input {path} is neither a file nor a directory" if path.exists()
                              else f"input {path} does not exist")
    except OSError as exc:
        raise ConodeError(f"cannot read input {path}: {exc.strerror}") from None
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            file = Path(root) / name
            if not file.is_file():
                raise ConodeError(f"input {file} is not a regular file")
            files.append((Path(root, name).relative_to(path).as_posix(), file))
    return files
