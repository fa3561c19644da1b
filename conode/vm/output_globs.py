"""Output globs: a job's outputs may be patterns (``out/*.csv``), expanded in its guest once the command has
ended, by the guest's own shell, into the files the host then fetches one by one as usual.

What the guest answers is untrusted: its listing is bounded, and every name must be a safe relative path in
the job's directory (the fetch itself refuses links leading out).
"""

from __future__ import annotations

from typing import Callable

from conode import limits
from conode.cluster.protocol import is_safe_relative_path

GLOB_CHARACTERS = frozenset("*?[")
# Each pattern is expanded by the shell (IFS empty: no word splitting), each regular file it matches printed
# with a NUL after it; a pattern matching nothing prints nothing.
EXPAND_SCRIPT = "IFS=''; for p in \"$@\"; do for f in $p; do [ -f \"$f\" ] && printf '%s\\0' \"$f\"; done; done; :"
MAX_LISTING = limits.MAX_FILES * (limits.MAX_PATH_BYTES + 1)


def is_glob(path: str) -> bool:
    return any(c in GLOB_CHARACTERS for c in path)


def expand_argv(patterns: list[str]) -> list[str]:
    return ["/bin/sh", "-c", EXPAND_SCRIPT, "conode-outputs", *patterns]


class Expansion:
    """Receives the expanding command's output (a CommandHandler); calls *done* with the matched paths (in order,
    without repeats, at most MAX_FILES) and the patterns' problems ("pattern: reason")."""

    def __init__(self, patterns: list[str], done: Callable[[list[str], list[str]], None]) -> None:
        self.patterns = patterns
        self.done = done
        self.listing = bytearray()
        self.overflow = False

    def on_output(self, stream: str, data: bytes) -> None:
        if stream != "stdout":
            return
        room = MAX_LISTING - len(self.listing)
        self.listing += data[:max(0, room)]
        self.overflow = self.overflow or len(data) > room

    def on_exit(self, status: int) -> None:
        matched: list[str] = []
        for raw in bytes(self.listing).split(b"\0")[:-1]:
            name = raw.decode("utf-8", errors="replace").removeprefix("./")
            if is_safe_relative_path(name) and name not in matched:
                matched.append(name)
        problems = []
        if len(matched) > limits.MAX_FILES or self.overflow:
            matched = matched[:limits.MAX_FILES]
            problems.append(f"{' '.join(self.patterns)}: more than {limits.MAX_FILES} files match; the first "
                            f"{len(matched)} are brought back")
        problems += [f"{p}: no file matches" for p in self.patterns if not any(_could_match(p, m) for m in matched)]
        self.done(matched, problems)

    def on_error(self, message: str) -> None:
        self.done([], [f"{p}: cannot be expanded: {message}" for p in self.patterns])


def _could_match(pattern: str, path: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(path, pattern)
