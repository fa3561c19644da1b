"""Idle reports: how a desktop session tells the agent, a system service, when its user last gave input.

A service cannot see a session's input (it has no DISPLAY, Wayland gives input idle time only to the session's
own clients, and on Windows GetLastInputInfo answers only for the caller's own session, never session 0's
services). So a small helper runs in each desktop session (`conode idle-report`, started by the session's
autostart), reads the session's idle time (X11's XScreenSaver, or Windows' GetLastInputInfo) and writes the
wall-clock time of the last input, as a Unix timestamp, to a file of its own in a shared directory
(``/run/conode-idle/<uid>``; ``C:\\ProgramData\\conode\\idle\\<user>`` on Windows), replaced atomically. The
agent's :class:`ReportsSource` reads every file there and trusts the most recent input any session saw.

Any local user may write a report, and that is safe: a report can only make the owner look *more* recently
active (the agent takes the newest input of all), which makes the agent yield, never take the machine. Reading is
bounded: at most MAX_REPORTS files of at most MAX_REPORT_BYTES each.
"""

from __future__ import annotations

import getpass
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conode.idle.sources import IdleReading, IdleSource, WindowsSource, X11Source

MAX_REPORTS = 256  # sessions on one workstation
MAX_REPORT_BYTES = 64  # a timestamp and a newline
REPORT_EVERY_S = 5.0
DEFAULT_REPORTS_DIR = Path("/run/conode-idle")  # where the installation has sessions report
PAUSE_PREFIX = "pause-"  # the owner's pauses live beside the reports (conode/agent/pause.py)  # how often a session's helper writes: the agent sees input at most this late


class ReportsSource:
    """The most recent input any session's helper reported in *directory*."""

    name = "sessions"

    def __init__(self, directory: Path, wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._wall = wall

    def read(self) -> IdleReading:
        try:
            entries = [e for e in os.scandir(self.directory)
                       if not e.name.startswith((".", PAUSE_PREFIX))][:MAX_REPORTS]
        except OSError as exc:
            return IdleReading(self.name, None, f"{self.directory}: {exc.strerror}")
        latest = None
        for entry in entries:
            try:
                with open(entry.path, "rb") as report:
                    last = float(report.read(MAX_REPORT_BYTES).decode("ascii").strip())
            except (OSError, ValueError, UnicodeDecodeError):
                continue  # a report being replaced, or not a report: the others still count
            if not math.isnan(last) and (latest is None or last > latest):  # NaN is no time
                latest = last
        if latest is None:
            return IdleReading(self.name, None, f"no session reports in {self.directory}")
        return IdleReading(self.name, max(0.0, self._wall() - latest), f"{len(entries)} session report(s)")


def reporter_name() -> str:
    """This user's report file: the uid (POSIX), or the account name (Windows, which has no uid)."""
    return str(os.getuid()) if hasattr(os, "getuid") else getpass.getuser()


def session_source() -> IdleSource:
    """The idle time a session's helper reads: GetLastInputInfo on Windows, XScreenSaver elsewhere."""
    return WindowsSource() if sys.platform == "win32" else X11Source()


def write_report(directory: Path, last_input: float) -> None:
    """Replace this user's report with *last_input* (a Unix timestamp), atomically."""
    target = directory / reporter_name()
    staging = directory / f".{reporter_name()}.tmp"
    staging.write_text(f"{last_input:.3f}\n")
    staging.chmod(0o644)  # the agent, another user, reads it
    os.replace(staging, target)


def report_forever(directory: Path, source: IdleSource, every_s: float = REPORT_EVERY_S,
                   wall: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
    """Write *source*'s idle time as the time of the last input every *every_s*, until killed; a reading that
    is unknown (the display went away) writes nothing, so the last known input stands."""
    while True:
        reading = source.read()
        if reading.idle_s is not None:
            write_report(directory, wall() - reading.idle_s)
        sleep(every_s)
