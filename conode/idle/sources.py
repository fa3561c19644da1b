"""Where the agent learns how long the owner has been away: one source per platform mechanism.

Every source answers with an :class:`IdleReading`; a source that cannot be read says *unknown* and why, and is
never taken for idle. The agent uses every source that works on its platform and trusts the most recent input
any of them saw (the smallest idle time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import psutil


@dataclass(frozen=True)
class IdleReading:
    source: str
    idle_s: float | None  # None: unknown
    detail: str = ""


class IdleSource(Protocol):
    name: str

    def read(self) -> IdleReading: ...


class FileSource:
    """Last activity written to a file as a Unix timestamp (or, if the file is empty, its modification time).

    For tests and for setups the other sources cannot see, e.g. a script that watches a kiosk application.
    """

    name = "file"

    def __init__(self, path: Path, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall

    def read(self) -> IdleReading:
        try:
            text = self.path.read_text().strip()
            last = float(text) if text else self.path.stat().st_mtime
        except FileNotFoundError:
            return IdleReading(self.name, None, f"{self.path} does not exist")
        except (OSError, ValueError) as exc:
            return IdleReading(self.name, None, f"{self.path} unreadable: {exc}")
        return IdleReading(self.name, max(0.0, self._wall() - last), str(self.path))


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("eventMask", ctypes.c_ulong)]


class X11Source:
    """The X server's idle time through the XScreenSaver extension (libX11 + libXss via ctypes)."""

    name = "x11"

    def __init__(self, display: str | None = None) -> None:
        self.display_name = display or os.environ.get("DISPLAY")
        self._display = None
        self._error: str | None = None
        self._setup()

    def _setup(self) -> None:
        if not self.display_name:
            self._error = "no DISPLAY"
            return
        x11_path, xss_path = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
        if not x11_path or not xss_path:
            self._error = "libX11 or libXss not installed"
            return
        self._x11 = ctypes.cdll.LoadLibrary(x11_path)
        self._xss = ctypes.cdll.LoadLibrary(xss_path)
        self._x11.XOpenDisplay.restype = ctypes.c_void_p
        self._x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self._x11.XDefaultRootWindow.restype = ctypes.c_ulong
        self._x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        self._xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        self._xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong,
                                                     ctypes.POINTER(_XScreenSaverInfo)]
        self._display = self._x11.XOpenDisplay(self.display_name.encode())
        if not self._display:
            self._error = f"cannot open display {self.display_name}"
            return
        self._info = self._xss.XScreenSaverAllocInfo()
        self._root = self._x11.XDefaultRootWindow(self._display)

    def read(self) -> IdleReading:
        if self._display is None:
            return IdleReading(self.name, None, self._error or "unavailable")
        if not self._xss.XScreenSaverQueryInfo(self._display, self._root, self._info):
            return IdleReading(self.name, None, "XScreenSaver extension not available on this display")
        return IdleReading(self.name, self._info.contents.idle / 1000.0, f"display {self.display_name}")


class LogindSource:
    """systemd-logind's IdleHint/IdleSinceHint of local sessions (Wayland and text consoles)."""

    name = "logind"

    def __init__(self) -> None:
        self._loginctl = shutil.which("loginctl")

    def read(self) -> IdleReading:
        if self._loginctl is None:
            return IdleReading(self.name, None, "loginctl not installed")
        try:
            listing = subprocess.run([self._loginctl, "list-sessions", "--no-legend"], capture_output=True,
                                     text=True, timeout=2)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return IdleReading(self.name, None, f"loginctl failed: {exc}")
        if listing.returncode != 0:
            reason = (listing.stderr.strip().splitlines() or ["logind not running"])[0]
            return IdleReading(self.name, None, reason[:200])
        idle_times = []
        now_us = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        for line in listing.stdout.splitlines():
            session = line.split()[0] if line.split() else None
            if session is None:
                continue
            shown = subprocess.run([self._loginctl, "show-session", session, "-p", "IdleHint", "-p",
                                    "IdleSinceHintMonotonic", "-p", "Remote", "-p", "Class"],
                                   capture_output=True, text=True, timeout=2)
            props = dict(p.split("=", 1) for p in shown.stdout.splitlines() if "=" in p)
            if props.get("Remote") == "yes" or props.get("Class") not in ("user", None):
                continue
            if props.get("IdleHint") != "yes":
                idle_times.append(0.0)
            else:
                since = int(props.get("IdleSinceHintMonotonic", "0") or 0)
                idle_times.append(max(0.0, (now_us - since) / 1e6) if since else 0.0)
        if not idle_times:
            return IdleReading(self.name, None, "no local sessions")
        return IdleReading(self.name, min(idle_times), f"{len(idle_times)} local session(s)")


class _LastInputInfo(ctypes.Structure):
    _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]


class WindowsSource:
    """GetLastInputInfo: milliseconds since the last keyboard or mouse input in this session."""

    name = "windows"

    def read(self) -> IdleReading:
        if sys.platform != "win32":
            return IdleReading(self.name, None, "not Windows")
        info = _LastInputInfo(ctypes.sizeof(_LastInputInfo), 0)
        user32 = ctypes.windll.user32  # type: ignore[attr-defined]
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        if not user32.GetLastInputInfo(ctypes.byref(info)):
            return IdleReading(self.name, None, "GetLastInputInfo failed")
        elapsed_ms = (kernel32.GetTickCount() - info.dwTime) & 0xFFFFFFFF
        return IdleReading(self.name, elapsed_ms / 1000.0, "GetLastInputInfo")


class MacSource:
    """The HID system's idle time (IOHIDSystem's HIDIdleTime, in nanoseconds), read with ioreg."""

    name = "macos"

    def read(self) -> IdleReading:
        if sys.platform != "darwin":
            return IdleReading(self.name, None, "not macOS")
        try:
            out = subprocess.run(["ioreg", "-c", "IOHIDSystem"], capture_output=True, text=True, timeout=2).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            return IdleReading(self.name, None, f"ioreg failed: {exc}")
        for line in out.splitlines():
            if "HIDIdleTime" in line:
                return IdleReading(self.name, int(line.split("=")[-1].strip()) / 1e9, "IOHIDSystem")
        return IdleReading(self.name, None, "HIDIdleTime not found")


class OwnerLoad:
    """CPU used by everything except conode's own processes, in cores (0.5 = half a core), via psutil."""

    def __init__(self, own_pids: "set[int] | None" = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._own = own_pids if own_pids is not None else set()
        self._clock = clock  # must run at the pace of the CPU times it divides
        self._last_total: float | None = None
        self._last_own: float = 0.0
        self._last_at = clock()
        self._ncpu = psutil.cpu_count() or 1

    def set_own_pids(self, pids: set[int]) -> None:
        self._own = pids

    def _own_cpu_seconds(self) -> float:
        total = 0.0
        for pid in list(self._own):
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                self._own.discard(pid)
        return total

    def read(self) -> float | None:
        """Owner load since the previous call (None on the first call)."""
        now = self._clock()
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        own = self._own_cpu_seconds()
        previous, previous_own, previous_at = self._last_total, self._last_own, self._last_at
        self._last_total, self._last_own, self._last_at = busy, own, now
        if previous is None or now - previous_at <= 0:
            return None
        used = (busy - previous) - max(0.0, own - previous_own)
        return max(0.0, used / (now - previous_at))


class CgroupLoad:
    """CPU used by the processes of one cgroup v2 (the owner's session, e.g. a systemd user slice such as
    ``/sys/fs/cgroup/user.slice/user-1000.slice``), in cores: on a machine that also runs other people's or the
    system's work, the owner's own load, nothing else. Read from its ``cpu.stat``; an unreadable one is unknown."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._last: tuple[float, float] | None = None  # (usage in seconds, when)

    def set_own_pids(self, pids: set[int]) -> None:
        """conode's processes are not in the owner's cgroup: nothing to leave out."""

    def _usage_s(self) -> float | None:
        try:
            text = (self.path / "cpu.stat").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                return int(value) / 1e6
        return None

    def read(self) -> float | None:
        """The owner's load since the previous call (None on the first call, or if the cgroup cannot be read)."""
        now, usage = self._clock(), self._usage_s()
        previous, self._last = self._last, None if usage is None else (usage, now)
        if usage is None or previous is None or now <= previous[1]:
            return None
        return max(0.0, usage - previous[0]) / (now - previous[1])


def on_battery() -> bool | None:
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return None
    return None if battery is None else not battery.power_plugged


def platform_sources() -> list[IdleSource]:
    """The input-idle sources that can exist on this platform (each may still report unknown)."""
    if sys.platform == "win32":
        return [WindowsSource()]
    if sys.platform == "darwin":
        return [MacSource()]
    return [X11Source(), LogindSource()]


def combine(readings: list[IdleReading]) -> float | None:
    """The owner's idle time: the most recent input any working source saw; None if none could tell."""
    known = [r.idle_s for r in readings if r.idle_s is not None]
    return min(known) if known else None
