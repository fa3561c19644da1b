"""A clock that moves only when told: inject it wherever code takes a ``clock`` callable, then ``advance``."""

from __future__ import annotations


class FakeClock:
    """Seconds as a float, like ``time.monotonic``; starts at *start* and stands still until advanced."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
