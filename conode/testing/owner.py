"""An idle source a test sets: the owner is away for a given time, or at the keyboard."""

from __future__ import annotations

import math

from conode.idle.sources import IdleReading


class SettableIdle:
    name = "test"

    def __init__(self, idle_s: float | None = math.inf) -> None:
        self.idle_s = idle_s

    def read(self) -> IdleReading:
        return IdleReading(self.name, self.idle_s, "set by the test")

    def owner_back(self) -> None:
        self.idle_s = 0.0

    def owner_away(self, for_s: float = math.inf) -> None:
        self.idle_s = for_s
