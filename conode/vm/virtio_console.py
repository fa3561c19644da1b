"""The host channel: a virtio-console device (one port, /dev/hvc0 in the guest) carrying a byte stream.

The device only moves bytes; what they mean (the framing spoken with the in-guest agent) is
conode/vm/channel.py's business.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable

from conode.vm.virtqueue import read_chain, write_chain

if TYPE_CHECKING:
    from conode.vm.virtio_mmio import VirtioMmio

VIRTIO_ID_CONSOLE = 3
RECEIVEQ, TRANSMITQ = 0, 1  # port 0: guest receives on queue 0, transmits on queue 1


class VirtioConsole:
    """A single-port virtio console; bytes from the guest go to *on_receive*."""

    device_id = VIRTIO_ID_CONSOLE
    features = 0  # no multiport, no console size: a plain byte pipe
    num_queues = 2

    def __init__(self, on_receive: Callable[[bytes], None]) -> None:
        self._on_receive = on_receive
        self._transport: VirtioMmio | None = None
        self._pending: deque[bytes] = deque()  # host->guest bytes waiting for receive buffers

    @property
    def backlog(self) -> int:
        return sum(len(chunk) for chunk in self._pending)

    def config_read(self, offset: int, size: int) -> int:
        return 0

    def activate(self, transport: "VirtioMmio") -> None:
        self._transport = transport
        self._fill_receive_buffers()

    def reset(self) -> None:
        self._transport = None

    def send(self, data: bytes) -> None:
        """Queue bytes for the guest; they are delivered as soon as it has posted receive buffers."""
        if data:
            self._pending.append(bytes(data))
            self._fill_receive_buffers()

    def notify(self, queue_index: int) -> None:
        if queue_index == TRANSMITQ:
            self._drain_transmit()
        else:
            self._fill_receive_buffers()

    def _drain_transmit(self) -> None:
        transport = self._transport
        if transport is None:
            return
        queue = transport.queues[TRANSMITQ]
        if queue is None:
            return
        chunks = []
        while (chain := queue.pop()) is not None:
            chunks.append(read_chain(transport.memory, chain))
            queue.push_used(chain.head, 0)
        if chunks:
            transport.signal_used(TRANSMITQ)
            self._on_receive(b"".join(chunks))

    def _fill_receive_buffers(self) -> None:
        transport = self._transport
        if transport is None or not self._pending:
            return
        queue = transport.queues[RECEIVEQ]
        if queue is None:
            return
        delivered = False
        while self._pending and (chain := queue.pop()) is not None:
            data = self._pending.popleft()
            written = write_chain(transport.memory, chain, data)
            if written < len(data):
                self._pending.appendleft(data[written:])
            queue.push_used(chain.head, written)
            delivered = True
        if delivered:
            transport.signal_used(RECEIVEQ)

    def get_state(self) -> dict:
        return {"pending": b"".join(self._pending)}

    def set_state(self, state: dict, transport: "VirtioMmio") -> None:
        self._pending = deque([state["pending"]] if state["pending"] else [])
        self._transport = transport if transport.driver_ok else None
