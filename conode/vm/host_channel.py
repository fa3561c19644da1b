"""The host channel's two transports: the virtio console, and COM2 for kernels without one.

conode's kernel has the virtio console built in; a distribution kernel builds it as a module, but drives the
PC's serial ports. The in-guest agent speaks on whichever it finds (hvc0 first, else ttyS1), and the
transport on which the guest first speaks becomes the channel: the host sends there, and bytes on the other
transport are ignored (a job writing to the unused port reaches nobody). Before the agent has spoken the host
has nothing to send; what it sends anyway waits, bounded, until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from conode.errors import ConodeError
from conode.vm import state
from conode.vm.devices.legacy.uart import Uart16550
from conode.vm.devices.virtio.host_stream import MAX_PENDING_BYTES, HostStream
from conode.vm.state import blob, one_of

NONE, VIRTIO, SERIAL = 0, 1, 2  # which transport the guest speaks on


@dataclass(frozen=True)
class HostChannelState(state.Record):
    KIND = "host channel"
    VERSION = 1

    live: int = one_of(NONE, VIRTIO, SERIAL)
    early: bytes = blob(max_len=MAX_PENDING_BYTES)  # sent before the guest spoke
    virtio: dict
    serial: dict


class HostChannel:
    """One byte stream to the in-guest agent over whichever transport it chose; *receive* gets its bytes."""

    def __init__(self, receive: Callable[[bytes], None]) -> None:
        self._receive = receive
        self.virtio = HostStream(partial(self._from_guest, VIRTIO))
        self.serial = HostStream(partial(self._from_guest, SERIAL))
        self.live = NONE
        self._early = bytearray()

    def _stream(self, which: int) -> HostStream:
        return self.virtio if which == VIRTIO else self.serial

    def _from_guest(self, which: int, data: bytes) -> None:
        if self.live == NONE:
            self.live = which
            early, self._early = bytes(self._early), bytearray()
            self._stream(which).send(early)
        if which == self.live:
            self._receive(data)

    def send(self, data: bytes) -> None:
        if self.live != NONE:
            self._stream(self.live).send(data)
        elif len(self._early) + len(data) > MAX_PENDING_BYTES:
            raise ConodeError("the guest's agent has not spoken yet and the host channel is full")
        else:
            self._early += data

    def get_state(self) -> dict:
        return state.dump(HostChannelState(self.live, bytes(self._early), self.virtio.get_state(),
                                           self.serial.get_state()))

    def set_state(self, data: dict) -> None:
        saved = state.load(HostChannelState, data)
        self.virtio.set_state(saved.virtio)
        self.serial.set_state(saved.serial)
        self.live, self._early = saved.live, bytearray(saved.early)


def connect_uart(stream: HostStream, uart: Uart16550) -> Callable[[], None]:
    """Run *stream* over *uart*: the guest's transmitted bytes go to the stream's receiver, and the host's bytes
    enter the UART's receive buffer as the guest makes room (never overrun, unlike a typist). Returns the
    refill, for the machine to call after a restore."""

    def refill() -> None:
        while stream.has_pending() and uart.rx_room > 0:
            uart.feed(stream.take(uart.rx_room))

    stream.connect(refill)
    uart.on_rx_room = refill
    return refill
