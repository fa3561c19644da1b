"""The host end of the host channel: a byte stream between the agent and the virtio console device.

The device model (:mod:`conode.vm.devices.virtio.console`) moves bytes between guest buffers and this
backend; the backend holds what the host sent until the guest has room for it, and hands what the guest sent to
*on_receive*. What the bytes mean is conode/vm/channel.py's business.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from conode.errors import ConodeError
from conode.limits import MAX_FRAME_BYTES
from conode.vm import state
from conode.vm.state import blob

# Bytes in flight to the guest: at most what one control-plane message can carry (a job's inputs, staged).
MAX_PENDING_BYTES = MAX_FRAME_BYTES


@dataclass(frozen=True)
class HostStreamState(state.Record):
    KIND = "host channel"
    VERSION = 1

    pending: bytes = blob(max_len=MAX_PENDING_BYTES)


class HostStream:
    """Bytes the host sends wait here for guest receive buffers; bytes the guest sends go to *on_receive*."""

    def __init__(self, on_receive: Callable[[bytes], None]) -> None:
        self.on_receive = on_receive
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._wake: Callable[[], None] = lambda: None

    def connect(self, wake: Callable[[], None]) -> None:
        """The device calls this once: *wake* moves pending bytes into the guest when it can."""
        self._wake = wake

    @property
    def backlog(self) -> int:
        return self._pending_bytes

    def send(self, data: bytes) -> None:
        """Queue bytes for the guest; they are delivered as soon as it has posted receive buffers."""
        if not data:
            return
        if self._pending_bytes + len(data) > MAX_PENDING_BYTES:
            raise ConodeError(f"the guest is not reading its host channel ({self._pending_bytes} bytes wait); "
                              f"stop the guest or wait for it")
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        self._wake()

    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self, limit: int) -> bytes:
        """Up to *limit* of the oldest pending bytes, removed from the queue."""
        head = self._pending.popleft()
        if len(head) > limit:
            self._pending.appendleft(head[limit:])
            head = head[:limit]
        self._pending_bytes -= len(head)
        return head

    def get_state(self) -> dict:
        return state.dump(HostStreamState(b"".join(self._pending)))

    def set_state(self, data: dict) -> None:
        """Restore :meth:`get_state` output; raise SnapshotError (and change nothing) if it is not valid."""
        saved = state.load(HostStreamState, data)
        self._pending = deque([saved.pending] if saved.pending else [])
        self._pending_bytes = len(saved.pending)
