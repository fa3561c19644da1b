"""The owner's pause (`conode pause`, BOINC's snooze): files the owner writes, the agent watches.

A pause is a small file ``pause-<uid>`` (the account name on Windows) in a directory the agent watches: its state
directory (an agent run by the owner) and its ``idle_reports`` directory (a system service: the installation makes
that one writable by every local user, sticky, so each user replaces or removes only their own files). It holds
JSON: when the pause was asked for, when it ends and who asked. Any local user may pause, which is safe for the
same reason as idle reports: a pause can only make the agent yield, never take the machine. It always ends by
itself, at most MAX_PAUSE_S after it was asked for; `conode resume` removes it earlier.

The watcher stats the directories every agent tick and reads the files again only when a directory changed (a
pause written or removed) or once a second, so the pause stops a running guest as fast as the owner's input does.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from conode.errors import ConodeError
from conode.idle.report import MAX_REPORTS, PAUSE_PREFIX, reporter_name
from conode.limits import MAX_PAUSE_S

MAX_PAUSE_BYTES = 512
RESCAN_S = 1.0


@dataclass(frozen=True)
class Pause:
    at: float  # wall time it was asked for
    until: float  # wall time it ends
    by: str  # who asked


def pause_path(directory: Path) -> Path:
    """This user's pause file in *directory*."""
    return directory / f"{PAUSE_PREFIX}{reporter_name()}"


def write_pause(directory: Path, seconds: float, wall: Callable[[], float] = time.time) -> Pause:
    """Pause the agent watching *directory* for *seconds* (replacing this user's earlier pause)."""
    if not 0 < seconds <= MAX_PAUSE_S:
        raise ConodeError(f"a pause lasts between a second and {MAX_PAUSE_S / 86400:.0f} days; drain the node "
                          f"on the coordinator for longer")
    now = wall()
    pause = Pause(now, now + seconds, getpass.getuser())
    target = pause_path(directory)
    staging = directory / f".{target.name}.tmp"
    try:
        staging.write_text(json.dumps({"at": pause.at, "until": pause.until, "by": pause.by}))
        staging.chmod(0o644)  # the agent, another account, reads it
        os.replace(staging, target)
    except OSError as exc:
        raise ConodeError(f"cannot write {target}: {exc.strerror}; give the agent's state directory (--state-dir) "
                          f"or its idle_reports directory (--dir)") from None
    return pause


def remove_pause(directory: Path) -> bool:
    """End this user's pause in *directory*; whether there was one."""
    try:
        pause_path(directory).unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConodeError(f"cannot remove {pause_path(directory)}: {exc.strerror}") from None


def _read(path: str) -> Pause | None:
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read(MAX_PAUSE_BYTES))
        at, until, by = float(data["at"]), float(data["until"]), str(data.get("by", "?"))[:64]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # being replaced, or not a pause: the others still count
    if not (math.isfinite(at) and math.isfinite(until)):
        return None
    return Pause(at, min(until, at + MAX_PAUSE_S), by)


def read_pauses(directories: Iterable[Path], now: float) -> Pause | None:
    """The pause in force at wall time *now* that ends last, if any."""
    latest: Pause | None = None
    for directory in directories:
        try:
            entries = [e.path for e in os.scandir(directory) if e.name.startswith(PAUSE_PREFIX)][:MAX_REPORTS]
        except OSError:
            continue
        for path in entries:
            pause = _read(path)
            # one asked for in the future is no pause (its end would lie beyond the limit)
            if pause is not None and pause.at <= now + RESCAN_S and pause.until > now and \
                    (latest is None or pause.until > latest.until):
                latest = pause
    return latest


class PauseWatch:
    """The pause in force, kept current cheaply (see the module's docstring)."""

    def __init__(self, directories: list[Path], wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directories = directories
        self._wall = wall
        self._clock = clock
        self._stamps: list[int | None] = []
        self._next_scan = -math.inf
        self.current: Pause | None = None

    def _stamp(self, directory: Path) -> int | None:
        try:
            return os.stat(directory).st_mtime_ns
        except OSError:
            return None

    def check(self) -> Pause | None:
        now, wall = self._clock(), self._wall()
        stamps = [self._stamp(d) for d in self.directories]
        expired = self.current is not None and wall >= self.current.until
        if stamps != self._stamps or now >= self._next_scan or expired:
            self._stamps, self._next_scan = stamps, now + RESCAN_S
            self.current = read_pauses(self.directories, wall)
        return self.current
