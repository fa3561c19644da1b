"""What the agent does differently per platform: giving the owner's work priority over the guests'."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def urgent() -> Iterator[bool]:
    """Run the block on this thread at normal CPU priority (niceness 0, the normal scheduling class), then go
    back to where the thread was; yields whether it was raised.

    For the few tens of milliseconds in which a moving guest is stopped on both sides: at the lowest priority,
    on a busy workstation, that copy waits for the CPU and the guest's downtime grows from milliseconds to
    seconds. Raising a priority needs the right to (root, CAP_SYS_NICE, or an RLIMIT_NICE of 20 such as
    systemd's ``LimitNICE=+0``); without it the block runs as it is. Linux only: elsewhere priorities are the
    process's, not the thread's, and the block runs as it is. Threads started in the block inherit it.
    """
    if not sys.platform.startswith("linux"):
        yield False
        return
    try:
        policy, nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)  # this thread's (Linux)
    except OSError:
        yield False
        return
    raised = False
    try:
        if policy != os.SCHED_OTHER:  # the idle class (systemd's CPUSchedulingPolicy=idle)
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if nice > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        raised = policy != os.SCHED_OTHER or nice > 0
    except OSError:
        pass  # not allowed: as it is
    try:
        yield raised
    finally:
        try:
            if os.getpriority(os.PRIO_PROCESS, 0) != nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            if os.sched_getscheduler(0) != policy:
                os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            log.warning("could not lower this thread's priority again after a move")


def _try(setter: Callable[[Any], Any], value: Any) -> bool:
    if value is None:
        return False
    try:
        setter(value)
        return True
    except (psutil.Error, OSError, AttributeError, ValueError):
        return False
