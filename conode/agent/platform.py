"""What the agent does differently per platform: giving the owner's work priority over the guests'."""

from __future__ import annotations

import logging
import os
import sys
import threading
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
    """Run the block with every thread of this process at normal CPU priority (niceness 0, the normal scheduling
    class), then put each back where it was (a thread started meanwhile: where the calling thread was); yields
    whether any was raised.

    For the few tens of milliseconds in which a moving guest is stopped on both sides: at the lowest priority,
    on a busy workstation, that copy waits for the CPU and the guest's downtime grows from milliseconds to
    seconds. Every thread, since the copy goes through ZeroMQ's I/O thread too (the guest's own thread is paused
    meanwhile). Raising a priority needs the right to (root, CAP_SYS_NICE, or an RLIMIT_NICE of 20 such as
    systemd's ``LimitNICE=+0``); without it the block runs as it is. Linux only (priorities per thread there);
    elsewhere the block runs as it is.
    """
    if not sys.platform.startswith("linux"):
        yield False
        return
    before = {tid: where for tid in _threads() if (where := _priority(tid)) is not None}
    raised = False
    for tid in before:
        raised = _set_priority(tid, os.SCHED_OTHER, 0) is True or raised
    try:
        yield raised
    finally:
        own = before.get(threading.get_native_id(), (os.SCHED_OTHER, 0))
        for tid in _threads():
            if _set_priority(tid, *before.get(tid, own)) is None:
                log.warning("could not lower thread %d's priority again after a move", tid)


def _threads() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def _priority(tid: int) -> tuple[int, int] | None:
    """A thread's scheduling policy and niceness, or None if it is gone."""
    try:
        return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


def _set_priority(tid: int, policy: int, nice: int) -> bool | None:
    """Give a thread *policy* and *nice*: True if that changed it, False if it had them (or has ended), None if
    refused."""
    current = _priority(tid)
    if current is None or current == (policy, nice):
        return False
    try:
        if current[1] != nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        if current[0] != policy:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return None


def _try(setter: Callable[[Any], Any], value: Any) -> bool:
    if value is None:
        return False
    try:
        setter(value)
        return True
    except (psutil.Error, OSError, AttributeError, ValueError):
        return False
