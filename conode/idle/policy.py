"""The owner policy: when may the guest use this workstation? A pure function of observations and settings.

States use HTCondor's vocabulary, which admins know:

- **Owner**: the owner is using the machine (or we cannot tell): the guest does not run.
- **Unclaimed**: the owner has been away long enough; the guest is up and offered to the pool.
- **Claimed**: the guest is running jobs.
- **Suspended**: the owner came back while jobs ran: the guest is paused, its jobs wait.
- **Vacating**: suspended too long: the guest is being saved to disk so the machine can be given back entirely.

Defaults follow HTCondor's desktop policy: start after 15 minutes without input and owner load below 0.3;
suspend on any input or owner load above 0.5; continue after 5 minutes idle again; vacate after 10 minutes
suspended. An observation that could not be made counts against running: unknown is never idle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OwnerState(enum.Enum):
    OWNER = "Owner"
    UNCLAIMED = "Unclaimed"
    CLAIMED = "Claimed"
    SUSPENDED = "Suspended"
    VACATING = "Vacating"


@dataclass(frozen=True)
class TimeWindow:
    """Minutes since local midnight [start, end) on the given weekdays (0 = Monday); may wrap midnight."""

    start_min: int
    end_min: int
    weekdays: frozenset[int] = frozenset(range(7))

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start_min <= self.end_min:
            return weekday in self.weekdays and self.start_min <= minute < self.end_min
        # wraps midnight: the part after midnight belongs to the previous day's window
        if minute >= self.start_min:
            return weekday in self.weekdays
        return minute < self.end_min and (weekday - 1) % 7 in self.weekdays


@dataclass(frozen=True)
class PolicyConfig:
    start_idle_s: float = 15 * 60.0
    start_max_load: float = 0.3
    suspend_load: float = 0.5
    continue_idle_s: float = 5 * 60.0
    vacate_after_s: float = 10 * 60.0
    active_input_s: float = 5.0  # input this recent means the owner is at the keyboard
    allow_on_battery: bool = False
    windows: tuple[TimeWindow, ...] = field(default_factory=tuple)  # empty: any time

    def __post_init__(self) -> None:
        # Without these gaps between the thresholds the guest would flap between running and stopped.
        if self.start_idle_s < self.active_input_s or self.continue_idle_s < self.active_input_s:
            raise ValueError("start_idle_s and continue_idle_s must not be shorter than active_input_s")
        if self.suspend_load < self.start_max_load:
            raise ValueError("suspend_load must not be below start_max_load")


@dataclass(frozen=True)
class Observation:
    now: float  # monotonic seconds
    input_idle_s: float | None  # seconds since the owner's last input, None if no source could tell
    owner_load: float | None  # CPU used by everything but conode, in cores; None if unknown
    on_battery: bool | None = None  # None: no battery, or unknown
    weekday: int = 0
    minute_of_day: int = 0
    paused: bool = False  # the owner paused the pool here (`conode pause`)


@dataclass(frozen=True)
class PolicyState:
    state: OwnerState = OwnerState.OWNER
    since: float = 0.0  # monotonic time the state was entered


def _allowed(obs: Observation, cfg: PolicyConfig) -> bool:
    """May the guest run at all now (the owner's pause, power and time of day)?"""
    if obs.paused or (obs.on_battery and not cfg.allow_on_battery):
        return False
    return not cfg.windows or any(w.contains(obs.weekday, obs.minute_of_day) for w in cfg.windows)


def _owner_active(obs: Observation, cfg: PolicyConfig) -> bool:
    return obs.input_idle_s is None or obs.input_idle_s < cfg.active_input_s


def _idle_for(obs: Observation, seconds: float, max_load: float) -> bool:
    return (obs.input_idle_s is not None and obs.input_idle_s >= seconds
            and obs.owner_load is not None and obs.owner_load < max_load)


def next_state(current: PolicyState, obs: Observation, has_jobs: bool, vacated: bool,
               cfg: PolicyConfig) -> PolicyState:
    """The state after *obs*. *has_jobs*: the guest runs jobs; *vacated*: the guest has been saved away.

    Each observation moves the state at most once: applying the same observation again changes nothing.
    """
    new = _transition(current.state, current.since, obs, has_jobs, vacated, cfg)
    if new is OwnerState.OWNER and current.state is not OwnerState.OWNER:
        new = _transition(OwnerState.OWNER, obs.now, obs, has_jobs, vacated, cfg)  # settle where Owner would go
    return current if new is current.state else PolicyState(new, obs.now)


def _transition(state: OwnerState, since: float, obs: Observation, has_jobs: bool, vacated: bool,
                cfg: PolicyConfig) -> OwnerState:
    allowed = _allowed(obs, cfg)
    busy = _owner_active(obs, cfg) or obs.owner_load is None or obs.owner_load > cfg.suspend_load or not allowed
    if state is OwnerState.OWNER:
        if allowed and _idle_for(obs, cfg.start_idle_s, cfg.start_max_load):
            return OwnerState.CLAIMED if has_jobs else OwnerState.UNCLAIMED
        return state
    if state is OwnerState.UNCLAIMED:
        if busy:
            return OwnerState.OWNER
        return OwnerState.CLAIMED if has_jobs else state
    if state is OwnerState.CLAIMED:
        if busy:
            return OwnerState.SUSPENDED if has_jobs else OwnerState.OWNER
        return state if has_jobs else OwnerState.UNCLAIMED
    if state is OwnerState.SUSPENDED:
        if not has_jobs:
            return OwnerState.OWNER
        if allowed and _idle_for(obs, cfg.continue_idle_s, cfg.start_max_load):
            return OwnerState.CLAIMED
        if obs.now - since >= cfg.vacate_after_s:
            return OwnerState.VACATING
        return state
    # VACATING: done once the guest is saved away
    return OwnerState.OWNER if vacated or not has_jobs else state


def guest_may_run(state: OwnerState) -> bool:
    """Whether the guest CPU may execute in this state."""
    return state in (OwnerState.UNCLAIMED, OwnerState.CLAIMED)
