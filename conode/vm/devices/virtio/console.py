"""A virtio-console device with one port (/dev/hvc0 in the guest), carrying a byte stream to its backend.

The device moves bytes between guest buffers and its backend, a
:class:`~conode.vm.devices.virtio.host_stream.HostStream`. It saves no state of its own: its queues are the transport's (which re-activates it on restore), its bytes the backend's.
"""

from __future__ import annotations

from conode.vm.devices.virtio.host_stream import HostStream
from conode.vm.devices.virtio.transport import Activation
from conode.vm.devices.virtio.queue import read_chain, write_chain

VIRTIO_ID_CONSOLE = 3
RECEIVEQ, TRANSMITQ = 0, 1  # port 0: guest receives on queue 0, transmits on queue 1
# hvc writes at most a page per buffer; a larger chain is not the guest's console driver talking.
MAX_TRANSMIT_CHAIN = 64 << 10


class VirtioConsole:
    """A single-port virtio console bound to *backend*."""

    device_id = VIRTIO_ID_CONSOLE
    features = 0  # no multiport, no console size: a plain byte pipe
    num_queues = 2

    def __init__(self, backend: HostStream) -> None:
        self.backend = backend
        self._active: Activation | None = None
        backend.connect(self._fill_receive_buffers)

    def config_read(self, offset: int, size: int) -> int:
        return 0

    def activate(self, activation: Activation) -> None:
        self._active = activation
        self._fill_receive_buffers()

    def reset(self) -> None:
        self._active = None

    def notify(self, queue_index: int) -> None:
        if queue_index == TRANSMITQ:
            self._drain_transmit()
        else:
            self._fill_receive_buffers()

    def _drain_transmit(self) -> None:
        active = self._active
        queue = active.queues[TRANSMITQ] if active else None
        if active is None or queue is None:
            return
        chunks = []
        while (chain := queue.pop()) is not None:
            if chain.readable_bytes() > MAX_TRANSMIT_CHAIN:
                queue.fail(f"a transmit chain of {chain.readable_bytes()} bytes exceeds {MAX_TRANSMIT_CHAIN}")
                break
            chunks.append(read_chain(active.memory, chain))
            queue.push_used(chain.head, 0)
        if chunks:
            active.signal_used(TRANSMITQ)
            self.backend.on_receive(b"".join(chunks))

    def _fill_receive_buffers(self) -> None:
        active, backend = self._active, self.backend
        queue = active.queues[RECEIVEQ] if active else None
        if active is None or queue is None or not backend.has_pending():
            return
        delivered = False
        while backend.has_pending() and (chain := queue.pop()) is not None:
            room = sum(b.length for b in chain.writable())
            written = write_chain(active.memory, chain, backend.take(room)) if room else 0
            queue.push_used(chain.head, written)
            delivered = True
        if delivered:
            active.signal_used(RECEIVEQ)
