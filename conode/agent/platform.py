"""What the agent does differently per platform: giving the owner's work priority over the guests'."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import psutil

log = logging.getLogger("conode.agent")

POSIX_NICENESS = 19  # the lowest CPU priority on Linux and macOS


def lower_priority(process: psutil.Process | None = None) -> bool:
    """Give *process* (default: this one) the lowest CPU and I/O priority the platform offers.

    POSIX: niceness 19, and on Linux the idle I/O class. Windows: the idle priority class (below normal if that
    is refused) and very low I/O priority. Returns whether the CPU priority was lowered; never raises, since a
    guest at normal priority still works, only less politely.
    """
    process = process or psutil.Process()
    lowered = False
    if sys.platform == "win32":
        for name in ("IDLE_PRIORITY_CLASS", "BELOW_NORMAL_PRIORITY_CLASS"):
            if _try(process.nice, getattr(psutil, name, None)):
                lowered = True
                break
        _try(process.ionice, getattr(psutil, "IOPRIO_VERYLOW", None))
    else:
        lowered = _try(process.nice, POSIX_NICENESS)
        if sys.platform.startswith("linux"):
            _try(process.ionice, getattr(psutil, "IOPRIO_CLASS_IDLE", None))
    if not lowered:
        log.warning("could not lower the guest worker's priority; the owner's programs may feel it")
    return lowered


def _try(setter: Callable[[Any], Any], value: Any) -> bool:
    if value is None:
        return False
    try:
        setter(value)
        return True
    except (psutil.Error, OSError, AttributeError, ValueError):
        return False
