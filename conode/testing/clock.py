"""A clock that moves only when a test says so."""

from __future__ import annotations


class FakeClock:
    """Pass it wherever a clock callable is taken (``clock=``); ``advance`` moves it forward."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
