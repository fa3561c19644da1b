"""The agent's view of the workstation's owner: idle sources and load in, owner-policy state out."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from conode.agent.pause import Pause, PauseWatch
from conode.idle.report import ReportsSource
from conode.idle.policy import Observation, OwnerState, PolicyConfig, PolicyState, next_state
from conode.idle.sources import (CgroupLoad, FileSource, IdleReading, IdleSource, OwnerLoad, combine, on_battery,
                                 platform_sources)

AUTO, AWAY, PRESENT = "auto", "away", "present"  # idle-source specs beside file:PATH
FIXED_SOURCES = (AWAY, PRESENT)  # the owner declared away or present: no load to measure either
SLOW_SOURCE_INTERVAL_S = 1.0  # sources that spawn a process (logind, macOS) are read at most this often


class _FixedSource:
    """The owner declared away (idle forever) or present (never idle) on the command line."""

    def __init__(self, away: bool) -> None:
        self.name = "flag"
        self._away = away

    def read(self) -> IdleReading:
        return IdleReading(self.name, math.inf if self._away else 0.0, "--owner " + (AWAY if self._away else PRESENT))


class _Throttled:
    """Reads a slow source at most every SLOW_SOURCE_INTERVAL_S, repeating (and ageing) the last reading."""

    def __init__(self, source: IdleSource, clock: Callable[[], float]) -> None:
        self.name = source.name
        self._source = source
        self._clock = clock
        self._last: IdleReading | None = None
        self._at = 0.0

    def read(self) -> IdleReading:
        now = self._clock()
        if self._last is None or now - self._at >= SLOW_SOURCE_INTERVAL_S:
            self._last, self._at = self._source.read(), now
            return self._last
        aged = None if self._last.idle_s is None else self._last.idle_s + (now - self._at)
        return IdleReading(self._last.source, aged, self._last.detail)


def make_sources(spec: str, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, reports: Path | None = None) -> list[IdleSource]:
    """``auto`` (the platform's sources, and the desktop sessions' reports in *reports* if given), ``away``,
    ``present``, or ``file:PATH``."""
    if spec == AWAY:
        return [_FixedSource(True)]
    if spec == PRESENT:
        return [_FixedSource(False)]
    if spec.startswith("file:"):
        return [FileSource(Path(spec[len("file:"):]), wall)]
    sources: list[IdleSource] = []
    for source in platform_sources():
        sources.append(source if source.name in ("x11", "windows") else _Throttled(source, clock))
    if reports is not None:
        sources.append(ReportsSource(reports, wall))
    return sources


@dataclass(frozen=True)
class OwnerSnapshot:
    """The last observation, for `conode status`."""

    readings: tuple[IdleReading, ...]
    idle_s: float | None
    owner_load: float | None
    on_battery: bool | None
    pause: Pause | None = None


class OwnerMonitor:
    def __init__(self, sources: list[IdleSource], config: PolicyConfig, load: OwnerLoad | CgroupLoad | None = None,
                 clock: Callable[[], float] = time.monotonic, fixed_load: float | None = None,
                 wall: Callable[[], float] = time.time, pauses: PauseWatch | None = None) -> None:
        self.sources = sources
        self.pauses = pauses
        self.config = config
        self.load = load or OwnerLoad()
        self._clock = clock
        self._wall = wall  # for time-of-day windows
        self._fixed_load = fixed_load
        self.policy = PolicyState(OwnerState.OWNER, clock())
        self.last = OwnerSnapshot((), None, None, None)
        self._load_value: float | None = None
        self._load_at = -math.inf

    def _owner_load(self, now: float) -> float | None:
        if self._fixed_load is not None:
            return self._fixed_load
        if now - self._load_at >= SLOW_SOURCE_INTERVAL_S:  # a load figure needs a sampling interval anyway
            self._load_value, self._load_at = self.load.read(), now
        return self._load_value

    def observe(self) -> Observation:
        now = self._clock()
        readings = tuple(source.read() for source in self.sources)
        idle = combine(list(readings))
        load = self._owner_load(now)
        battery = on_battery()
        pause = self.pauses.check() if self.pauses is not None else None
        self.last = OwnerSnapshot(readings, idle, load, battery, pause)
        local = time.localtime(self._wall())
        return Observation(now, idle, load, battery, local.tm_wday, local.tm_hour * 60 + local.tm_min,
                           pause is not None)

    def step(self, has_jobs: bool, vacated: bool) -> tuple[OwnerState, OwnerState]:
        """Observe and advance the policy; return (previous, current) state."""
        previous = self.policy.state
        self.policy = next_state(self.policy, self.observe(), has_jobs, vacated, self.config)
        return previous, self.policy.state
