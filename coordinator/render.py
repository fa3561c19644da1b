"""Numbers as people read them in the CLI's tables: durations, sizes, guest speed and times of day."""

from __future__ import annotations

import math
import time
from typing import Any

FOREVER_S = 10 * 365 * 86400  # an idle time this long means "never touched" (agents cap forever to a large number)
SIZE_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def duration(seconds: float | None) -> str:
    """A span: 42s, 3m07s, 5h02m, 3d04h, or forever; "-" when unknown."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds >= FOREVER_S:
        return "forever"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def size(n_bytes: float) -> str:
    """A size with its unit: 512 bytes, 1.5 KiB, 128.0 MiB."""
    value = float(n_bytes)
    for unit in SIZE_UNITS:
        if value < 1024 or unit == SIZE_UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def mib(n_mib: int) -> str:
    return f"{n_mib} MiB"


def speed(loops_per_s: float) -> str:
    """A guest's measured speed (iterations of the agent's calibration loop per second); "-" before it is measured."""
    if not loops_per_s:
        return "-"
    if loops_per_s >= 10_000:
        return f"{loops_per_s / 1000:.0f}k loops/s"
    return f"{loops_per_s:.0f} loops/s"


def stamp(wall: float) -> str:
    """A wall-clock time, local, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(wall))


def since(wall: float, now: float) -> str:
    """When something happened: the local time, and how long ago."""
    return f"{stamp(wall)} ({duration(now - wall)} ago)"


def moves(job: dict[str, Any]) -> str:
    """A job's moves for a table: how many, where it ran and the last one's downtime; "-" for none."""
    count = job.get("moves", 0)
    if job.get("moving_to"):
        return f"{count} (moving to {job['moving_to']})"
    if not count:
        return "-"
    downtime = job.get("last_downtime_s")
    last = f", last down {downtime * 1000:.0f} ms" if downtime is not None else ""
    return f"{count}: {'>'.join(job.get('ran_on', []))}{last}"
