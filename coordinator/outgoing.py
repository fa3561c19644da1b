# SPDX-License-Identifier: GPL-2.0-or-later
"""The coordinator's sends, held back while the job transitions they depend on are not yet committed.

A loop turn's writes go into one SQLite transaction (group commit, store.Store.grouped); whatever the turn sends
meanwhile — a reply, a placement, an ack — waits here, in order, and goes once that transaction is durable, so that
no peer ever hears of a transition a crash could still undo. Outside a turn (tests driving the coordinator one
message at a time, the image chunks) a send goes at once.
"""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    """Where the coordinator's messages go: the ROUTER socket, or an in-memory one in tests."""

    def send(self, identity: bytes, payload: bytes) -> bool: ...

    def close(self) -> None: ...


class Outgoing:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._held: list[tuple[bytes, bytes]] | None = None  # what waits for the commit, while holding

    def send(self, identity: bytes, payload: bytes) -> bool:
        """Send, or hold until :meth:`release`; False if the peer is gone or not keeping up (known only when the
        send is not held: a held one that fails is reported by :meth:`release`)."""
        if self._held is None:
            return self.transport.send(identity, payload)
        self._held.append((identity, payload))
        return True

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> set[bytes]:
        """Send what was held, in order, and stop holding; the peers that could not take a message (the rest of
        theirs is not sent: they would receive it with a gap)."""
        held, self._held = self._held or [], None
        failed: set[bytes] = set()
        for identity, payload in held:
            if identity not in failed and not self.transport.send(identity, payload):
                failed.add(identity)
        return failed

    def discard(self) -> None:
        """Forget what was held (its transitions may not have been committed) and stop holding."""
        self._held = None

    def close(self) -> None:
        self.transport.close()
