"""An in-memory coordinator connection: it records what the agent sends and delivers what a test injects.

It stands in for the agent's ZeroMQ transport (conode/agent/link.py), so the link's own logic (hello,
heartbeats, buffering, outbox, reconnect back-off) runs for real in tests.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from conode.cluster import protocol
from conode.cluster.transport import AuthRefused


class MemoryTransport:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []  # decoded, in order
        # The connection: while False, sends fail as they do when the coordinator is unreachable, and a link that
        # was up counts it dropped (ZeroMQ's heartbeats went unanswered); while True ZeroMQ keeps it alive.
        self.up = True
        self.refused = False
        self.problem: str | None = None  # what a real transport says when the handshake fails
        self.reconnects = 0
        self.closed = False
        self._incoming: deque[bytes] = deque()

    # --- the Transport the agent uses ------------------------------------------------------------------------
    @property
    def pollable(self) -> None:
        return None

    def send(self, payload: bytes) -> bool:
        if not self.up:
            return False
        self.sent.append(protocol.decode(payload))  # the agent never sends what the protocol refuses
        return True

    def receive(self) -> bytes | None:
        return self._incoming.popleft() if self._incoming else None

    def reconnect(self) -> None:
        self.reconnects += 1
        self._incoming.clear()  # a new socket: what the old one had queued is gone

    def check_refused(self) -> None:
        if self.refused:
            raise AuthRefused("memory")

    def close(self) -> None:
        self.closed = True

    # --- the test's side ---------------------------------------------------------------------------------------
    def deliver(self, kind: str, **fields: Any) -> None:
        """Queue a message from the coordinator."""
        self._incoming.append(protocol.encode(kind, **fields))

    def deliver_raw(self, frame: bytes) -> None:
        self._incoming.append(frame)

    def welcome(self) -> None:
        self.deliver("welcome", heartbeat_s=protocol.HEARTBEAT_INTERVAL_S)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == kind]

    def clear(self) -> None:
        self.sent.clear()
