"""The owner policy in plain words: what would make the pool start or stop on this workstation now.

Pure functions of the policy's settings and the current state, for `conode status`; the words follow the
transitions in policy.py (which this module must keep agreeing with, and its tests check).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from conode.idle.policy import OwnerState, PolicyConfig, TimeWindow

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
NAMED_DAYS = {frozenset(range(7)): "every day", frozenset(range(5)): "weekdays", frozenset({5, 6}): "weekends"}


def duration(seconds: float) -> str:
    """A duration as people say it: "40 s", "5 min", "2 h 30 min"."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h" + (f" {rest} min" if rest else "")


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def window_words(window: TimeWindow) -> str:
    days = NAMED_DAYS.get(window.weekdays) or ", ".join(DAY_NAMES[d] for d in sorted(window.weekdays))
    if window.start_min == 0 and window.end_min >= 24 * 60:
        return f"{days} all day"
    return f"{days} {_clock(window.start_min)}–{_clock(window.end_min % (24 * 60))}"


def windows_words(windows: Iterable[TimeWindow]) -> str:
    return ", ".join(window_words(w) for w in windows)


def when(wall: float) -> str:
    """A wall time as the owner reads it: "14:30" today, else "Thu 14:30"."""
    local, today = time.localtime(wall), time.localtime()
    same_day = (local.tm_year, local.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M" if same_day else "%a %H:%M", local)


def _conditions(cfg: PolicyConfig, idle_s: float, idle_now: float | None) -> str:
    now = "" if idle_now is None else f" (now {'forever' if idle_now >= 1e8 else duration(idle_now)})"
    words = f"you have been idle {duration(idle_s)}{now} and your programs use under {cfg.start_max_load:g} cores"
    if cfg.windows:
        words += f", within {windows_words(cfg.windows)}"
    if not cfg.allow_on_battery:
        words += ", on mains power"
    return words


def explain(state: OwnerState, cfg: PolicyConfig, idle_s: float | None, paused_until: float | None) -> str:
    """One sentence: why the pool does what it does here now, and what changes it."""
    stop = (f"stops as soon as you use the keyboard or mouse, or your programs use over {cfg.suspend_load:g} cores"
            + (f", or outside {windows_words(cfg.windows)}" if cfg.windows else ""))
    if paused_until is not None:
        held = " (its guests keep their jobs, paused)" if state is OwnerState.SUSPENDED else ""
        return (f"paused until {when(paused_until)} (`conode resume` ends it){held}; then it starts when "
                f"{_conditions(cfg, cfg.start_idle_s, idle_s)}")
    if state is OwnerState.OWNER:
        return f"starts when {_conditions(cfg, cfg.start_idle_s, idle_s)}"
    if state is OwnerState.UNCLAIMED:
        return f"may use this machine now (its guests wait for jobs); it {stop}"
    if state is OwnerState.CLAIMED:
        return f"uses this machine now; it {stop}"
    if state is OwnerState.SUSPENDED:
        return (f"stopped for you (its jobs wait, paused); it continues when "
                f"{_conditions(cfg, cfg.continue_idle_s, idle_s)}, and saves them to disk after "
                f"{duration(cfg.vacate_after_s)} stopped")
    return "saving its guests to disk to give this machine back entirely"
