"""Liveness and reconnect back-off (the ZeroMQ guide's Paranoid Pirate), as pure logic with an injectable clock."""

from __future__ import annotations

import time
from typing import Callable

from conode.cluster.protocol import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, RECONNECT_INITIAL_S, RECONNECT_MAX_S


class PeerLiveness:
    """Tracks one peer: when we last heard from it, when we owe it a beat, and the reconnect back-off."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval: float = HEARTBEAT_INTERVAL_S,
                 liveness: int = HEARTBEAT_LIVENESS) -> None:
        self._clock = clock
        self.interval = interval
        self.liveness = liveness
        now = clock()
        self.last_heard = now
        self.next_beat = now + interval
        self.backoff = RECONNECT_INITIAL_S

    def heard(self) -> None:
        """Any message from the peer proves it alive and resets the back-off."""
        self.last_heard = self._clock()
        self.backoff = RECONNECT_INITIAL_S

    def silent(self) -> None:
        """The peer is known to have been silent for the whole limit (its connection timed out): expired now."""
        self.last_heard = min(self.last_heard, self._clock() - self.interval * self.liveness - 1e-3)

    def expired(self) -> bool:
        return self._clock() - self.last_heard > self.interval * self.liveness

    def beat_due(self) -> bool:
        now = self._clock()
        if now >= self.next_beat:
            self.next_beat = now + self.interval
            return True
        return False

    def next_backoff(self) -> float:
        """The delay before the next reconnect attempt; doubles up to a cap."""
        delay = self.backoff
        self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)
        return delay

    def reset(self) -> None:
        now = self._clock()
        self.last_heard = now
        self.next_beat = now + self.interval

    def seconds_until_due(self) -> float:
        return max(0.0, min(self.next_beat, self.last_heard + self.interval * self.liveness) - self._clock())
