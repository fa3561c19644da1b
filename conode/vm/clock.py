"""Guest time: a virtual clock that runs only while the machine runs.

Devices (the PIT above all) read time from here, never from the host clock, so a paused, snapshotted or
migrated guest sees no jump: its time resumes exactly where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from conode.vm import state
from conode.vm.state import GUEST_NS_MAX, bounded

NS_PER_S = 1_000_000_000
# The guest's time-stamp counter: guest time at a stated rate (1 GHz: it counts guest nanoseconds), so that it
# stops with the machine and resumes from a snapshot where it stopped, like every other clock the guest reads.
# The kernel is told the rate (guest_image.BASE_CMDLINE) rather than left to calibrate it against the PIT,
# which on an emulated CPU measures the speed of port I/O and fails its own sanity checks.
TSC_HZ = NS_PER_S


@dataclass(frozen=True)
class ClockState(state.Record):
    KIND = "clock"
    VERSION = 1

    now_ns: int = bounded(0, GUEST_NS_MAX)


class VirtualClock:
    """Nanoseconds of guest time; frozen while paused.

    *host_ns* is injectable so tests can drive time by hand.
    """

    def __init__(self, host_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._host_ns = host_ns
        self._base_ns = 0  # guest time at the moment the clock was last resumed (or frozen value)
        self._resumed_at: int | None = None  # host time of that resume; None while paused
        self._follower: Callable[[int, int | None], None] | None = None

    def follow(self, follower: Callable[[int, int | None], None]) -> bool:
        """Tell *follower* (base_ns, resumed_at) now and at every pause, resume and restore, so that it can
        compute :meth:`now` itself from the host's CLOCK_MONOTONIC: ``base_ns`` while paused (``resumed_at`` None),
        else ``base_ns + monotonic - resumed_at`` (the engine's native RDTSC). Only a clock on that host clock
        can be followed: for any other, return False and tell nothing."""
        if self._host_ns is not time.monotonic_ns:
            return False
        self._follower = follower
        self._tell()
        return True

    def _tell(self) -> None:
        if self._follower is not None:
            self._follower(self._base_ns, self._resumed_at)

    @property
    def running(self) -> bool:
        return self._resumed_at is not None

    def now(self) -> int:
        """Current guest time in nanoseconds."""
        if self._resumed_at is None:
            return self._base_ns
        return self._base_ns + (self._host_ns() - self._resumed_at)

    def tsc(self) -> int:
        """The time-stamp counter RDTSC reads: guest time in TSC_HZ ticks (64 bits, as the register)."""
        return (self.now() * TSC_HZ // NS_PER_S) & 0xFFFF_FFFF_FFFF_FFFF

    def resume(self) -> None:
        if self._resumed_at is None:
            self._resumed_at = self._host_ns()
            self._tell()

    def pause(self) -> None:
        if self._resumed_at is not None:
            self._base_ns = self.now()
            self._resumed_at = None
            self._tell()

    def host_deadline(self, guest_ns: int) -> int:
        """The host monotonic time at which guest time reaches *guest_ns*, if the clock keeps running."""
        return self._host_ns() + max(0, guest_ns - self.now())

    def get_state(self) -> dict:
        return state.dump(ClockState(self.now()))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(ClockState, data)
        running = self.running
        self._base_ns = saved.now_ns
        self._resumed_at = self._host_ns() if running else None
        self._tell()
